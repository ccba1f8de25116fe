"""frcnn.backbone.GroupNormalization (frcnn.ops.group_norm): Keras' GroupNormalization with float32 statistics and a
written-out gradient. Same outputs and gradients as the textbook formula, same variables and checkpoint paths as
keras.layers.GroupNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from frcnn import backbone, ops as frcnn_ops
import reference as ref
from layer_testing import run_layer_test


def _textbook_gradients(x, gamma, beta, groups, epsilon, upstream):
    """d(sum(y * upstream)) / d(x, gamma, beta) by float64 autodiff of the textbook formula (not our gradient)."""
    x, gamma, beta = (tf.constant(v, tf.float64) for v in (x, gamma, beta))
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        b, h, w, c = x.shape
        g = tf.reshape(x, (b, h, w, groups, c // groups))
        mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
        y = tf.reshape((g - mean) / tf.sqrt(var + epsilon), x.shape) * gamma + beta
        loss = tf.reduce_sum(y * upstream)
    return [t.numpy() for t in tape.gradient(loss, [x, gamma, beta])]


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.7, 2.0, shape).astype(np.float32)  # a mean well away from 0: the variance must not cancel
    channels = shape[-1]
    gamma = rng.normal(1.0, 0.3, channels).astype(np.float32)
    beta = rng.normal(0.0, 0.3, channels).astype(np.float32)
    upstream = rng.standard_normal(shape).astype(np.float32)
    return x, gamma, beta, upstream


def _ours(x, gamma, beta, groups, upstream, dtype="float32"):
    xt = tf.cast(tf.constant(x), dtype)
    gamma, beta = tf.Variable(gamma), tf.Variable(beta)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = frcnn_ops.group_norm(xt, gamma, beta, groups, 1e-5)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    grads = tape.gradient(loss, [xt, gamma, beta])
    return y, grads


@pytest.mark.parametrize("shape, groups", [((2, 5, 7, 16), 4), ((3, 3, 3, 64), 32), ((1, 6, 4, 8), 1)])
def test_values_and_gradients_match_the_textbook_formula(shape, groups):
    x, gamma, beta, upstream = _inputs(shape)
    y, grads = _ours(x, gamma, beta, groups, upstream)
    assert y.dtype == tf.float32
    np.testing.assert_allclose(y.numpy(), ref.group_norm(x, gamma, beta, groups, 1e-5), rtol=1e-5, atol=1e-5)
    for got, want, what in zip(grads, _textbook_gradients(x, gamma, beta, groups, 1e-5, upstream),
                               ("x", "gamma", "beta")):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=what)


def test_bfloat16_activations_float32_statistics_and_parameter_gradients():
    x, gamma, beta, upstream = _inputs((2, 6, 6, 32), seed=1)
    xb = tf.cast(x, tf.bfloat16).numpy().astype(np.float32)  # the bfloat16 input, exactly
    y, (gx, ggamma, gbeta) = _ours(x, gamma, beta, 8, upstream, dtype="bfloat16")
    assert y.dtype == tf.bfloat16 and gx.dtype == tf.bfloat16
    assert ggamma.dtype == tf.float32 and gbeta.dtype == tf.float32
    want_y = ref.group_norm(xb, gamma, beta, 8, 1e-5)
    want = _textbook_gradients(xb, gamma, beta, 8, 1e-5, upstream)
    # bfloat16 keeps 8 significant bits: a relative error of about 2^-8 per rounding, a few roundings deep. A
    # statistic computed in bfloat16, or a cast in the wrong place, is off by far more on these inputs.
    for got, expected in ((y, want_y), (gx, want[0]), (ggamma, want[1]), (gbeta, want[2])):
        got = tf.cast(got, tf.float32).numpy()
        assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


def test_layer_same_as_keras_group_normalization_and_its_checkpoints_load(tmp_path):
    """Keras names weight-file paths after the layer class: a model saved with keras.layers.GroupNormalization
    loads into one built with frcnn's, and both give the same outputs."""
    def model(norm_cls):
        inputs = keras.Input((None, None, 64))
        return keras.Model(inputs, norm_cls(groups=32, epsilon=1e-5, name="gn")(inputs))

    old, new = model(keras.layers.GroupNormalization), model(backbone.GroupNormalization)
    rng = np.random.default_rng(2)
    old.set_weights([rng.normal(1, 0.3, 64).astype(np.float32), rng.normal(0, 0.3, 64).astype(np.float32)])
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    new.load_weights(path)
    x = rng.normal(0.5, 2, (2, 5, 6, 64)).astype(np.float32)
    np.testing.assert_allclose(new(x).numpy(), old(x).numpy(), rtol=1e-5, atol=1e-5)


def test_other_layouts_fall_back_to_keras():
    x = np.random.default_rng(3).normal(size=(2, 8, 5, 5)).astype(np.float32)
    ours = backbone.GroupNormalization(groups=4, axis=1)
    theirs = keras.layers.GroupNormalization(groups=4, axis=1)
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-5, atol=1e-5)


def test_layer_contract(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 8)).astype(np.float32)
    run_layer_test(backbone.GroupNormalization, dict(groups=4, epsilon=1e-5), [x], [(2, 4, 4, 8)], tmp_path,
                   expect_weights=True, atol=1e-5)


def test_trunk_and_res5_use_it_with_norm_group():
    trunk, res5 = backbone.build_trunk("group", freeze_at=0), backbone.build_res5("group")
    for model in (trunk, res5):
        norms = [layer for layer in model.layers if "GroupNormalization" in type(layer).__name__]
        assert norms and all(isinstance(layer, backbone.GroupNormalization) for layer in norms)
