"""The detector: shapes, parameter counts, per-ROI independence of the head, save/reload, bad input."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import frcnn
from frcnn import heads
from frcnn.checkpoints import load_weights
from frcnn.inference import detect
from frcnn.backbone import BackboneWeightsError, build_res5, build_trunk
from frcnn.config import load_config

CLASSES = "data.classes=[circle,square,triangle]"


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config("test.yaml", [CLASSES, "roi_heads.score_thresh=0.0"])
    return frcnn.build_model(cfg)


@pytest.fixture(scope="module")
def voc_model():
    return frcnn.build_model(load_config("voc.yaml", ["model.backbone_weights=none"]))


def test_backbone_is_keras_resnet50():
    reference = keras.applications.ResNet50(include_top=False, weights=None)
    trunk, res5 = build_trunk(), build_res5()
    assert trunk.count_params() + res5.count_params() == reference.count_params()
    ours = {layer.name for layer in trunk.layers + res5.layers if layer.weights}
    theirs = {layer.name for layer in reference.layers if layer.weights}
    assert ours == theirs  # every weight-bearing layer has its Keras name, so ImageNet weights map one to one


def test_voc_roi_pooling_output_is_num_rois_14_14_1024(voc_model):
    images = {"images": tf.zeros((1, 96, 160, 3)), "image_sizes": tf.constant([[96, 160]])}
    features = voc_model.trunk(images["images"])
    logits, deltas = voc_model.rpn.head(features)
    anchors = voc_model.rpn.anchors(6, 10)
    assert features.shape[-1] == 1024 and features.shape[1:3] == (6, 10)  # stride 16
    assert anchors.shape[0] == 6 * 10 * 9 == logits.shape[1]
    proposals, valid = voc_model.rpn.proposals([logits, deltas, anchors, images["image_sizes"]], training=False)
    pooled = voc_model.roi_heads.pooler([features, proposals])
    assert tuple(pooled.shape) == (1, 300, 14, 14, 1024)
    class_logits, box_deltas = voc_model.roi_heads.head(pooled)  # logits: no softmax in the head
    assert tuple(class_logits.shape) == (1, 300, 21) and tuple(box_deltas.shape) == (1, 300, 80)


def test_head_parameter_counts_closed_form(voc_model):
    c, feat = 21, 2048
    cls_dense, box_dense = voc_model.roi_heads.head.cls.layer, voc_model.roi_heads.head.box.layer
    assert cls_dense.count_params() == feat * c + c
    assert box_dense.count_params() == feat * 4 * (c - 1) + 4 * (c - 1)
    rpn = voc_model.rpn.head
    assert rpn.count_params() == (3 * 3 * 1024 * 1024 + 1024) + (1024 * 9 + 9) + (1024 * 36 + 36)
    # The head's weights do not depend on how many ROIs it is applied to.
    head = heads.ROIHead(4)
    head(np.zeros((1, 3, 14, 14, 1024), np.float32))
    n3 = head.count_params()
    head(np.zeros((2, 7, 14, 14, 1024), np.float32))
    assert head.count_params() == n3 == build_res5().count_params() + feat * 4 + 4 + feat * 12 + 12


@pytest.mark.parametrize("norm", ["frozen", "group"])
def test_head_processes_each_roi_on_its_own(norm):
    head = heads.ROIHead(4, norm=norm)
    rng = np.random.default_rng(0)
    rois = rng.normal(size=(2, 5, 8, 8, 1024)).astype(np.float32)
    probs, deltas = [t.numpy() for t in head(rois)]
    perm = np.array([3, 0, 4, 1, 2])
    p_probs, p_deltas = [t.numpy() for t in head(rois[:, perm])]
    np.testing.assert_allclose(p_probs, probs[:, perm], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(p_deltas, deltas[:, perm], rtol=1e-4, atol=1e-6)
    changed = rois.copy()
    changed[:, 1:] = rng.normal(size=changed[:, 1:].shape)
    c_probs, _ = head(changed)
    np.testing.assert_allclose(c_probs.numpy()[:, 0], probs[:, 0], rtol=1e-4, atol=1e-6)
    one, _ = head(rois[:1, :1])  # a batch of one ROI gives that ROI's output too
    np.testing.assert_allclose(one.numpy()[0, 0], probs[0, 0], rtol=1e-4, atol=1e-6)


def test_time_distributed_equals_keras_per_step_loop():
    dense = keras.layers.Dense(3)
    x = np.random.default_rng(0).normal(size=(2, 4, 5)).astype(np.float32)
    ours = heads.TimeDistributed(dense)(x).numpy()
    theirs = keras.layers.TimeDistributed(dense)(x).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_detect_outputs_in_original_pixels(tiny_model):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (90, 170, 3), dtype=np.uint8), rng.integers(0, 255, (200, 64, 3), dtype=np.uint8)]
    results = detect(tiny_model, images, batch_size=2)
    assert len(results) == 2
    for image, res in zip(images, results):
        n = len(res["scores"])
        assert res["boxes"].shape == (n, 4) and res["classes"].shape == (n,) and len(res["class_names"]) == n
        assert n > 0  # score_thresh 0: a random model still ranks boxes
        assert np.all(res["boxes"][:, [0, 2]] <= image.shape[1] + 1e-3)
        assert np.all(res["boxes"][:, [1, 3]] <= image.shape[0] + 1e-3)
        assert np.all(res["boxes"] >= 0)
        assert set(res["class_names"]) <= {"circle", "square", "triangle"}
        assert np.all(np.diff(res["scores"]) <= 1e-6)
    # Batching does not change the answer (at equal padded size: padding itself can move a random model's ranks).
    alone = detect(tiny_model, images[:1])[0]
    pair = detect(tiny_model, [images[0], images[0]], batch_size=2)
    for res in pair:
        np.testing.assert_allclose(res["boxes"], alone["boxes"], rtol=1e-4, atol=1e-2)
        np.testing.assert_array_equal(res["classes"], alone["classes"])


def test_detect_rejects_bad_input(tiny_model):
    with pytest.raises(ValueError, match="non-empty list"):
        detect(tiny_model, [])
    with pytest.raises(TypeError, match="list"):
        detect(tiny_model, np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        detect(tiny_model, [np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(ValueError, match="shape"):
        detect(tiny_model, [np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        detect(tiny_model, [np.zeros((0, 10, 3), np.uint8)])


def test_save_and_reload_give_identical_detections(tmp_path):
    # A fresh model: one whose predict function was already traced for other image sizes runs a more general
    # graph, whose float rounding can differ in the last bit.
    cfg = load_config("test.yaml", [CLASSES, "roi_heads.score_thresh=0.0"])
    tiny_model = frcnn.build_model(cfg)
    image = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    before = detect(tiny_model, [image])[0]
    weights = str(tmp_path / "model.weights.h5")
    tiny_model.save_weights(weights)
    again = frcnn.build_model(cfg, load_weights=False)
    load_weights(again, weights)
    after = detect(again, [image])[0]
    np.testing.assert_array_equal(after["boxes"], before["boxes"])
    np.testing.assert_array_equal(after["classes"], before["classes"])
    path = str(tmp_path / "model.keras")
    tiny_model.save(path)
    loaded = keras.saving.load_model(path)
    as_json = lambda config: json.loads(json.dumps(config))  # noqa: E731  (tuples read back as lists)
    assert isinstance(loaded, frcnn.FasterRCNN) and as_json(loaded.get_config()) == as_json(tiny_model.get_config())
    assert loaded.transform.get_config() == tiny_model.transform.get_config()
    assert loaded.class_names == tiny_model.class_names
    reloaded = detect(loaded, [image])[0]
    np.testing.assert_array_equal(reloaded["boxes"], before["boxes"])
    np.testing.assert_array_equal(reloaded["scores"], before["scores"])


def test_backbone_weights_from_local_file(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None)
    path = str(tmp_path / "resnet50.weights.h5")
    source.save_weights(path)
    cfg = load_config("test.yaml", [CLASSES, f"model.backbone_weights={path}", "model.norm=frozen"])
    model = frcnn.build_model(cfg)
    np.testing.assert_array_equal(model.trunk.get_layer("conv4_block6_3_conv").get_weights()[0],
                                  source.get_layer("conv4_block6_3_conv").get_weights()[0])
    np.testing.assert_array_equal(model.roi_heads.head.res5.layer.get_layer("conv5_block1_0_bn").get_weights()[2],
                                  source.get_layer("conv5_block1_0_bn").get_weights()[2])


def test_missing_backbone_weights_file_is_a_clear_error(tmp_path):
    cfg = load_config("test.yaml", [CLASSES, f"model.backbone_weights={tmp_path}/nope.h5"])
    with pytest.raises(BackboneWeightsError, match="nope.h5"):
        frcnn.build_model(cfg)


def test_whole_step_xla_gives_the_same_losses_and_detections():
    """train.jit_compile: Keras compiles the whole train and predict steps with XLA (every op is keras.ops)."""
    from frcnn import optim

    # Every anchor and proposal sampled: the losses do not depend on the random draws.
    cfg = load_config("test.yaml", [CLASSES, "roi_heads.score_thresh=0.0", "rpn.batch_size_per_image=100000",
                                    "rpn.positive_fraction=1.0", "roi_heads.num_rois=72",
                                    "roi_heads.positive_fraction=1.0", "train.lr=0.000000001", "train.warmup_steps=0"])
    model = frcnn.build_model(cfg)
    rng = np.random.default_rng(5)
    gt = np.zeros((2, cfg.input.max_gt, 4), np.float32)
    gt[:, 0] = [[10, 12, 60, 50], [20, 40, 90, 100]]
    valid = np.zeros((2, cfg.input.max_gt), bool)
    valid[:, 0] = True
    batch = {"images": rng.uniform(0, 255, (2, 128, 128, 3)).astype(np.float32),
             "image_sizes": np.array([[128, 128], [112, 128]], np.int32), "gt_boxes": gt,
             "gt_classes": valid.astype(np.int32), "gt_valid": valid}
    plain = {k: float(v) for k, v in model(batch, training=True).items()}
    xla = tf.function(lambda b: model(b, training=True), jit_compile=True)
    compiled = {k: float(v) for k, v in xla(batch).items()}
    for name, value in plain.items():
        assert compiled[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    inputs = {"images": batch["images"], "image_sizes": batch["image_sizes"]}
    expected = model.predict_on_batch(inputs)
    model.compile(optimizer=optim.make_optimizer(cfg, steps_per_epoch=10), jit_compile=True)
    assert model.jit_compile  # Keras keeps XLA on: no layer declares supports_jit = False any more
    got = model.predict_on_batch(inputs)
    np.testing.assert_array_equal(got["num_detections"], expected["num_detections"])
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["boxes"], expected["boxes"], rtol=1e-4, atol=1e-3)
    logs = model.train_on_batch(batch, return_dict=True)  # the whole train step under XLA (lr ~ 0)
    assert logs["loss"] == pytest.approx(sum(plain.values()), rel=1e-4)


def test_faster_rcnn_is_composed_of_the_parts_it_is_given(tmp_path):
    """FasterRCNN reads no config: parts made by hand give the same model as build_model, its config serialises the
    parts (keras-hub style) and each part owns one box coder, shared with what encodes or decodes for it."""
    from frcnn.backbone import build_trunk
    from frcnn.model import FasterRCNN
    from frcnn.roi_heads import ROIHeads
    from frcnn.rpn import RPN
    from frcnn.transform import ImageTransform

    cfg = load_config("test.yaml", [CLASSES])
    keras.utils.set_random_seed(3)
    built = frcnn.build_model(cfg, load_weights=False)
    assert not hasattr(built, "cfg")
    keras.utils.set_random_seed(3)
    by_hand = FasterRCNN(build_trunk(cfg.model.norm, cfg.model.freeze_at), RPN.from_cfg(cfg), ROIHeads.from_cfg(cfg),
                         ImageTransform.from_input_config(cfg.input), cfg.data.classes, name="faster_rcnn")
    by_hand.build_for_inference()
    assert by_hand.get_config() == built.get_config()
    assert [v.path for v in by_hand.weights] == [v.path for v in built.weights]
    clone = FasterRCNN.from_config(built.get_config())
    clone.build_for_inference()
    assert clone.get_config() == built.get_config() and clone.count_params() == built.count_params()
    assert built.rpn.proposals.box_coder is built.rpn.box_coder
    assert built.roi_heads.decoder.box_coder is built.roi_heads.box_coder
    assert built.rpn.box_coder.weights == cfg.rpn.box_weights
    assert built.roi_heads.box_coder.weights == cfg.roi_heads.box_weights


def test_from_preset_loads_a_work_directory_and_names_unknown_presets(tmp_path):
    from frcnn.config import ConfigError, save_config

    cfg = load_config("test.yaml", [CLASSES, "roi_heads.score_thresh=0.0"])
    model = frcnn.build_model(cfg, load_weights=False)
    (tmp_path / "checkpoints").mkdir()
    model.save_weights(str(tmp_path / "checkpoints" / "last.weights.h5"))
    save_config(cfg, str(tmp_path / "config.yaml"))
    loaded = frcnn.FasterRCNN.from_preset(str(tmp_path))
    image = np.random.default_rng(2).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    np.testing.assert_allclose(detect(loaded, [image])[0]["scores"], detect(model, [image])[0]["scores"],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="detectron2_coco_r50_c4_3x"):
        frcnn.FasterRCNN.from_preset("no_such_preset")
