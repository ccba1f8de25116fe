"""frcnn.losses against hand computations on tiny inputs."""

import math

import numpy as np
import pytest
import tensorflow as tf

import reference_targets as ref
from frcnn import losses

BETA = 1.0 / 9.0


def bce(label, logit):
    """Binary log loss of one logit, by hand."""
    p = 1.0 / (1.0 + math.exp(-logit))
    return -math.log(p) if label == 1 else -math.log(1.0 - p)


def test_smooth_l1_values():
    x = np.array([-2.0, -0.05, 0.0, 0.05, 0.1, 2.0], np.float32)
    beta = 0.1
    expected = [2.0 - 0.05, 0.5 * 0.0025 / 0.1, 0.0, 0.5 * 0.0025 / 0.1, 0.1 - 0.05, 2.0 - 0.05]
    np.testing.assert_allclose(losses.smooth_l1(x, beta).numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses.smooth_l1(x, 0.0).numpy(), np.abs(x))
    assert losses.smooth_l1(tf.constant(x, tf.float16), beta).dtype == tf.float32


def test_rpn_losses_hand_computed():
    logits = np.array([[2.0, -1.0, 0.5, -3.0]], np.float32)
    labels = np.array([[1, 0, -1, 1]], np.int32)
    targets = np.zeros((1, 4, 4), np.float32)
    deltas = np.array(
        [
            [
                [0.05, -0.2, 0.0, 1.0],  # positive
                [9.0, 9.0, 9.0, 9.0],  # negative: no box loss
                [7.0, 7.0, 7.0, 7.0],  # ignored: no loss at all
                [0.1, 0.0, -0.01, 0.3],  # positive
            ]
        ],
        np.float32,
    )
    targets[0, 3] = [0.2, 0.0, 0.0, 0.0]  # anchor 3's first coordinate differs by -0.1
    out = losses.rpn_losses(logits, deltas, labels, targets, beta=BETA)
    assert set(out) == {"rpn_cls", "rpn_box"}
    cls = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(3.0))) / 3
    assert abs(cls - (bce(1, 2.0) + bce(0, -1.0) + bce(1, -3.0)) / 3) < 1e-12
    # smooth-L1 with beta = 1/9: 0.5 * x^2 * 9 below 1/9, |x| - 1/18 above.
    box = (0.5 * 0.05**2 * 9 + (0.2 - 1 / 18) + 0.0 + (1.0 - 1 / 18)) + (
        0.5 * 0.1**2 * 9 + 0.0 + 0.5 * 0.01**2 * 9 + (0.3 - 1 / 18)
    )
    np.testing.assert_allclose(out["rpn_cls"].numpy(), cls, rtol=1e-6)
    np.testing.assert_allclose(out["rpn_box"].numpy(), box / 3, rtol=1e-6)

    l1 = losses.rpn_losses(logits, deltas, labels, targets, beta=0.0)
    np.testing.assert_allclose(l1["rpn_box"].numpy(), (0.05 + 0.2 + 1.0 + 0.1 + 0.01 + 0.3) / 3, rtol=1e-6)


def test_rpn_losses_normalised_over_the_whole_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6)).astype(np.float32)
    deltas = rng.normal(size=(2, 6, 4)).astype(np.float32)
    targets = rng.normal(size=(2, 6, 4)).astype(np.float32)
    labels = np.array([[1, -1, -1, -1, -1, -1], [1, 0, 0, 1, -1, 0]], np.int32)  # 1 + 5 sampled
    out = losses.rpn_losses(logits, deltas, labels, targets, beta=BETA)
    cls_sum, box_sum, n = 0.0, 0.0, 0
    for b in range(2):
        for a in range(6):
            if labels[b, a] < 0:
                continue
            n += 1
            cls_sum += bce(labels[b, a], float(logits[b, a]))
            if labels[b, a] == 1:
                box_sum += sum(ref.smooth_l1_one(deltas[b, a, k] - targets[b, a, k], BETA) for k in range(4))
    np.testing.assert_allclose(out["rpn_cls"].numpy(), cls_sum / n, rtol=1e-5)
    np.testing.assert_allclose(out["rpn_box"].numpy(), box_sum / n, rtol=1e-5)


def test_rpn_losses_divide_by_batch_size_per_image_times_images():
    """Detectron2's normaliser: ``batch_size_per_image * B``, however many anchors the sampler found."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 6)).astype(np.float32)
    deltas = rng.normal(size=(2, 6, 4)).astype(np.float32)
    targets = rng.normal(size=(2, 6, 4)).astype(np.float32)
    labels = np.array([[1, -1, -1, -1, -1, -1], [1, 0, 0, 1, -1, 0]], np.int32)  # 1 + 5 sampled of 2 x 4
    by_count = losses.rpn_losses(logits, deltas, labels, targets, beta=BETA)
    d2 = losses.rpn_losses(logits, deltas, labels, targets, beta=BETA, batch_size_per_image=4)
    for key in ("rpn_cls", "rpn_box"):
        np.testing.assert_allclose(d2[key].numpy(), by_count[key].numpy() * 6 / 8, rtol=1e-6)
    # When every image fills its sample the two normalisers are the same number.
    full = np.where(labels < 0, 0, labels)
    np.testing.assert_allclose(
        losses.rpn_losses(logits, deltas, full, targets, batch_size_per_image=6)["rpn_cls"].numpy(),
        losses.rpn_losses(logits, deltas, full, targets)["rpn_cls"].numpy(), rtol=1e-6)


def test_rpn_losses_empty_sets_are_zero_not_nan():
    logits = np.array([[1.0, -2.0, 0.3]], np.float32)
    deltas = np.ones((1, 3, 4), np.float32)
    targets = np.zeros((1, 3, 4), np.float32)
    out = losses.rpn_losses(logits, deltas, np.array([[0, 0, -1]], np.int32), targets)
    assert out["rpn_box"].numpy() == 0.0 and np.isfinite(out["rpn_cls"].numpy())
    out = losses.rpn_losses(logits, deltas, np.full((1, 3), -1, np.int32), targets)
    assert out["rpn_cls"].numpy() == 0.0 and out["rpn_box"].numpy() == 0.0


def _roi_inputs():
    probs = np.array(
        [
            [
                [0.7, 0.2, 0.1],  # class 1
                [0.1, 0.8, 0.1],  # background
                [0.2, 0.3, 0.5],  # class 2
                [1e-30, 1.0, 1e-30],  # padding: ignored although its "class" probability is ~0
            ]
        ],
        np.float32,
    )
    logits = np.log(probs) + np.float32(3.0)  # any constant per row: softmax(logits) = probs
    classes = np.array([[1, 0, 2, 0]], np.int32)
    valid = np.array([[True, True, True, False]])
    deltas = np.zeros((1, 4, 8), np.float32)
    deltas[0, 0] = [0.5, -0.25, 2.0, 0.0, 9.0, 9.0, 9.0, 9.0]  # class 1 -> columns 0:4
    deltas[0, 1] = [5.0] * 8  # background: no box loss
    deltas[0, 2] = [9.0, 9.0, 9.0, 9.0, 0.1, 0.0, -3.0, 1.0]  # class 2 -> columns 4:8
    deltas[0, 3] = [7.0] * 8
    targets = np.zeros((1, 4, 4), np.float32)
    targets[0, 2] = [0.0, 0.0, -1.0, 0.0]
    return logits, deltas, classes, targets, valid


def test_roi_losses_hand_computed():
    logits, deltas, classes, targets, valid = _roi_inputs()
    out = losses.roi_losses(logits, deltas, classes, targets, valid, beta=1.0)
    assert set(out) == {"roi_cls", "roi_box"}
    cls = -(math.log(0.2) + math.log(0.1) + math.log(0.5)) / 3
    # beta = 1: 0.5 x^2 below 1, |x| - 0.5 above. Row 0: 0.5, -0.25, 2, 0; row 2: 0.1, 0, -2, 1.
    box = (0.125 + 0.03125 + 1.5 + 0.0) + (0.005 + 0.0 + 1.5 + 0.5)
    np.testing.assert_allclose(out["roi_cls"].numpy(), cls, rtol=1e-6)
    np.testing.assert_allclose(out["roi_box"].numpy(), box / 3, rtol=1e-6)
    l1 = losses.roi_losses(logits, deltas, classes, targets, valid, beta=0.0)
    np.testing.assert_allclose(l1["roi_box"].numpy(), (0.5 + 0.25 + 2.0 + 0.1 + 2.0 + 1.0) / 3, rtol=1e-6)


def test_roi_losses_empty_sets():
    logits, deltas, classes, targets, valid = _roi_inputs()
    out = losses.roi_losses(logits, deltas, np.zeros_like(classes), targets, valid)
    assert out["roi_box"].numpy() == 0.0
    out = losses.roi_losses(logits, deltas, classes, targets, np.zeros_like(valid))
    assert out["roi_cls"].numpy() == 0.0 and out["roi_box"].numpy() == 0.0


def test_confidently_wrong_roi_loss_is_not_capped_and_its_gradient_is_not_zero():
    """A ROI whose true class has probability e^-60 (far below the 1e-7 the loss used to clip at) costs its full
    loss, 60 nats, and gets the full softmax gradient: -1 on its true class, +1 on the class it wrongly predicts."""
    logits = tf.Variable(np.array([[[0.0, 60.0, 0.0], [5.0, 0.0, 0.0]]], np.float32))  # true: 2, then 0
    classes = np.array([[2, 0]], np.int32)
    valid = np.array([[True, True]])
    deltas = np.zeros((1, 2, 8), np.float32)
    with tf.GradientTape() as tape:
        out = losses.roi_losses(logits, deltas, classes, np.zeros((1, 2, 4), np.float32), valid)
    wrong = 60.0 + math.log(1.0 + 2.0 * math.exp(-60.0))  # -log softmax(logits)[2]
    right = math.log(1.0 + 2.0 * math.exp(-5.0))
    np.testing.assert_allclose(out["roi_cls"].numpy(), (wrong + right) / 2, rtol=1e-6)
    assert out["roi_cls"].numpy() > -math.log(1e-7)
    grad = tape.gradient(out["roi_cls"], logits).numpy()[0, 0]
    np.testing.assert_allclose(grad, np.array([0.0, 1.0, -1.0]) / 2, atol=1e-6)


def test_roi_losses_rejects_wrong_delta_columns():
    logits, deltas, classes, targets, valid = _roi_inputs()
    with pytest.raises(ValueError, match="4 \\* \\(C - 1\\)"):
        losses.roi_losses(logits, np.zeros((1, 4, 12), np.float32), classes, targets, valid)


def test_float16_inputs_give_float32_losses():
    logits, deltas, classes, targets, valid = _roi_inputs()
    out = losses.roi_losses(tf.constant(logits, tf.float16), tf.constant(deltas, tf.float16), classes, targets, valid)
    ref32 = losses.roi_losses(logits, deltas, classes, targets, valid)
    for key in out:
        assert out[key].dtype == tf.float32 and out[key].shape == ()
        np.testing.assert_allclose(out[key].numpy(), ref32[key].numpy(), rtol=1e-3)
    logits = tf.constant([[30.0, -1.0, 0.5]], tf.float16)
    rpn = losses.rpn_losses(logits, tf.zeros((1, 3, 4), tf.float16), [[1, 0, -1]], tf.zeros((1, 3, 4)))
    assert all(v.dtype == tf.float32 and v.shape == () for v in rpn.values())


def test_gradients_are_finite():
    rng = np.random.default_rng(1)
    rpn_logits = tf.Variable(np.array([[100.0, -100.0, 0.0, 50.0]], np.float32))
    rpn_deltas = tf.Variable(np.array(rng.normal(size=(1, 4, 4)), np.float32))
    cls_logits = tf.Variable(np.array([[[200.0, -200.0, 0.0], [0.0, 0.0, 0.0], [-200.0, 200.0, 0.0]]], np.float32))
    box_deltas = tf.Variable(np.array(rng.normal(size=(1, 3, 8)), np.float32))
    with tf.GradientTape() as tape:
        rpn = losses.rpn_losses(rpn_logits, rpn_deltas, [[0, 1, -1, 1]], np.zeros((1, 4, 4), np.float32), beta=0.0)
        # Row 0's true class has probability e^-400 (0 in float32): the log-softmax keeps loss and gradient finite.
        roi = losses.roi_losses(
            cls_logits, box_deltas, [[1, 2, 0]], np.zeros((1, 3, 4), np.float32), [[True, True, False]]
        )
        total = tf.add_n(list(rpn.values()) + list(roi.values()))
    assert np.isfinite(total.numpy())
    for g in tape.gradient(total, [rpn_logits, rpn_deltas, cls_logits, box_deltas]):
        assert g is not None and np.isfinite(g.numpy()).all()


def test_losses_in_xla_function():
    logits, deltas, classes, targets, valid = _roi_inputs()
    fn = tf.function(losses.roi_losses, jit_compile=True)
    out = fn(logits, deltas, classes, targets, valid)
    eager = losses.roi_losses(logits, deltas, classes, targets, valid)
    for key in out:
        np.testing.assert_allclose(out[key].numpy(), eager[key].numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Golden values: the four losses of the whole model on a fixed seed (detectron2's test_roi_heads.py habit)

# Computed once (commit "golden-value test of the four losses") by running this test's model and batch on the CPU
# of the development machine, TensorFlow backend, float32, and printing repr(float(loss)); identical in two separate
# processes. A change that moves any of them (targets, sampling, box coding, loss normalisation, initialisation,
# the order in which random numbers are drawn) fails here: if the change is intended, recompute and say why in the
# commit message. Session 8's Detectron2 changes left all four unchanged (checked bit for bit): the log-softmax
# equals the log of the clipped softmax where no ROI's true class is below 1e-7 (none is at this initialisation),
# and both images fill their 64-anchor RPN sample, so batch_size_per_image x B is the count of sampled anchors.
GOLDEN_LOSSES = {
    "rpn_cls": 0.6830430030822754,
    "rpn_box": 0.01015982124954462,
    "roi_cls": 1.570075273513794,
    "roi_box": 0.00034770561615005136,
}


def _golden_batch():
    rng = np.random.default_rng(2024)
    images = rng.uniform(0, 255, size=(2, 128, 128, 3)).astype(np.float32)
    images[1, :, 96:] = 0.0  # the second image is 128 x 96, zero padded on the right
    return {
        "images": images,
        "image_sizes": np.array([[128, 128], [128, 96]], np.int32),
        "gt_boxes": np.array([[[10, 12, 60, 70], [64, 40, 120, 100], [0, 0, 0, 0]],
                              [[20, 30, 50, 90], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32),
        "gt_classes": np.array([[1, 3, 0], [2, 0, 0]], np.int32),
        "gt_valid": np.array([[True, True, False], [True, False, False]]),
    }


def test_the_four_losses_keep_their_golden_values():
    import keras

    import frcnn
    from frcnn.config import load_config

    cfg = load_config("test.yaml", ["data.classes=[circle,square,triangle]", "model.norm=group", "model.num_rois=16",
                                    "model.roi_positive_fraction=0.5", "train.seed=7"])
    keras.utils.set_random_seed(7)  # the initial weights; the samplers draw from train.seed
    model = frcnn.build_model(cfg, load_weights=False)
    losses = {name: float(value) for name, value in model(_golden_batch(), training=True).items()}
    assert sorted(losses) == sorted(GOLDEN_LOSSES)
    for name, expected in GOLDEN_LOSSES.items():
        assert losses[name] == pytest.approx(expected, rel=1e-5), name
