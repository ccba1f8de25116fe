import numpy as np
import pytest
import tensorflow as tf

from frcnn import boxes
import reference as ref


def random_boxes(rng, n, size=200.0, min_side=1.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_side, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_iou_matches_reference_and_handles_empty_boxes():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 17), random_boxes(rng, 11)
    b[3] = 0.0  # an empty (padding) box
    got = boxes.pairwise_iou(a, b).numpy()
    np.testing.assert_allclose(got, ref.iou(a, b), atol=1e-6)
    assert np.all(got[:, 3] == 0)
    assert boxes.pairwise_iou(np.zeros((2, 4)), np.zeros((3, 4))).numpy().sum() == 0  # no NaN
    np.testing.assert_allclose(np.diag(boxes.pairwise_iou(a, a).numpy()), 1.0, rtol=1e-6)


def test_iou_batched():
    rng = np.random.default_rng(1)
    a = np.stack([random_boxes(rng, 5), random_boxes(rng, 5)])
    b = np.stack([random_boxes(rng, 4), random_boxes(rng, 4)])
    got = boxes.pairwise_iou(a, b).numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i], ref.iou(a[i], b[i]), atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip_and_reference(weights):
    rng = np.random.default_rng(2)
    anchors, gt = random_boxes(rng, 50), random_boxes(rng, 50)
    coder = boxes.BoxCoder(weights)
    deltas = coder.encode(anchors, gt)
    np.testing.assert_allclose(deltas.numpy(), ref.encode(anchors, gt, weights), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(coder.decode(deltas, anchors).numpy(), gt, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(coder.encode(gt, gt).numpy(), 0.0, atol=1e-6)
    assert boxes.BoxCoder.of(coder.get_config()) == coder == boxes.BoxCoder.of(weights)


def test_decode_clamps_huge_scales():
    out = boxes.BoxCoder().decode(tf.constant([[0.0, 0.0, 100.0, 100.0]]), tf.constant([[0.0, 0.0, 10.0, 10.0]]))
    out = out.numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 10.0 * 1000.0 / 16.0, rtol=1e-4)


def test_clip_area_and_min_side():
    b = tf.constant([[-5.0, -5.0, 300.0, 50.0], [10.0, 20.0, 30.0, 60.0]])
    clipped = boxes.clip(b, tf.constant([100, 200])).numpy()
    np.testing.assert_array_equal(clipped, [[0, 0, 200, 50], [10, 20, 30, 60]])
    np.testing.assert_allclose(boxes.area(clipped).numpy(), [10000.0, 800.0])
    per_image = boxes.clip(tf.stack([b, b]), tf.constant([[[100, 200]], [[40, 25]]])).numpy()
    np.testing.assert_array_equal(per_image[1, 1], [10, 20, 25, 40])
    np.testing.assert_allclose(boxes.min_side(b).numpy(), [55.0, 20.0])
