"""One shared check for every custom Keras layer of frcnn, in the shape of keras-hub's ``run_layer_test``.

:func:`run_layer_test` builds the layer from its constructor arguments and checks, on small inputs (CPU):

1. the output shapes, on eager inputs and on symbolic ``keras.Input`` (static batch shapes);
2. the config round trip: ``from_config(get_config())`` and ``serialize`` / ``deserialize`` give the same config,
   and the clone, given the original's weights, the same outputs;
3. save and load: a functional model holding the layer, saved as ``.keras`` and loaded back, gives identical outputs;
4. one training step, when the layer has trainable weights: the loss (the sum of the means of the float outputs of a
   call with ``train_kwargs``, e.g. the ground truth of the RPN and ROI parts) is finite, every trainable weight gets
   a finite gradient, and one SGD step changes the weights;
5. mixed precision: built and run under the ``mixed_bfloat16`` global policy (what ``build_model`` sets from
   ``train.mixed_precision``), every variable stays float32 and every float output is bfloat16 except those listed in
   ``float32_outputs``, which are float32 by design (boxes, probabilities, losses).

Outputs are compared as flat lists (``keras.tree.flatten``: a dict in sorted key order, an empty losses dict
contributes nothing); ``float32_outputs`` are indices into that list.
"""

import copy
import os

import keras
import numpy as np
import tensorflow as tf


def _make(layer_cls, init_kwargs):
    """A new layer; ``init_kwargs`` may be a function returning them (for arguments that are layers themselves,
    which must be created afresh, e.g. under the mixed policy)."""
    return layer_cls(**(init_kwargs() if callable(init_kwargs) else init_kwargs))


def _call(layer, inputs, list_input, **kwargs):
    return layer(list(inputs), **kwargs) if list_input else layer(*inputs, **kwargs)


def _numpy_outputs(outputs):
    return [np.asarray(keras.ops.convert_to_numpy(x)) for x in keras.tree.flatten(outputs)]


def _assert_same(actual, expected, atol, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: output {i} is {a.dtype}{a.shape}, not {e.dtype}{e.shape}"
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(a, e, atol=atol, rtol=0, err_msg=f"{what}: output {i}")
        else:
            np.testing.assert_array_equal(a, e, err_msg=f"{what}: output {i}")


def _functional(layer, inputs, list_input, call_kwargs):
    symbolic = [keras.Input(batch_shape=np.shape(x), dtype=str(np.asarray(x).dtype)) for x in inputs]
    outputs = keras.tree.flatten(_call(layer, symbolic, list_input, **call_kwargs))
    return keras.Model(symbolic, outputs)


def _check_training_step(layer, inputs, list_input, train_kwargs):
    weights = layer.trainable_weights
    before = [np.array(w.numpy()) for w in weights]
    with tf.GradientTape() as tape:
        outputs = keras.tree.flatten(_call(layer, inputs, list_input, training=True, **train_kwargs))
        floats = [keras.ops.mean(keras.ops.cast(x, "float32")) for x in outputs if "float" in str(x.dtype)]
        loss = keras.ops.sum(keras.ops.stack(floats))
    assert np.isfinite(float(loss)), f"training loss {float(loss)}"
    grads = tape.gradient(loss, weights)
    missing = [w.path for w, g in zip(weights, grads) if g is None]
    assert not missing, f"no gradient reaches {missing}"
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    keras.optimizers.SGD(learning_rate=0.1).apply_gradients(zip(grads, weights))
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, weights)), "one SGD step changed nothing"


def run_layer_test(layer_cls, init_kwargs, inputs, expected_output_shapes, tmp_path, *, list_input=False,
                   call_kwargs=None, train_kwargs=None, float32_outputs=(), expect_weights=None, atol=1e-6):
    """Run the checks in the module docstring; returns the layer (float32 policy) for further checks.

    ``inputs``: NumPy arrays, passed as one list (``list_input=True``, e.g. ``[features, rois]``) or as positional
    arguments. ``expected_output_shapes``: the shape of each output, in the flat order above.
    ``call_kwargs``: extra arguments of every inference call; ``train_kwargs``: those of the training step.
    ``expect_weights``: whether the layer has trainable weights (checked; the training step runs when it has).
    """
    call_kwargs = dict(call_kwargs or {})
    layer = _make(layer_cls, init_kwargs)
    outputs = _call(layer, [keras.ops.convert_to_tensor(x) for x in inputs], list_input, **call_kwargs)
    expected_shapes = [tuple(shape) for shape in expected_output_shapes]
    reference = _numpy_outputs(outputs)
    assert [x.shape for x in reference] == expected_shapes

    # 1. symbolic shapes
    symbolic = _call(_make(layer_cls, init_kwargs),
                     [keras.Input(batch_shape=np.shape(x), dtype=str(np.asarray(x).dtype)) for x in inputs],
                     list_input, **call_kwargs)
    assert [tuple(x.shape) for x in keras.tree.flatten(symbolic)] == expected_shapes

    # 2. config round trip
    config = layer.get_config()
    clone = layer_cls.from_config(copy.deepcopy(config))  # Keras' Wrapper.from_config pops keys from its argument
    assert clone.get_config() == config, _config_diff(clone.get_config(), config)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, layer_cls) and restored.get_config() == config
    for twin, what in ((clone, "from_config"), (restored, "deserialize_keras_object")):
        _call(twin, inputs, list_input, **call_kwargs)  # builds its weights
        twin.set_weights(layer.get_weights())
        _assert_same(_numpy_outputs(_call(twin, inputs, list_input, **call_kwargs)), reference, atol, what)

    # 3. save and load of a model holding the layer
    model = _functional(layer, inputs, list_input, call_kwargs)
    path = os.path.join(str(tmp_path), f"{layer_cls.__name__}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    _assert_same(_numpy_outputs(loaded(list(inputs))), _numpy_outputs(model(list(inputs))), 0.0, "saved and loaded")
    assert any(isinstance(sub, layer_cls) for sub in loaded.layers)

    # 4. one training step
    has_weights = bool(layer.trainable_weights)
    if expect_weights is not None:
        assert has_weights == expect_weights, f"{layer_cls.__name__} trainable weights: {len(layer.trainable_weights)}"
    if has_weights:
        _check_training_step(layer, inputs, list_input, dict(train_kwargs or call_kwargs))

    # 5. mixed precision
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = _make(layer_cls, init_kwargs)
        cast = _feature_maps(inputs)
        mixed_inputs = [keras.ops.cast(x, "bfloat16") if i in cast else x for i, x in enumerate(inputs)]
        mixed_outputs = keras.tree.flatten(_call(mixed, mixed_inputs, list_input, **call_kwargs))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert all(w.dtype == "float32" for w in mixed.weights), "a variable is not float32 under mixed_bfloat16"
    for i, x in enumerate(mixed_outputs):
        dtype = keras.backend.standardize_dtype(x.dtype)
        if i in float32_outputs:
            assert dtype == "float32", f"output {i} is {dtype}, float32 by design"
        elif "float" in dtype:
            assert dtype == "bfloat16", f"output {i} is {dtype}, expected the compute dtype bfloat16"
        else:
            assert dtype == reference[i].dtype, f"output {i} is {dtype}, expected {reference[i].dtype}"
    return layer


def _feature_maps(inputs):
    """Feature maps (4-D and more, floating) arrive in the compute dtype under mixed precision, as from the trunk;
    boxes and sizes stay as they are."""
    return {i for i, x in enumerate(inputs) if np.issubdtype(np.asarray(x).dtype, np.floating) and np.ndim(x) >= 4}


def _config_diff(a, b):
    return "configs differ: " + "; ".join(f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b))
                                          if a.get(k) != b.get(k))
