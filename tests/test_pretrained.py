"""Detectron2 weights (frcnn/pretrained.py): conversion, permutations, refusals, the SHA-256 cache check, R-50.pkl.

Every checkpoint here is written by the test in Detectron2's (or Caffe2's) format with random values; nothing is
downloaded (the download function is replaced). Expected values are computed from Detectron2's definitions written
out here in NumPy, not with the conversion's own helpers.
"""

import json
import logging
import os
import pickle

import numpy as np
import pytest

import frcnn
from frcnn import loading, pretrained
from frcnn.config import load_config

D2_EPS = 1e-5
BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}
ANCHORS_D2 = ["model.anchor_sizes=[32,64,128,256,512]", "model.anchor_ratios=[0.5,1,2]"]
CLASSES = "data.classes=[cat,dog]"  # K = 2 foreground classes


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(pretrained.registry, "_get_file", refuse)


# ----------------------------------------------------------------------------------- Detectron2-format files


def d2_resnet_shapes():
    """Detectron2 R50-C4 ResNet parameter names and shapes (stem + res2-4 in the backbone, res5 in roi_heads)."""
    shapes = {"backbone.stem.conv1.weight": (64, 3, 7, 7)}
    norms = {"backbone.stem.conv1": 64}
    in_ch = 64
    for stage, blocks in BLOCKS.items():
        width = 64 * 2 ** (stage - 2)
        out = 4 * width
        prefix = "roi_heads.res5" if stage == 5 else f"backbone.res{stage}"
        for i in range(blocks):
            block = f"{prefix}.{i}"
            if i == 0:
                shapes[f"{block}.shortcut.weight"] = (out, in_ch, 1, 1)
                norms[f"{block}.shortcut"] = out
            shapes[f"{block}.conv1.weight"] = (width, in_ch, 1, 1)
            shapes[f"{block}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{block}.conv3.weight"] = (out, width, 1, 1)
            norms.update({f"{block}.conv1": width, f"{block}.conv2": width, f"{block}.conv3": out})
            in_ch = out
    for module, n in norms.items():
        for t in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{module}.norm.{t}"] = (n,)
    return shapes


def d2_state_dict(num_classes=2, num_anchors=15, rpn_channels=256, seed=0):
    rng = np.random.default_rng(seed)
    shapes = d2_resnet_shapes()
    shapes.update({
        "proposal_generator.rpn_head.conv.weight": (rpn_channels, 1024, 3, 3),
        "proposal_generator.rpn_head.conv.bias": (rpn_channels,),
        "proposal_generator.rpn_head.objectness_logits.weight": (num_anchors, rpn_channels, 1, 1),
        "proposal_generator.rpn_head.objectness_logits.bias": (num_anchors,),
        "proposal_generator.rpn_head.anchor_deltas.weight": (4 * num_anchors, rpn_channels, 1, 1),
        "proposal_generator.rpn_head.anchor_deltas.bias": (4 * num_anchors,),
        "roi_heads.box_predictor.cls_score.weight": (num_classes + 1, 2048),
        "roi_heads.box_predictor.cls_score.bias": (num_classes + 1,),
        "roi_heads.box_predictor.bbox_pred.weight": (4 * num_classes, 2048),
        "roi_heads.box_predictor.bbox_pred.bias": (4 * num_classes,),
    })
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("running_var"):
            sd[name] = rng.uniform(0.01, 2.0, shape).astype(np.float32)
        elif name.endswith(".weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        else:
            sd[name] = rng.standard_normal(shape).astype(np.float32)
    return sd


def write_d2(path, sd, extra_model=None, **top):
    model = dict(sd)
    model.update(extra_model if extra_model is not None else {
        "pixel_mean": np.array([[[103.53]], [[116.28]], [[123.675]]], np.float32),
        "pixel_std": np.ones((3, 1, 1), np.float32),
    })
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", **top}, f)
    return str(path)


def c2_name(d2):
    """Detectron2 ResNet name -> the MSRA R-50.pkl (Caffe2) name."""
    if d2.startswith("backbone.stem.conv1"):
        return {"backbone.stem.conv1.weight": "conv1_w", "backbone.stem.conv1.norm.weight": "res_conv1_bn_s",
                "backbone.stem.conv1.norm.bias": "res_conv1_bn_b"}[d2]
    parts = d2.split(".")[1:]  # drop backbone. / roi_heads.
    stage, block, branch = parts[0][3], parts[1], parts[2]
    branch = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}[branch]
    if parts[3] == "norm":
        return f"res{stage}_{block}_{branch}_bn_" + {"weight": "s", "bias": "b"}[parts[4]]
    return f"res{stage}_{block}_{branch}_w"


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config("test.yaml", [CLASSES, "model.norm=frozen", *ANCHORS_D2])
    return frcnn.build_model(cfg, load_weights=False)


@pytest.fixture(scope="module")
def d2_file(tmp_path_factory):
    sd = d2_state_dict()
    return sd, write_d2(tmp_path_factory.mktemp("d2") / "model_final_test.pkl", sd)


# ----------------------------------------------------------------------------------------------- conversion


def _keras_bn(layer, x):
    return np.asarray(layer(x.astype(np.float32), training=False))


def test_every_tensor_lands_in_the_right_keras_variable(tiny_model, d2_file, caplog):
    sd, path = d2_file
    with caplog.at_level(logging.INFO, logger="frcnn.pretrained"):
        pretrained.load_detector_weights(tiny_model, path)
    assert "pixel_mean" in caplog.text  # ignored, and said so
    trunk, res5 = tiny_model.trunk, tiny_model.roi_heads.head.res5.layer
    checked = set()

    def keras_layer(name):
        for owner in (trunk, res5):
            try:
                return owner.get_layer(name)
            except ValueError:
                pass
        raise KeyError(name)

    for d2, conv_name, bn_name, _ in pretrained.resnet_plan():
        conv, bn = keras_layer(conv_name), keras_layer(bn_name)
        w = sd[d2 + ".weight"]
        np.testing.assert_array_equal(conv.kernel.numpy(), w.transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(conv.bias.numpy(), 0.0)  # Detectron2's ResNet convs have no bias
        g, b, m, v = (sd[f"{d2}.norm.{t}"] for t in ("weight", "bias", "running_mean", "running_var"))
        gamma, beta, mean, var = (x.numpy() for x in bn.weights)
        np.testing.assert_allclose(gamma, g / np.sqrt(v.astype(np.float64) + D2_EPS), rtol=1e-6)
        np.testing.assert_array_equal(beta, b)
        np.testing.assert_array_equal(mean, m)
        np.testing.assert_allclose(var + bn.epsilon, 1.0, rtol=1e-7)
        # The affine map itself, against FrozenBatchNorm2d's formula in float64
        x = np.random.default_rng(1).standard_normal((2, 3, 3, g.shape[0])) * 3
        want = (x - m) / np.sqrt(v.astype(np.float64) + D2_EPS) * g + b
        np.testing.assert_allclose(_keras_bn(bn, x), want, rtol=2e-5, atol=2e-5)
        checked.update([d2 + ".weight"] + [f"{d2}.norm.{t}" for t in ("weight", "bias", "running_mean",
                                                                        "running_var")])

    rpn = tiny_model.rpn.head
    for layer, d2 in ((rpn.conv, "conv"), (rpn.objectness, "objectness_logits"), (rpn.deltas, "anchor_deltas")):
        w, b = sd[f"proposal_generator.rpn_head.{d2}.weight"], sd[f"proposal_generator.rpn_head.{d2}.bias"]
        np.testing.assert_array_equal(layer.kernel.numpy(), w.transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(layer.bias.numpy(), b)
        checked.update([f"proposal_generator.rpn_head.{d2}.weight", f"proposal_generator.rpn_head.{d2}.bias"])

    cls, box = tiny_model.roi_heads.head.cls.layer, tiny_model.roi_heads.head.box.layer
    w, b = sd["roi_heads.box_predictor.cls_score.weight"], sd["roi_heads.box_predictor.cls_score.bias"]
    np.testing.assert_array_equal(cls.kernel.numpy()[:, 0], w[2])  # background: last row there, column 0 here
    np.testing.assert_array_equal(cls.kernel.numpy()[:, 1:], w[:2].T)
    np.testing.assert_array_equal(cls.bias.numpy(), [b[2], b[0], b[1]])
    w, b = sd["roi_heads.box_predictor.bbox_pred.weight"], sd["roi_heads.box_predictor.bbox_pred.bias"]
    np.testing.assert_array_equal(box.kernel.numpy(), w.T)
    np.testing.assert_array_equal(box.bias.numpy(), b)
    checked.update(n for n in sd if n.startswith("roi_heads.box_predictor."))
    assert checked == set(sd)  # every tensor of the file was checked against its variable


def _conv_nchw(x, w, stride=1, pad=0):
    """PyTorch conv2d (no bias), NCHW / (out, in, kh, kw), in float64."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def _frozen_bn(x, sd, module):
    g, b, m, v = (sd[f"{module}.norm.{t}"].astype(np.float64).reshape(1, -1, 1, 1)
                  for t in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + D2_EPS) * g + b


def _maxpool_nchw(x):
    """F.max_pool2d(kernel 3, stride 2, padding 1): padding is -inf."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    oh, ow = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    return np.max([x[:, :, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], axis=0)


def test_converted_stem_and_res2_block_compute_detectron2s_function(tiny_model, d2_file):
    """Stem (conv 7x7/2 + FrozenBN + ReLU + max pool) and res2.0 (bottleneck with projection shortcut) in NumPy,
    written as Detectron2 defines them, against the converted Keras trunk."""
    import keras

    sd, path = d2_file
    pretrained.load_detector_weights(tiny_model, path)
    x = np.random.default_rng(2).uniform(-120, 130, (1, 3, 35, 42))  # BGR minus mean, NCHW

    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    y = relu(_frozen_bn(_conv_nchw(x, sd["backbone.stem.conv1.weight"], 2, 3), sd, "backbone.stem.conv1"))
    y = _maxpool_nchw(y)
    b = "backbone.res2.0"
    short = _frozen_bn(_conv_nchw(y, sd[b + ".shortcut.weight"]), sd, b + ".shortcut")
    z = relu(_frozen_bn(_conv_nchw(y, sd[b + ".conv1.weight"]), sd, b + ".conv1"))
    z = relu(_frozen_bn(_conv_nchw(z, sd[b + ".conv2.weight"], 1, 1), sd, b + ".conv2"))
    z = _frozen_bn(_conv_nchw(z, sd[b + ".conv3.weight"]), sd, b + ".conv3")
    want = relu(z + short).transpose(0, 2, 3, 1)

    trunk = tiny_model.trunk
    sub = keras.Model(trunk.input, trunk.get_layer("conv2_block1_out").output)
    got = np.asarray(sub(x.transpose(0, 2, 3, 1).astype(np.float32)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_frozen_bn_values_exact_in_float32():
    rng = np.random.default_rng(3)
    w, b, m = rng.standard_normal((3, 64))
    v = rng.uniform(1e-6, 5.0, 64)  # down to tiny variances, where an epsilon mismatch would show
    gamma, beta, mean, var = pretrained.frozen_bn_values(w, b, m, v, keras_epsilon=1.001e-5)
    x = rng.standard_normal((10, 64)) * 2 + m
    keras_like = (x - mean) / np.sqrt(var.astype(np.float32) + np.float32(1.001e-5)) * gamma + beta
    d2 = (x - m) / np.sqrt(v + 1e-5) * w + b
    np.testing.assert_allclose(keras_like, d2, rtol=1e-5, atol=1e-5)
    # Unfolded (norms that train): gamma stays the weight, the variance absorbs the epsilon difference
    gamma, _, _, var = pretrained.frozen_bn_values(w, b, m, v, 1.001e-5, fold=False)
    np.testing.assert_array_equal(gamma, w.astype(np.float32))
    np.testing.assert_allclose(var.astype(np.float64) + 1.001e-5, v + 1e-5, rtol=1e-6)


# ------------------------------------------------------------------------------ hand-computed permutations


def test_anchor_order_and_rpn_channels_need_no_permutation(tiny_model, tmp_path):
    """A hand-made case: the hidden RPN state is the constant e0, objectness bias 10 * a and delta bias 100 * a + k.

    Detectron2 (rpn.py) reads objectness as (N, A, H, W) -> (N, H, W, A) and deltas as (N, A, 4, H, W) ->
    (N, H, W, A, 4); its cell anchors are size-major then ratio with w = sqrt(s^2 / r), h = r * w. frcnn's anchor
    (y * W + x) * A + a must get logit 10 * a and deltas 100 * a + k, and cell anchor a the same box.
    """
    from frcnn import anchors as anchor_lib

    sd = d2_state_dict(seed=4)
    c = sd["proposal_generator.rpn_head.conv.weight"].shape[0]
    sd["proposal_generator.rpn_head.conv.weight"][:] = 0.0
    sd["proposal_generator.rpn_head.conv.bias"][:] = 0.0
    sd["proposal_generator.rpn_head.conv.bias"][0] = 1.0  # relu(conv) == e0 everywhere
    sd["proposal_generator.rpn_head.objectness_logits.weight"][:] = 0.0
    sd["proposal_generator.rpn_head.objectness_logits.bias"][:] = 10.0 * np.arange(15)
    sd["proposal_generator.rpn_head.anchor_deltas.weight"][:] = 0.0
    sd["proposal_generator.rpn_head.anchor_deltas.weight"][7, 0, 0, 0] = 0.5  # anchor 1, k = 3: reads e0
    sd["proposal_generator.rpn_head.anchor_deltas.bias"][:] = (100.0 * np.arange(15)[:, None]
                                                               + np.arange(4)[None, :]).reshape(-1)
    pretrained.load_detector_weights(tiny_model, write_d2(tmp_path / "rpn.pkl", sd))
    assert c == tiny_model.rpn.channels

    h, w = 2, 3
    logits, deltas = tiny_model.rpn.head(np.zeros((1, h, w, 1024), np.float32))
    logits, deltas = np.asarray(logits), np.asarray(deltas)
    for y in range(h):
        for x in range(w):
            for a in range(15):
                i = (y * w + x) * 15 + a
                assert logits[0, i] == pytest.approx(10.0 * a)
                want = [100.0 * a + k + (0.5 if (a, k) == (1, 3) else 0.0) for k in range(4)]
                np.testing.assert_allclose(deltas[0, i], want, rtol=1e-6)

    cell = anchor_lib.cell_anchors((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    # Detectron2 generate_cell_anchors by hand: a = 0 is (32, 0.5): w = sqrt(1024 / 0.5) = 45.2548, h = 22.6274
    np.testing.assert_allclose(cell[0], [-22.6274, -11.3137, 22.6274, 11.3137], atol=1e-3)
    np.testing.assert_allclose(cell[1], [-16, -16, 16, 16], atol=1e-5)  # (32, 1)
    np.testing.assert_allclose(cell[2], [-11.3137, -22.6274, 11.3137, 22.6274], atol=1e-3)  # (32, 2)
    np.testing.assert_allclose(cell[4], [-32, -32, 32, 32], atol=1e-5)  # (64, 1): size-major
    np.testing.assert_allclose(cell[14], [-181.0193, -362.0387, 181.0193, 362.0387], atol=1e-3)  # (512, 2)


def test_class_and_box_permutation_hand_case(tiny_model, tmp_path):
    """K = 2: Detectron2's cls_score rows are (cat, dog, background), bbox_pred rows (cat dx..dh, dog dx..dh)."""
    sd = d2_state_dict(seed=5)
    sd["roi_heads.box_predictor.cls_score.weight"][:] = 0.0
    sd["roi_heads.box_predictor.cls_score.bias"][:] = [1.0, 2.0, 3.0]  # logits: cat 1, dog 2, background 3
    sd["roi_heads.box_predictor.bbox_pred.weight"][:] = 0.0
    sd["roi_heads.box_predictor.bbox_pred.bias"][:] = [10, 11, 12, 13, 20, 21, 22, 23]
    pretrained.load_detector_weights(tiny_model, write_d2(tmp_path / "cls.pkl", sd))
    assert tiny_model.class_names == ("__background__", "cat", "dog")
    feats = np.random.default_rng(0).standard_normal((1, 2048)).astype(np.float32)
    logits = np.asarray(tiny_model.roi_heads.head.cls.layer(feats))[0]  # the class layer emits logits
    np.testing.assert_allclose(logits, [3.0, 1.0, 2.0], rtol=1e-6)  # background, cat, dog
    deltas = np.asarray(tiny_model.roi_heads.head.box.layer(feats))[0]
    np.testing.assert_array_equal(deltas, [10, 11, 12, 13, 20, 21, 22, 23])  # 4 * (c - 1) + k for c = cat, dog
    np.testing.assert_array_equal(pretrained.class_permutation(2), [2, 0, 1])


# ------------------------------------------------------------------------------------------------ refusals


def _weights(model):
    return [v.numpy().copy() for v in model.weights]


@pytest.mark.parametrize("case", ["missing", "misshaped", "r101_block", "fpn"])
def test_bad_checkpoints_are_refused_by_name_and_change_nothing(tiny_model, tmp_path, case):
    sd = d2_state_dict(seed=6)
    if case == "missing":
        del sd["backbone.res3.2.conv2.norm.running_var"]
        match = r"backbone\.res3\.2\.conv2\.norm\.running_var' is missing"
    elif case == "misshaped":
        sd["roi_heads.res5.1.conv2.weight"] = np.zeros((512, 512, 1, 1), np.float32)
        match = r"roi_heads\.res5\.1\.conv2\.weight' has shape \(512, 512, 1, 1\), expected \(512, 512, 3, 3\)"
    elif case == "r101_block":
        for name in [n for n in sd if n.startswith("backbone.res4.5.")]:
            sd[name.replace("res4.5.", "res4.6.")] = sd[name]
        match = r"backbone\.res4\.6\..*deeper ResNet"
    else:
        sd = {n.replace("backbone.", "backbone.bottom_up."): v for n, v in sd.items()}
        match = r"backbone\.stem\.conv1\.weight' is missing.*FPN"
    path = write_d2(tmp_path / f"{case}.pkl", sd)
    before = _weights(tiny_model)
    with pytest.raises(pretrained.PretrainedError, match=match):
        pretrained.load_detector_weights(tiny_model, path)
    for a, b in zip(before, _weights(tiny_model)):
        np.testing.assert_array_equal(a, b)


def test_wrong_class_count_and_anchor_count_are_explained(tiny_model, tmp_path):
    path = write_d2(tmp_path / "k80.pkl", d2_state_dict(num_classes=80, seed=7))
    with pytest.raises(pretrained.PretrainedError, match=r"80 classes.*data\.classes"):
        pretrained.load_detector_weights(tiny_model, path)
    path = write_d2(tmp_path / "a9.pkl", d2_state_dict(num_anchors=9, seed=7))
    with pytest.raises(pretrained.PretrainedError, match=r"9 anchors per location, this model 15"):
        pretrained.load_detector_weights(tiny_model, path)


def test_unknown_extra_keys_are_reported_expected_ones_ignored(tiny_model, tmp_path, caplog):
    extra = {"pixel_mean": np.zeros((3, 1, 1), np.float32),
             "proposal_generator.anchor_generator.cell_anchors.0": np.zeros((15, 4), np.float32),
             "roi_heads.mask_head.predictor.weight": np.zeros((80, 256, 1, 1), np.float32)}
    path = write_d2(tmp_path / "extra.pkl", d2_state_dict(seed=8), extra_model=extra,
                    optimizer={"state": {}}, scheduler={}, iteration=90000)
    with caplog.at_level(logging.INFO, logger="frcnn.pretrained"):
        pretrained.load_detector_weights(tiny_model, path)
    unused = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "not used" in r.getMessage()]
    assert len(unused) == 1 and "roi_heads.mask_head.predictor.weight" in unused[0]
    assert "pixel_mean" not in unused[0] and "cell_anchors" not in unused[0]
    assert "ignored 2 entries expected to be unused" in caplog.text


def test_not_a_pickle_is_refused(tmp_path):
    path = tmp_path / "model_final_cut.pkl"
    path.write_bytes(pickle.dumps({"model": {}})[:5])
    with pytest.raises(pretrained.PretrainedError, match="model_final_cut.pkl"):
        pretrained.read_checkpoint(str(path))


# ---------------------------------------------------------------------------------------- zoo and the cache


def test_zoo_names_and_urls_are_detectron2s():
    assert pretrained.zoo_entry("detectron2:COCO-Detection/faster_rcnn_R_50_C4_3x").url == (
        "https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_50_C4_3x/137849393/"
        "model_final_f97cb7.pkl")
    assert pretrained.zoo_entry("detectron2:COCO-Detection/faster_rcnn_R_50_C4_1x.yaml").url.endswith(
        "/137257644/model_final_721ade.pkl")
    assert pretrained.zoo_entry("detectron2:PascalVOC-Detection/faster_rcnn_R_50_C4").url.endswith(
        "PascalVOC-Detection/faster_rcnn_R_50_C4/142202221/model_final_b1acc2.pkl")
    assert pretrained.zoo_entry("detectron2:ImageNetPretrained/MSRA/R-50").url == (
        "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl")
    with pytest.raises(pretrained.PretrainedError, match="faster_rcnn_R_50_C4_3x"):
        pretrained.zoo_entry("detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x")
    for entry in pretrained.ZOO.values():
        if entry.config:
            cfg = load_config(entry.config)
            classes = pretrained.VOC_CLASSES if "VOC" in entry.name else pretrained.COCO_CLASSES
            assert tuple(cfg.data.classes) == classes
            a, r, h, i = cfg.anchors, cfg.rpn, cfg.roi_heads, cfg.input
            assert (i.test_min_size, i.max_size, i.size_divisibility) == (800, 1333, 1)
            assert tuple(i.pixel_mean) == (103.530, 116.280, 123.675) and i.channel_order == "bgr"
            assert (a.sizes, a.ratios, a.offset) == ((32, 64, 128, 256, 512), (0.5, 1, 2), 0)
            assert (r.pre_nms_topk_test, r.post_nms_topk_test, r.nms_thresh) == (6000, 1000, 0.7)
            assert (h.score_thresh, h.nms_thresh, h.max_detections) == (0.05, 0.5, 100)
            assert (h.sampling_ratio, h.pool_size, cfg.model.norm, h.num_rois) == (0, 14, "frozen", 512)
            assert (r.smooth_l1_beta, h.smooth_l1_beta) == (0.0, 0.0)
            t = cfg.train
            iters = t.steps_per_epoch * t.epochs
            steps = [e * t.steps_per_epoch for e in t.lr_decay_epochs]
            want = {"faster_rcnn_R_50_C4_1x": (90000, [60000, 80000], 1000),
                    "faster_rcnn_R_50_C4_3x": (270000, [210000, 250000], 1000),
                    "faster_rcnn_R_50_C4": (18000, [12000, 16000], 100)}[entry.name.split("/")[1]]
            assert (iters, steps, t.warmup_steps) == want
            assert (t.batch_size, t.lr) == (16, 0.02)


def _fake_download(source):
    calls = []

    def get_file(fname, origin, cache_dir, cache_subdir):
        target = os.path.join(cache_dir, cache_subdir, fname)
        if not os.path.exists(target):  # keras.utils.get_file downloads only when the file is not cached
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(source, "rb") as f, open(target, "wb") as g:
                g.write(f.read())
            calls.append(origin)
        return target

    return get_file, calls


def test_sha256_recorded_on_arrival_and_a_modified_cache_is_caught(d2_file, tmp_path, monkeypatch, caplog):
    _, source = d2_file
    get_file, calls = _fake_download(source)
    monkeypatch.setattr(pretrained.registry, "_get_file", get_file)
    spec = "detectron2:COCO-Detection/faster_rcnn_R_50_C4_3x"
    with caplog.at_level(logging.INFO, logger="frcnn.pretrained"):
        path = pretrained.resolve(spec, cache_dir=str(tmp_path))
    assert calls == [pretrained.ZOO["COCO-Detection/faster_rcnn_R_50_C4_3x"].url]
    assert path == str(tmp_path / "detectron2" / "137849393_model_final_f97cb7.pkl")
    recorded = open(path + ".sha256").read().split()[0]
    assert recorded == pretrained.sha256_file(source)
    assert "recorded its SHA-256" in caplog.text
    assert pretrained.resolve(spec, cache_dir=str(tmp_path)) == path  # later load: checked, not downloaded
    assert len(calls) == 1
    with open(path, "r+b") as f:  # one flipped byte in the cached file
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(pretrained.PretrainedError, match=r"SHA-256.*modified, truncated or replaced"):
        pretrained.resolve(spec, cache_dir=str(tmp_path))
    with pytest.raises(pretrained.PretrainedError, match="SHA-256"):  # the tools' path refuses it too
        loading.load_pretrained_model(spec, "test.yaml", [CLASSES], cache_dir=str(tmp_path))


def test_a_cached_file_without_record_is_recorded_with_a_warning(d2_file, tmp_path, monkeypatch, caplog):
    _, source = d2_file
    get_file, calls = _fake_download(source)
    monkeypatch.setattr(pretrained.registry, "_get_file", get_file)
    target = tmp_path / "detectron2" / "142202221_model_final_b1acc2.pkl"
    target.parent.mkdir()
    target.write_bytes(open(source, "rb").read())
    with caplog.at_level(logging.WARNING, logger="frcnn.pretrained"):
        pretrained.resolve("detectron2:PascalVOC-Detection/faster_rcnn_R_50_C4", cache_dir=str(tmp_path))
    assert calls == [] and "without a SHA-256 record" in caplog.text
    assert (tmp_path / "detectron2" / "142202221_model_final_b1acc2.pkl.sha256").exists()


def test_download_failure_says_how_to_work_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(pretrained.registry, "_get_file", offline)
    with pytest.raises(pretrained.PretrainedError, match=r"could not download.*pass its path"):
        pretrained.resolve("detectron2:COCO-Detection/faster_rcnn_R_50_C4_1x", cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------ R-50.pkl, fine-tuning


@pytest.mark.parametrize("layout", ["flat", "blobs"])
def test_r50_pkl_loads_into_trunk_and_res5(tmp_path, layout, caplog):
    rng = np.random.default_rng(9)
    blobs = {}
    for name, shape in d2_resnet_shapes().items():
        if "running_" in name:
            continue  # Caffe2's affine norm: scale and bias only
        blobs[c2_name(name)] = rng.standard_normal(shape).astype(np.float32)
    blobs["conv1_b"] = np.full((64,), 1e-9, np.float32)  # present in MSRA's file, unused by Detectron2
    blobs["fc1000_w"] = rng.standard_normal((1000, 2048)).astype(np.float32)
    blobs["fc1000_b"] = np.zeros((1000,), np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.zeros((64, 64, 1, 1), np.float32)
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(blobs if layout == "flat" else {"blobs": blobs}, f)

    cfg = load_config("test.yaml", [CLASSES, "model.norm=frozen", f"model.backbone_weights={path}",
                                    "input.pixel_mean=[103.530,116.280,123.675]"])
    with caplog.at_level(logging.INFO, logger="frcnn.pretrained"):
        model = frcnn.build_model(cfg)  # model.backbone_weights names R-50.pkl: frcnn.pretrained converts it
    assert "trunk and res5" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    owners = (model.trunk, model.roi_heads.head.res5.layer)
    for d2, conv_name, bn_name, part in pretrained.resnet_plan():
        owner = owners[part == "res5"]
        conv, bn = owner.get_layer(conv_name), owner.get_layer(bn_name)
        np.testing.assert_array_equal(conv.kernel.numpy(), blobs[c2_name(d2 + ".weight")].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(conv.bias.numpy(), 0.0)
        s, b = blobs[c2_name(d2 + ".norm.weight")], blobs[c2_name(d2 + ".norm.bias")]
        x = rng.standard_normal((1, 2, 2, s.shape[0]))
        np.testing.assert_allclose(_keras_bn(bn, x), x * s + b, rtol=1e-5, atol=1e-5)  # exactly x * s + b


def test_r50_pkl_of_another_depth_is_refused(tmp_path):
    blobs = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "res4_22_branch2a_w": np.zeros((256, 1024, 1, 1))}
    path = tmp_path / "R-101.pkl"
    with open(path, "wb") as f:
        pickle.dump(blobs, f)
    cfg = load_config("test.yaml", [CLASSES, "model.norm=frozen"])
    model = frcnn.build_model(cfg, load_weights=False)
    with pytest.raises(pretrained.PretrainedError, match=r"key 'res_conv1_bn_s \(Detectron2 name backbone\.stem\.conv1"
                                                         r"\.norm\.weight\)' is missing.*deeper ResNet"):
        pretrained.load_initial_weights(model, str(path))


def test_finetuning_from_a_coco_checkpoint_keeps_new_class_and_box_layers(tiny_model, tmp_path, caplog):
    sd = d2_state_dict(num_classes=80, seed=10)
    path = write_d2(tmp_path / "model_final_coco.pkl", sd)
    cls_before = tiny_model.roi_heads.head.cls.layer.kernel.numpy().copy()
    with caplog.at_level(logging.INFO, logger="frcnn.pretrained"):
        pretrained.load_initial_weights(tiny_model, path)
    assert "class and box layers are new" in caplog.text and "trunk, RPN and res5" in caplog.text
    np.testing.assert_array_equal(tiny_model.roi_heads.head.cls.layer.kernel.numpy(), cls_before)
    np.testing.assert_array_equal(tiny_model.rpn.head.deltas.kernel.numpy(),
                                  sd["proposal_generator.rpn_head.anchor_deltas.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(tiny_model.roi_heads.head.res5.layer.get_layer("conv5_block3_3_conv").kernel.numpy(),
                                  sd["roi_heads.res5.2.conv3.weight"].transpose(2, 3, 1, 0))


def test_group_norm_is_refused(tmp_path, d2_file):
    cfg = load_config("test.yaml", [CLASSES, *ANCHORS_D2])  # test.yaml: norm group
    model = frcnn.build_model(cfg, load_weights=False)
    with pytest.raises(pretrained.PretrainedError, match="model.norm: group"):
        pretrained.load_detector_weights(model, d2_file[1])


# ------------------------------------------------------------------------------------------ tools, configs


def test_default_configs():
    assert pretrained.default_config("detectron2:COCO-Detection/faster_rcnn_R_50_C4_1x") == \
        "detectron2_coco_R50_C4_1x.yaml"
    assert pretrained.default_config("/x/model_final_b1acc2.pkl") == "detectron2_voc_R50_C4.yaml"
    ckpt = pretrained.Checkpoint("/x/mine.pkl", "detectron2", {
        "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 2048))}, {}, [])
    assert pretrained.default_config("/x/mine.pkl", ckpt) == "detectron2_coco_R50_C4_3x.yaml"
    with pytest.raises(pretrained.PretrainedError, match="--config"):
        pretrained.default_config("/x/mine.pkl", None)
    with pytest.raises(pretrained.PretrainedError, match="backbone"):
        pretrained.default_config("detectron2:ImageNetPretrained/MSRA/R-50")


def test_infer_tool_with_a_local_pkl(d2_file, tmp_path):
    """tools/infer.py --weights model_final_*.pkl --config ...: detections.json names the .pkl."""
    import sys

    import cv2

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import infer

    image = tmp_path / "photo.jpg"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8))
    out = tmp_path / "out"
    rc = infer.main([str(image), "--weights", d2_file[1], "--config", "test.yaml", "--out", str(out),
                     "--score-thresh", "0.0", "--set", CLASSES, "--set", "model.norm=frozen",
                     "--set", "model.anchor_sizes=[32,64,128,256,512]"])
    assert rc == 0
    doc = json.loads((out / "detections.json").read_text())
    assert doc["weights"] == os.path.abspath(d2_file[1]) and doc["classes"] == ["cat", "dog"]
    assert len(doc["images"]) == 1


def test_coco_results_use_coco_category_ids_with_detectron2_class_order(tmp_path):
    """With data.classes from a detectron2_coco config, class k maps to COCO_CATEGORY_IDS[k - 1] by name, whatever
    order the annotation file lists its categories in."""
    import cv2

    from frcnn.data.coco import load_coco

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    cv2.imwrite(str(root / "val2017" / "a.jpg"), np.zeros((20, 30, 3), np.uint8))
    cats = [{"id": i, "name": n} for i, n in zip(pretrained.COCO_CATEGORY_IDS, pretrained.COCO_CLASSES)][::-1]
    doc = {"images": [{"id": 7, "file_name": "a.jpg", "width": 30, "height": 20}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 8], "iscrowd": 0,
                            "area": 80}],
           "categories": cats}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    cfg = load_config("detectron2_coco_R50_C4_3x.yaml", [f"data.root={root}"])
    records, _ = load_coco(cfg, "val2017")
    assert records.category_ids == pretrained.COCO_CATEGORY_IDS
    assert list(records[0].classes) == [80]  # toothbrush (id 90) is Detectron2's class 79, frcnn's 80
