"""frcnn.backbone.Conv2D: Keras' Conv2D, computed as matrix products in the ROI head. Same outputs, same gradients,
same variable paths in checkpoints as keras.layers.Conv2D."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from frcnn import backbone, ops as frcnn_ops
from layer_testing import run_layer_test


def _pair(kernel, strides, padding, matmul_form, channels=(6, 5)):
    """(frcnn Conv2D, keras Conv2D) with the same random weights."""
    ours = backbone.Conv2D(channels[1], kernel, strides=strides, padding=padding,
                           matmul_form=matmul_form)
    theirs = keras.layers.Conv2D(channels[1], kernel, strides=strides, padding=padding)
    shape = (None, None, None, channels[0])
    ours.build(shape)
    theirs.build(shape)
    rng = np.random.default_rng(kernel + strides)
    weights = [rng.standard_normal(w.shape).astype(np.float32) for w in theirs.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    return ours, theirs


def _value_and_grads(layer, x, training=True):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        # A fixed random weighting of the outputs: every output element gets its own upstream gradient.
        upstream = tf.constant(np.random.default_rng(7).standard_normal(y.shape).astype(np.float32))
        loss = tf.reduce_sum(y * upstream)
    grads = tape.gradient(loss, [x, layer.kernel, layer.bias])
    return [y.numpy()] + [g.numpy() for g in grads]


@pytest.mark.parametrize("kernel, strides, padding, matmul_form", [
    (1, 1, "valid", True),    # pointwise: a matrix product over channels
    (1, 2, "valid", True),    # strided pointwise (res5 block1, MSRA style): every second row and column
    (1, 2, "same", True),
    (3, 1, "same", True),     # res5's 3x3 in the ROI head: kernel gradient as one matrix product
    (3, 1, "same", False),    # the trunk's: Keras' own convolution
    (1, 1, "valid", False),
    (3, 2, "valid", True),    # not covered by the matrix form: falls back to Keras' convolution
    (3, 1, "same", "kernel_grad"),  # the RPN conv: only the 3x3 kernel gradient as a matrix product
    (1, 2, "valid", "kernel_grad"),  # ... and 1x1 convolutions stay Keras' own
])
@pytest.mark.parametrize("training", [True, False])  # inference is always Keras' own convolution
@pytest.mark.parametrize("size", [(7, 7), (6, 9)])
def test_same_values_and_gradients_as_keras_conv2d(kernel, strides, padding, matmul_form, size, training):
    ours, theirs = _pair(kernel, strides, padding, matmul_form)
    x = np.random.default_rng(1).standard_normal((3,) + size + (6,)).astype(np.float32)
    for mine, ref, what in zip(_value_and_grads(ours, x, training), _value_and_grads(theirs, x),
                               ("output", "input gradient", "kernel gradient", "bias gradient")):
        assert mine.shape == ref.shape, what
        np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=what)


def test_kernel_gradient_by_matmul_is_the_hand_computed_correlation():
    """dL/dW[i, j, c, d] = sum over positions of x_padded[y + i, x + j, c] * dy[y, x, d], written out in NumPy."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 4, 2)).astype(np.float32)
    xt, kt = tf.convert_to_tensor(x), tf.convert_to_tensor(kernel)
    with tf.GradientTape() as tape:
        tape.watch(kt)
        y = frcnn_ops.conv_with_matmul_kernel_grad(xt, kt)
        loss = tf.reduce_sum(y * dy)
    grad = tape.gradient(loss, kt).numpy()
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros_like(kernel)
    for i in range(3):
        for j in range(3):
            expected[i, j] = np.einsum("bhwc,bhwd->cd", padded[:, i:i + 5, j:j + 4], dy)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_float32_within_bfloat16_rounding():
    ours, _ = _pair(3, 1, "same", True, channels=(16, 8))
    x = np.random.default_rng(2).standard_normal((4, 7, 7, 16)).astype(np.float32)
    exact = _value_and_grads(ours, x)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed, _ = _pair(3, 1, "same", True, channels=(16, 8))
        mixed.set_weights(ours.get_weights())
        xt = tf.cast(tf.convert_to_tensor(x), tf.bfloat16)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = mixed(xt, training=True)
            upstream = tf.constant(np.random.default_rng(7).standard_normal(y.shape).astype(np.float32))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        gx, gk = tape.gradient(loss, [xt, mixed.kernel])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert y.dtype == tf.bfloat16 and gk.dtype == tf.float32
    for got, want in ((y, exact[0]), (gx, exact[1]), (gk, exact[2])):
        got = tf.cast(got, tf.float32).numpy()
        # bfloat16 keeps 8 significant bits: relative error about 2^-8 per rounding, a few roundings deep
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()


def test_layer_contract(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 4)).astype(np.float32)
    layer = run_layer_test(backbone.Conv2D, dict(filters=3, kernel_size=3, padding="same", matmul_form=True),
                           [x], [(2, 7, 7, 3)], tmp_path, expect_weights=True, atol=1e-5)
    assert layer.get_config()["matmul_form"] == "all"  # True, as configs saved before the modes, is "all"
    assert backbone.Conv2D(3, 1, matmul_form=False).matmul_form == "none"
    with pytest.raises(ValueError, match="matmul_form must be one of"):
        backbone.Conv2D(3, 1, matmul_form="fast")


def test_kernel_gradient_form_on_maps_of_unknown_size():
    """The RPN's 3x3 conv sees feature maps whose size is known only when the graph runs (any image size)."""
    ours, theirs = _pair(3, 1, "same", "kernel_grad")
    x = np.random.default_rng(3).standard_normal((2, 5, 8, 6)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 6), tf.float32)])
    def dynamic(x):
        return _value_and_grads_graph(ours, x)

    for mine, ref, what in zip(dynamic(x), _value_and_grads(theirs, x),
                               ("output", "input gradient", "kernel gradient", "bias gradient")):
        np.testing.assert_allclose(np.asarray(mine), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=what)


def _value_and_grads_graph(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        upstream = tf.constant(np.random.default_rng(7).standard_normal((2, 5, 8, layer.filters)).astype(np.float32))
        loss = tf.reduce_sum(y * upstream)
    return [y] + tape.gradient(loss, [x, layer.kernel, layer.bias])


def test_checkpoint_paths_unchanged_keras_conv2d_weights_load(tmp_path):
    """Keras names weight-file paths after the layer class: a model saved with keras.layers.Conv2D (every checkpoint
    written before this layer existed) loads into one built with frcnn's Conv2D, and gives the same outputs."""
    def model(conv_cls):
        inputs = keras.Input((8, 8, 4))
        x = conv_cls(6, 1, name="a_conv")(inputs)
        return keras.Model(inputs, conv_cls(5, 3, padding="same", name="b_conv")(x))

    old, new = model(keras.layers.Conv2D), model(backbone.Conv2D)
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    new.load_weights(path)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    np.testing.assert_allclose(new(x).numpy(), old(x).numpy(), rtol=1e-5, atol=1e-5)


def test_matrix_form_only_in_training_and_only_where_asked(monkeypatch):
    calls = []
    for name in ("pointwise_conv", "conv_with_matmul_kernel_grad"):
        original = getattr(frcnn_ops, name)
        monkeypatch.setattr(frcnn_ops, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = np.zeros((1, 7, 7, 6), np.float32)
    for kernel, expected in ((1, "pointwise_conv"), (3, "conv_with_matmul_kernel_grad")):
        ours, _ = _pair(kernel, 1, "same", True)
        plain, _ = _pair(kernel, 1, "same", False)
        ours(x, training=False)
        ours(x)
        plain(x, training=True)
        assert calls == []  # inference, or not asked for: Keras' convolution
        ours(x, training=True)
        assert calls == [expected]
        calls.clear()
    # kernel_grad (the RPN conv): the 3x3 kernel gradient as a matrix product, 1x1 convolutions left to Keras
    for kernel, expected in ((1, []), (3, ["conv_with_matmul_kernel_grad"])):
        layer, _ = _pair(kernel, 1, "same", "kernel_grad")
        layer(x, training=True)
        assert calls == expected
        calls.clear()


def test_rpn_conv_uses_the_kernel_gradient_form():
    from frcnn.heads import RPNHead

    head = RPNHead(3, channels=8)
    assert isinstance(head.conv, backbone.Conv2D) and head.conv.matmul_form == "kernel_grad"
