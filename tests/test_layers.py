"""Tests of frcnn.layers: shapes, serialisation, hand-computed numbers and NumPy oracles (tests/reference.py)."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from frcnn import anchors as anchor_ops
from frcnn import boxes as box_ops
from frcnn.layers import DetectionLayer, ProposalLayer, RoiPoolingConv

import reference as ref
from layer_testing import run_layer_test


def _sorted_boxes(rng, n, x_range, y_range):
    """``(n, 4)`` float32 boxes with corners drawn uniformly in the given ranges (x1 <= x2, y1 <= y2)."""
    xs = np.sort(rng.uniform(*x_range, size=(n, 2)), axis=1)
    ys = np.sort(rng.uniform(*y_range, size=(n, 2)), axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)


def _roi_cases(rng, height, width, stride):
    """Boxes of every awkward kind, in image pixels, for a feature map of ``height x width`` at ``stride``."""
    img_w, img_h = width * stride, height * stride
    special = np.array(
        [
            [0, 0, img_w, img_h],  # the whole image: touches all borders
            [0, 0, stride, stride],  # exactly one cell in the corner
            [img_w - 3 * stride, img_h - 2 * stride, img_w, img_h],  # touching the bottom-right border
            [-2.5 * stride, -1.5 * stride, 2 * stride, 3 * stride],  # crossing the top-left border (samples < -1)
            [img_w - stride, 0.3 * stride, img_w + 2.7 * stride, 2.2 * stride],  # crossing the right border
            [-5 * stride, -5 * stride, -3 * stride, -2 * stride],  # entirely outside: all samples beyond -1
            [img_w + 0.2 * stride, img_h - stride, img_w + 0.9 * stride, img_h],  # outside, within the clamp band
            [5.3, 7.1, 5.9, 7.4],  # tiny, sub-pixel
            [0.2 * stride, 0.4 * stride, 0.45 * stride, 0.5 * stride],  # tiny, sub-cell, near the border
            [12.0, 9.0, 12.0, 9.0],  # zero size
            [1.5 * stride, 0.5 * stride, 2.7 * stride, img_h - 0.2 * stride],  # tall and thin
        ],
        np.float32,
    )
    random = _sorted_boxes(rng, 9, (-1.5 * stride, img_w + 1.5 * stride), (-1.5 * stride, img_h + 1.5 * stride))
    return np.concatenate([special, random], axis=0)


def _reference_batch(features, rois, pool, stride, ratio):
    return np.stack([ref.roi_align(features[b], rois[b], pool, stride, ratio) for b in range(len(features))])


# ----------------------------------------------------------------------------------------------------------------
# tests/reference.py itself (other tests rely on it)


def test_reference_oracle_basics():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 0, 0]], np.float64)
    np.testing.assert_allclose(ref.iou(a, a), [[1, 25 / 175, 0], [25 / 175, 1, 0], [0, 0, 0]])
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 9]], np.float64)
    assert ref.nms(boxes, [0.9, 0.95, 0.5, 0.1], 0.5).tolist() == [1, 2]
    rng = np.random.default_rng(0)
    anchors_np = _sorted_boxes(rng, 20, (0, 100), (0, 100)) + np.array([0, 0, 1, 1], np.float32)
    targets = _sorted_boxes(rng, 20, (0, 100), (0, 100)) + np.array([0, 0, 1, 1], np.float32)
    deltas = ref.encode(anchors_np, targets, (10, 10, 5, 5))
    np.testing.assert_allclose(ref.decode(deltas, anchors_np, (10, 10, 5, 5)), targets, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        box_ops.BoxCoder((10, 10, 5, 5)).decode(deltas.astype(np.float32), anchors_np).numpy(), targets, atol=1e-3
    )


# ----------------------------------------------------------------------------------------------------------------
# RoiPoolingConv


def test_roi_pooling_output_shape_c4():
    features = tf.random.normal([1, 4, 5, 1024])
    rois = tf.constant([[[0, 0, 30, 40], [10, 10, 70, 60], [-5, 3, 20, 90]]], tf.float32)
    layer = RoiPoolingConv(pool_size=14, stride=16)
    out = layer([features, rois])
    assert tuple(out.shape) == (1, 3, 14, 14, 1024)
    assert out.dtype == tf.float32
    assert layer.compute_output_shape(((1, 4, 5, 1024), (1, 3, 4))) == (1, 3, 14, 14, 1024)
    # Written with keras.ops (no CropAndResize): Keras' jit_compile="auto" may pick XLA.
    assert layer.supports_jit is True


def test_roi_pooling_symbolic_shapes():
    layer = RoiPoolingConv(pool_size=7, stride=16)
    static = layer([keras.Input(batch_size=2, shape=(6, 8, 32)), keras.Input(batch_size=2, shape=(5, 4))])
    assert tuple(static.shape) == (2, 5, 7, 7, 32)
    dynamic = layer([keras.Input(shape=(None, None, 32)), keras.Input(shape=(None, 4))])
    assert tuple(dynamic.shape) == (None, None, 7, 7, 32)


def test_roi_pooling_layer_contract(tmp_path):
    """Shapes, config round trip, save and load, mixed precision (tests/layer_testing.py); no weights to train."""
    features = np.random.default_rng(6).normal(size=(1, 5, 6, 3)).astype(np.float32)
    rois = np.array([[[1, 2, 30, 25], [-3, 0, 8, 30]]], np.float32)
    layer = run_layer_test(RoiPoolingConv, dict(pool_size=7, stride=8, sampling_ratio=3, name="pool"),
                           [features, rois], [(1, 2, 7, 7, 3)], tmp_path, list_input=True, expect_weights=False)
    clone = layer.__class__.from_config(layer.get_config())
    assert (clone.pool_size, clone.stride, clone.sampling_ratio, clone.name) == (7, 8, 3, "pool")


@pytest.mark.parametrize(
    "pool, stride, ratio, height, width",
    [(7, 8, 2, 9, 12), (14, 16, 2, 5, 7), (3, 4, 1, 6, 4), (2, 16, 3, 4, 5), (1, 8, 2, 3, 3), (4, 16, 2, 1, 1)],
)
def test_roi_pooling_matches_reference(pool, stride, ratio, height, width):
    rng = np.random.default_rng(pool * 100 + ratio)
    features = rng.normal(size=(2, height, width, 3)).astype(np.float32)
    # Different boxes per image: image 1 gets the awkward cases in another order plus other random boxes.
    rois_0 = _roi_cases(rng, height, width, stride)
    rois_1 = _roi_cases(rng, height, width, stride)[::-1]
    rois = np.stack([rois_0, rois_1])
    out = RoiPoolingConv(pool_size=pool, stride=stride, sampling_ratio=ratio)([features, rois]).numpy()
    expected = _reference_batch(features, rois, pool, stride, ratio)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_roi_pooling_linear_ramp_hand_computed():
    # f(y, x) = 1 + 2 y + 3 x in feature coordinates. Inside the map, bilinear sampling of a linear function is
    # exact, so each bin equals f at the mean of its samples, which is the bin centre.
    height, width, stride = 10, 10, 4
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ramp = (1.0 + 2.0 * ys + 3.0 * xs).astype(np.float32)[None, :, :, None]
    # Box (4, 8, 20, 24) px -> feature x in [0.5, 4.5], y in [1.5, 5.5]; 2 x 2 bins of size 2:
    # centres x = 1.5, 3.5 and y = 2.5, 4.5.
    rois = np.array([[[4, 8, 20, 24]]], np.float32)
    out = RoiPoolingConv(pool_size=2, stride=stride, sampling_ratio=2)([ramp, rois]).numpy()[0, 0, :, :, 0]
    expected = np.array(
        [[1 + 2 * 2.5 + 3 * 1.5, 1 + 2 * 2.5 + 3 * 3.5], [1 + 2 * 4.5 + 3 * 1.5, 1 + 2 * 4.5 + 3 * 3.5]]
    )
    np.testing.assert_allclose(out, expected, atol=1e-5)

    # Clamp band: box x in [-4, 0] px at stride 4 -> feature x in [-1.5, -0.5]; one bin, 2 samples in x at
    # -1.25 (< -1: contributes 0) and -0.75 (clamped to 0: f(y, 0)); y from box (8, 16) px -> [1.5, 3.5], samples
    # at 2.0 and 3.0. Bin = (0 + 0 + f(2, 0) + f(3, 0)) / 4 = (5 + 7) / 4 = 3.
    rois = np.array([[[-4, 8, 0, 16]]], np.float32)
    out = RoiPoolingConv(pool_size=1, stride=stride, sampling_ratio=2)([ramp, rois]).numpy()
    np.testing.assert_allclose(out[0, 0, 0, 0, 0], 3.0, atol=1e-5)


def test_roi_pooling_constant_map_border_fraction():
    # A constant map pools to the constant, except that samples beyond -1 / H / W count as zeros.
    features = np.full((1, 6, 8, 2), 2.5, np.float32)
    rois = np.array([[[0, 0, 8, 6], [-4, 1, 2, 3], [3, 2, 12, 5]]], np.float32)
    out = RoiPoolingConv(pool_size=1, stride=1, sampling_ratio=2)([features, rois]).numpy()[0, :, 0, 0, 0]
    # box 1: x in [-4.5, 1.5], samples at -3 (zero) and 0 (kept): half the samples are zero.
    # box 2: x in [2.5, 11.5], samples at 4.75 (kept) and 9.25 (> W = 8: zero).
    np.testing.assert_allclose(out, [2.5, 1.25, 1.25], atol=1e-6)


def test_roi_pooling_gradient_flows_to_features_only():
    rng = np.random.default_rng(3)
    features = tf.constant(rng.normal(size=(2, 6, 7, 4)).astype(np.float32))
    rois = tf.constant(np.stack([_roi_cases(rng, 6, 7, 8)[:6], _roi_cases(rng, 6, 7, 8)[6:12]]))
    upstream = tf.constant(rng.normal(size=(2, 6, 3, 3, 4)).astype(np.float32))
    layer = RoiPoolingConv(pool_size=3, stride=8, sampling_ratio=2)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([features, rois])
        loss = tf.reduce_sum(layer([features, rois]) * upstream)
    grad_features = tape.gradient(loss, features)
    assert tape.gradient(loss, rois) is None
    assert np.all(np.isfinite(grad_features.numpy()))
    assert np.abs(grad_features.numpy()).sum() > 0
    # The op is linear in the features, so its gradient is its adjoint: <grad, g> == <pool(g), upstream>.
    probe = tf.constant(rng.normal(size=(2, 6, 7, 4)).astype(np.float32))
    np.testing.assert_allclose(
        tf.reduce_sum(grad_features * probe).numpy(),
        tf.reduce_sum(layer([probe, rois]) * upstream).numpy(),
        rtol=1e-4,
    )


def test_roi_pooling_dynamic_shapes_in_graph():
    layer = RoiPoolingConv(pool_size=3, stride=8, sampling_ratio=2)
    fn = tf.function(
        layer.call,
        input_signature=[
            [tf.TensorSpec([None, None, None, 4], tf.float32), tf.TensorSpec([None, None, 4], tf.float32)]
        ],
    )
    rng = np.random.default_rng(4)
    features = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    rois = np.stack([_roi_cases(rng, 5, 6, 8)[:7], _roi_cases(rng, 5, 6, 8)[7:14]])
    out = fn([features, rois]).numpy()
    np.testing.assert_allclose(out, layer([features, rois]).numpy(), atol=1e-6)
    assert out.shape == (2, 7, 3, 3, 4)


def test_roi_pooling_mixed_precision_keeps_boxes_float32():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(1, 40, 60, 2)).astype(np.float32)
    # Large pixel coordinates: in float16 they would be rounded to 0.5 px.
    rois = np.array([[[601.3, 402.7, 777.1, 590.9], [300.2, 100.6, 310.9, 107.3]]], np.float32)
    layer = RoiPoolingConv(pool_size=4, stride=16, sampling_ratio=2, dtype="mixed_float16")
    out = layer([tf.constant(features, tf.float16), tf.constant(rois)])
    assert out.dtype == tf.float16
    expected = _reference_batch(features.astype(np.float16).astype(np.float32), rois, 4, 16, 2)
    np.testing.assert_allclose(out.numpy().astype(np.float32), expected, atol=5e-3)


# ----------------------------------------------------------------------------------------------------------------
# ProposalLayer

_IMAGE_SIZES = np.array([[96, 128], [70, 100]], np.int32)


def _rpn_inputs(seed, feature_hw=(6, 8), sizes=(32, 64, 128), ratios=(0.5, 1.0, 2.0)):
    rng = np.random.default_rng(seed)
    anchors = anchor_ops.grid_anchors(feature_hw[0], feature_hw[1], 16, sizes, ratios).numpy()
    num_anchors = len(anchors)
    logits = rng.normal(size=(2, num_anchors)).astype(np.float32)
    deltas = (0.3 * rng.normal(size=(2, num_anchors, 4))).astype(np.float32)
    return logits, deltas, anchors


def _check_proposals_against_reference(proposals, valid, logits, deltas, anchors, pre, post, nms_thresh, min_size):
    assert proposals.shape == (2, post, 4) and valid.shape == (2, post)
    for b in range(2):
        exp_boxes, _ = ref.proposals(logits[b], deltas[b], anchors, _IMAGE_SIZES[b], pre, post, nms_thresh, min_size)
        count = int(valid[b].sum())
        assert count == len(exp_boxes)
        assert valid[b, :count].all() and not valid[b, count:].any()  # valid entries first
        np.testing.assert_allclose(proposals[b, :count], exp_boxes, rtol=1e-5, atol=1e-3)
        assert np.all(proposals[b, count:] == 0)


@pytest.mark.parametrize("training", [False, True])
def test_proposal_layer_matches_reference(training):
    logits, deltas, anchors = _rpn_inputs(0)
    layer = ProposalLayer(300, 60, 150, 40, nms_thresh=0.7, min_size=6.0)
    proposals, valid = layer([logits, deltas, anchors, _IMAGE_SIZES], training=training)
    pre, post = (300, 60) if training else (150, 40)
    assert proposals.dtype == tf.float32 and valid.dtype == tf.bool
    _check_proposals_against_reference(
        proposals.numpy(), valid.numpy(), logits, deltas, anchors, pre, post, 0.7, 6.0
    )


def test_proposal_layer_padding_and_bounds():
    # Few anchors (A < pre_nms_topk) and a strict NMS: fewer survivors than R, so padding is exercised.
    logits, deltas, anchors = _rpn_inputs(1, feature_hw=(3, 4), sizes=(48,), ratios=(1.0,))
    layer = ProposalLayer(1000, 50, 1000, 30, nms_thresh=0.3, min_size=0.0)
    proposals, valid = layer([logits, deltas, anchors, _IMAGE_SIZES])
    proposals, valid = proposals.numpy(), valid.numpy()
    assert proposals.shape == (2, 30, 4)
    assert 0 < valid.sum(axis=1).max() < 30
    _check_proposals_against_reference(proposals, valid, logits, deltas, anchors, 1000, 30, 0.3, 0.0)
    for b, (h, w) in enumerate(_IMAGE_SIZES):
        p = proposals[b][valid[b]]
        assert np.all(p[:, [0, 1]] >= 0) and np.all(p[:, 2] <= w) and np.all(p[:, 3] <= h)
        assert np.all(p[:, 2] > p[:, 0]) and np.all(p[:, 3] > p[:, 1])


def test_proposal_layer_static_r_and_symbolic_and_dynamic():
    layer = ProposalLayer(100, 20, 50, 10)
    inputs = [
        keras.Input(shape=(None,)),
        keras.Input(shape=(None, 4)),
        keras.Input(batch_size=None, shape=(4,)),
        keras.Input(shape=(2,), dtype="int32"),
    ]
    proposals, valid = layer(inputs)
    assert tuple(proposals.shape) == (None, 10, 4) and tuple(valid.shape) == (None, 10)
    assert valid.dtype == "bool"
    train_proposals, _ = layer(inputs, training=True)
    assert tuple(train_proposals.shape) == (None, 20, 4)

    # Dynamic B and A in a traced graph: R stays static.
    logits, deltas, anchors = _rpn_inputs(2)
    fn = tf.function(
        lambda lg, dl, an, sz: layer([lg, dl, an, sz], training=False),
        input_signature=[
            tf.TensorSpec([None, None], tf.float32),
            tf.TensorSpec([None, None, 4], tf.float32),
            tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([None, 2], tf.int32),
        ],
    )
    assert fn.get_concrete_function().structured_outputs[0].shape.as_list() == [None, 10, 4]
    graph_out = fn(logits, deltas, anchors, _IMAGE_SIZES)
    eager_out = layer([logits, deltas, anchors, _IMAGE_SIZES])
    np.testing.assert_allclose(graph_out[0].numpy(), eager_out[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(graph_out[1].numpy(), eager_out[1].numpy())


def test_proposal_layer_contract(tmp_path):
    """Shapes, config round trip, save and load, mixed precision: proposals stay float32 by design."""
    logits, deltas, anchors = _rpn_inputs(3, feature_hw=(3, 4))
    init = dict(pre_nms_topk_train=2000, post_nms_topk_train=512, pre_nms_topk_test=60, post_nms_topk_test=20,
                nms_thresh=0.6, min_size=2.0, box_coder=box_ops.BoxCoder((1, 1, 2, 2)), name="prop")
    layer = run_layer_test(ProposalLayer, init, [logits, deltas, anchors, _IMAGE_SIZES], [(2, 20, 4), (2, 20)],
                           tmp_path, list_input=True, float32_outputs=(0,), expect_weights=False)
    clone = ProposalLayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.box_coder == box_ops.BoxCoder((1.0, 1.0, 2.0, 2.0))
    # frcnn 0.1 saved the coder's weights as box_weights
    legacy = {**layer.get_config(), "box_weights": [1, 1, 2, 2]}
    del legacy["box_coder"]
    assert ProposalLayer.from_config(legacy).box_coder == clone.box_coder


# ----------------------------------------------------------------------------------------------------------------
# DetectionLayer


def _detection_inputs(seed, num_proposals=30, num_classes=4, num_invalid=5):
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(2, num_proposals, num_classes))
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    deltas = rng.normal(size=(2, num_proposals, 4 * (num_classes - 1)))
    proposals = np.stack([_sorted_boxes(rng, num_proposals, (-10, 135), (-10, 100)) for _ in range(2)])
    proposals = proposals + np.array([0, 0, 4, 4], np.float32)  # no empty proposals
    valid = np.ones((2, num_proposals), bool)
    valid[:, num_proposals - num_invalid:] = False
    proposals[~valid] = 0.0  # padded proposals are zero boxes, as ProposalLayer emits them
    return probs.astype(np.float32), deltas.astype(np.float32), proposals.astype(np.float32), valid


def _check_detections_against_reference(out, probs, deltas, proposals, valid, score_thresh, nms_thresh, max_det):
    for b in range(2):
        exp_boxes, exp_scores, exp_classes = ref.detections(
            probs[b], deltas[b], proposals[b], valid[b], _IMAGE_SIZES[b], score_thresh, nms_thresh, max_det
        )
        count = int(out["num_detections"][b])
        assert count == len(exp_boxes)
        np.testing.assert_allclose(out["scores"][b, :count], exp_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["classes"][b, :count], exp_classes)
        np.testing.assert_allclose(out["boxes"][b, :count], exp_boxes, rtol=1e-5, atol=1e-3)
        assert np.all(out["boxes"][b, count:] == 0) and np.all(out["scores"][b, count:] == 0)
        assert np.all(out["classes"][b, count:] == 0)


@pytest.mark.parametrize("max_det, score_thresh", [(100, 0.05), (12, 0.05), (100, 0.3)])
def test_detection_layer_matches_reference(max_det, score_thresh):
    probs, deltas, proposals, valid = _detection_inputs(0)
    layer = DetectionLayer(4, score_thresh=score_thresh, nms_thresh=0.5, max_detections=max_det)
    out = layer([probs, deltas, proposals, valid, _IMAGE_SIZES])
    assert set(out) == {"boxes", "scores", "classes", "num_detections"}
    assert out["boxes"].shape == (2, max_det, 4) and out["scores"].shape == (2, max_det)
    assert out["classes"].dtype == tf.int32 and out["num_detections"].dtype == tf.int32
    out = {k: v.numpy() for k, v in out.items()}
    if max_det == 12:
        assert np.all(out["num_detections"] == 12)  # the cap across classes is exercised
    _check_detections_against_reference(out, probs, deltas, proposals, valid, score_thresh, 0.5, max_det)
    for b in range(2):
        count = out["num_detections"][b]
        assert np.all((out["classes"][b, :count] >= 1) & (out["classes"][b, :count] <= 3))
        assert np.all(np.diff(out["scores"][b, :count]) <= 0)
        h, w = _IMAGE_SIZES[b]
        kept = out["boxes"][b, :count]
        assert np.all(kept >= 0) and np.all(kept[:, 2] <= w) and np.all(kept[:, 3] <= h)


def test_detection_layer_invalid_proposals_never_detected():
    probs, deltas, proposals, valid = _detection_inputs(1, num_invalid=10)
    # Invalid proposals: far from the valid ones, certain of class 1, zero deltas.
    probs[~valid] = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    deltas[~valid] = 0.0
    proposals[~valid] = np.array([200, 200, 220, 220], np.float32)
    sizes = np.array([[300, 300], [300, 300]], np.int32)
    out = DetectionLayer(4, score_thresh=0.05, max_detections=100)([probs, deltas, proposals, valid, sizes])
    boxes, count = out["boxes"].numpy(), out["num_detections"].numpy()
    for b in range(2):
        assert count[b] > 0
        assert np.all(boxes[b, : count[b], 2] < 200)  # nothing from the invalid region

    # All proposals invalid: no detections at all, every output zero.
    none_valid = np.zeros_like(valid)
    out = DetectionLayer(4)([probs, deltas, proposals, none_valid, sizes])
    assert np.all(out["num_detections"].numpy() == 0)
    for key in ("boxes", "scores", "classes"):
        assert np.all(out[key].numpy() == 0)


def test_detection_layer_contract(tmp_path):
    """Shapes (eager and symbolic), config round trip, save and load, mixed precision: boxes and scores float32."""
    probs, deltas, proposals, valid = _detection_inputs(4, num_proposals=12, num_classes=5, num_invalid=2)
    init = dict(num_classes=5, score_thresh=0.1, nms_thresh=0.4, max_detections=7,
                box_coder={"weights": [10, 10, 5, 5]})
    # Flat outputs in key order: boxes, classes, num_detections, scores.
    layer = run_layer_test(DetectionLayer, init, [probs, deltas, proposals, valid, _IMAGE_SIZES],
                           [(2, 7, 4), (2, 7), (2,), (2, 7)], tmp_path, list_input=True, float32_outputs=(0, 3),
                           expect_weights=False)
    out = layer(
        [
            keras.Input(shape=(None, 5)),
            keras.Input(shape=(None, 16)),
            keras.Input(shape=(None, 4)),
            keras.Input(shape=(None,), dtype="bool"),
            keras.Input(shape=(2,), dtype="int32"),
        ]
    )
    assert tuple(out["boxes"].shape) == (None, 7, 4)
    assert tuple(out["classes"].shape) == (None, 7) and out["classes"].dtype == "int32"
    assert tuple(out["num_detections"].shape) == (None,)
    clone = DetectionLayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert layer.supports_jit is True  # keras.ops NMS: XLA compiles it
    with pytest.raises(ValueError):
        DetectionLayer(1)
