"""Precision and inference speed-ups keep the detections: folded frozen BatchNorm, bfloat16 against float32."""

import numpy as np
import pytest

import frcnn
from frcnn import backbone
from frcnn.config import load_config
from frcnn.checkpoints import load_weights
from frcnn.inference import detect
from frcnn.data.shapes import render_image

CLASSES = "data.classes=[circle,square,triangle]"


@pytest.fixture
def float32_policy():
    """Tests here switch the global dtype policy (build_model sets it from the config): restore float32 after."""
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")


def _images(count, size=128, seed=5):
    return [render_image(np.random.default_rng([seed, i]), size, 3, False)[0] for i in range(count)]


def _randomise_norms(model, rng):
    """Non-trivial frozen statistics and affine parameters (fresh ones are the identity, which folds trivially)."""
    for layer in model.trunk.layers + model.roi_heads.head.res5.layer.layers:
        if isinstance(layer, backbone.FrozenBatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                               rng.uniform(0.5, 2.0, c)])


def test_folding_frozen_batchnorm_keeps_the_detections(tmp_path, float32_policy):
    cfg = load_config("test.yaml", [CLASSES, "model.norm=frozen", "roi_heads.score_thresh=0.0"])
    model = frcnn.build_model(cfg, load_weights=False)
    _randomise_norms(model, np.random.default_rng(0))
    images = _images(2)
    before = detect(model, images)
    norms = sum(isinstance(layer, backbone.FrozenBatchNormalization)
                for layer in model.trunk.layers + model.roi_heads.head.res5.layer.layers)
    assert norms == 53  # every norm of ResNet-50 (stem 1, res2-res4 33... as built: 43 in the trunk, 10 in res5)
    assert model.fold_batchnorm() == norms
    assert model.fold_batchnorm() == 0  # idempotent
    after = detect(model, images)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b["classes"][:20], a["classes"][:20])
        np.testing.assert_allclose(b["scores"][:20], a["scores"][:20], rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(b["boxes"][:20], a["boxes"][:20], rtol=1e-3, atol=1e-2)

    # Weights saved after folding carry the folded convolutions and identity norms: an unfolded model that loads
    # them computes the same.
    path = str(tmp_path / "folded.weights.h5")
    model.save_weights(path)
    fresh = frcnn.build_model(cfg, load_weights=False)
    fresh.load_weights(path)
    again = detect(fresh, images)
    for a, g in zip(after, again):
        np.testing.assert_allclose(a["scores"][:20], g["scores"][:20], rtol=1e-4, atol=1e-6)


def test_frozen_batchnorm_computes_batchnorm_in_inference_mode(float32_policy):
    import keras

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 5, 8)).astype("float32")
    weights = [rng.uniform(0.5, 1.5, 8), rng.normal(0, 1, 8), rng.normal(0, 1, 8), rng.uniform(0.5, 2, 8)]
    frozen = backbone.FrozenBatchNormalization(epsilon=backbone.BN_EPSILON)
    plain = keras.layers.BatchNormalization(epsilon=backbone.BN_EPSILON)
    frozen.build(x.shape)
    plain.build(x.shape)
    frozen.set_weights(weights)
    plain.set_weights(weights)
    g, b, m, v = weights
    expected = (x - m) / np.sqrt(v + backbone.BN_EPSILON) * g + b
    np.testing.assert_allclose(np.asarray(frozen(x, training=True)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(plain(x, training=False)), expected, rtol=1e-5, atol=1e-5)
    assert not frozen.trainable_weights


def test_bfloat16_detections_agree_with_float32(trained_shapes, tmp_path, float32_policy):
    """The trained small detector under mixed_bfloat16 finds what it finds in float32 (same weights): scored
    against the float32 detections as ground truth, AP50 >= 0.95 and AP (0.5:0.95) >= 0.9: boxes must agree at
    strict IoU thresholds too, so box decoding or RoIAlign's sample positions computed in bfloat16 (coordinates
    off by up to a pixel at this size) would show."""
    import dataclasses

    from frcnn import evaluation

    cfg, model, _, _ = trained_shapes
    path = str(tmp_path / "trained.weights.h5")
    model.save_weights(path)
    syn = cfg.data.synthetic
    images = [render_image(np.random.default_rng([77, i]), syn.image_size, syn.max_objects, False,
                           syn.object_size)[0] for i in range(16)]
    reference = detect(model, images)
    bf16_cfg = cfg.replace(train=dataclasses.replace(cfg.train, mixed_precision="mixed_bfloat16"))
    bf16 = frcnn.build_model(bf16_cfg, load_weights=False)
    bf16.load_weights(path)
    assert bf16.trunk.layers[2].compute_dtype == "bfloat16"
    detections = detect(bf16, images)
    assert all(d["boxes"].dtype == np.float32 and d["scores"].dtype == np.float32 for d in detections)
    # The small model's scores stay low (about 0.45 at most after its 300 steps): its detections above 0.2 are the
    # reference (about 150 on these images when this test was written; AP50 0.997, AP 0.98 in bfloat16).
    assert sum(int(np.sum(r["scores"] >= 0.2)) for r in reference) >= 20  # a meaningful comparison
    metrics = evaluation.agreement(reference, detections, model.class_names[1:], [im.shape[:2] for im in images],
                                   reference_min_score=0.2)
    assert metrics["AP50"] >= 0.95 and metrics["AP"] >= 0.9, {k: metrics[k] for k in ("AP", "AP50", "AP75")}


def test_auto_precision_follows_native_bfloat16():
    from frcnn import precision

    text = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n"
    flags = precision.cpu_flags(text)
    assert {"avx512f", "avx512_bf16", "amx_tile"} <= flags and "amx_bf16" not in flags
    assert precision.native_bfloat16(flags, gpu_capabilities=[])[0]
    assert not precision.native_bfloat16(frozenset({"avx512f", "avx2"}), gpu_capabilities=[])[0]
    assert precision.native_bfloat16(frozenset(), gpu_capabilities=[(8, 0)])[0]  # A100
    assert not precision.native_bfloat16(flags, gpu_capabilities=[(7, 0)])[0]  # V100: the GPU computes, not the CPU
    assert precision.cpu_flags("no flags here") == frozenset()
    expected = "mixed_bfloat16" if precision.native_bfloat16()[0] else "float32"
    assert precision.resolve_policy("auto") == expected
    assert precision.resolve_policy("off") == "float32"


def test_checkpoints_from_plain_batchnorm_frozen_norms_still_load(tmp_path, float32_policy):
    """Keras names a layer's variables in a weights file after its class: checkpoints written when the frozen norms
    were plain BatchNormalization layers (``.../batch_normalization_7/vars/0``) load into FrozenBatchNormalization."""
    import re

    import h5py

    cfg = load_config("test.yaml", [CLASSES, "model.norm=frozen", "roi_heads.score_thresh=0.0"])
    model = frcnn.build_model(cfg, load_weights=False)
    _randomise_norms(model, np.random.default_rng(3))
    path, old = str(tmp_path / "new.weights.h5"), str(tmp_path / "old.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r") as f, h5py.File(old, "w") as out:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        renamed = [re.sub(r"frozen_batch_normalization", "batch_normalization", name) for name in names]
        assert renamed != names
        for name, new in zip(names, renamed):
            out.create_dataset(new, data=f[name][()])
    fresh = frcnn.build_model(cfg, load_weights=False)
    load_weights(fresh, old)  # frcnn.checkpoints: renames old variable paths on the fly
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_speed_paths_are_on_only_where_measured(monkeypatch):
    """train.speed_paths: the matrix-product convolutions and the fused optimizer kernels were measured on a CPU;
    auto turns them on there and off on an accelerator, on/off force them."""
    from frcnn import optim, precision

    cfg = load_config("test.yaml", [CLASSES])

    def paths(setting):
        c = cfg.with_values(train__speed_paths=setting)
        model = frcnn.build_model(c, load_weights=False)
        res5 = model.roi_heads.head.res5.layer.get_layer("conv5_block1_1_conv").matmul_form
        norms = {layer.written_gradient for part in (model.trunk, model.roi_heads.head.res5.layer)
                 for layer in part.layers if isinstance(layer, backbone.GroupNormalization)}
        fused = getattr(optim.make_optimizer(c, 10), "fused_kernels", None)
        return model.rpn.head.conv.matmul_form, res5, norms, fused

    assert paths("on") == ("kernel_grad", "all", {True}, True)
    assert paths("off") == ("none", "none", {False}, False)
    assert not precision.accelerator_present()  # this test machine computes on its CPU
    assert paths("auto") == paths("on")
    monkeypatch.setattr(precision, "_accelerator_cached", lambda: True)  # as on a GPU
    assert paths("auto") == paths("off")
