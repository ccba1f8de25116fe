"""Checkpoints, resumption, NaN and Ctrl-C handling (frcnn.checkpoints, frcnn.callbacks and the engine's fit loop),
on a tiny Keras model (fast).

The same functions drive the detector in frcnn.engine.train; tests/test_train.py runs them on the real model.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from frcnn import callbacks, checkpoints, engine, errors


def tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    return model


def dataset(bad_step=None, n=64, same_batch=False):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    if same_batch:
        x[:] = x[0]
    y = x.sum(1, keepdims=True)
    if bad_step is not None:
        x[bad_step] = np.nan
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(1).repeat()


def run(model, ckpt, epochs, steps, start_step=0, every=0, extra=(), data=None):
    stop = callbacks.StopOnNonFinite()
    manager = checkpoints.CheckpointManager(str(ckpt), steps, every_steps=every)
    return engine.fit_resumable(model, data or dataset(), epochs, steps, [stop, *extra, manager], manager, stop,
                                  start_step=start_step, verbose=0), manager


def test_checkpoints_are_written_atomically_with_state(tmp_path):
    model = tiny_model()
    run(model, tmp_path, epochs=2, steps=5, every=2)
    state = checkpoints.read_state(str(tmp_path))
    assert state["epoch"] == 2 and state["global_step"] == 10 and state["steps_per_epoch"] == 5
    assert sorted(os.listdir(tmp_path)) == ["last.weights.h5", "state.json"]  # no temporary files left


def test_resume_mid_epoch_restores_step_and_optimizer_state(tmp_path):
    # An uninterrupted run of 3 epochs x 4 steps ...
    full = tiny_model()
    full.build((None, 3))
    initial = [w.copy() for w in full.get_weights()]
    # Every batch is the same, so only the model and optimizer state (momentum, step) can make runs differ.
    data = dataset(same_batch=True)
    run(full, tmp_path / "full", epochs=3, steps=4, data=data)
    # ... and one that stops after 6 steps (mid-epoch) and is resumed from its checkpoint by a fresh model.
    first = tiny_model()
    first.build((None, 3))
    first.set_weights(initial)
    run(first, tmp_path / "split", epochs=3, steps=4, every=3, extra=[StopAt(6)], data=data)
    state = checkpoints.read_state(str(tmp_path / "split"))
    assert state["global_step"] == 6 and state["epoch"] == 1
    resumed = tiny_model()
    resumed.build((None, 3))
    checkpoints.load_checkpoint(resumed, str(tmp_path / "split" / checkpoints.LAST_WEIGHTS), with_optimizer=True)
    assert int(resumed.optimizer.iterations.numpy()) == 6
    histories, _ = run(resumed, tmp_path / "split", epochs=3, steps=4, start_step=6, data=data)
    assert [len(h.history["loss"]) for h in histories] == [1, 1]  # the rest of epoch 2, then epoch 3
    assert int(resumed.optimizer.iterations.numpy()) == 12
    # Restored weights and optimizer state (momentum): the same final weights as the uninterrupted run.
    for a, b in zip(resumed.get_weights(), full.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class StopAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.step:
            self.model.stop_training = True


class InterruptAt(StopAt):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.step:
            raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        run(model, tmp_path, epochs=3, steps=4, extra=[InterruptAt(5)])
    state = checkpoints.read_state(str(tmp_path))
    assert state["global_step"] == 5


class NanHidingReLU(keras.layers.Layer):
    """ReLU that maps NaN to 0, as oneDNN's fused matmul + bias + ReLU kernel does: the loss stays finite while
    the NaN input still poisons the first layer's kernel through its gradient (NaN * 0 = NaN)."""

    def call(self, x):
        return keras.ops.where(x > 0, x, 0.0)


def nan_hiding_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), NanHidingReLU(), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    return model


@pytest.mark.parametrize("make_model", [tiny_model, nan_hiding_model], ids=["plain", "nan_hidden_from_loss"])
def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, make_model):
    # With oneDNN on (processors with AVX512_BF16/AMX), tiny_model's fused Dense + ReLU hides the NaN as well.
    model = make_model()
    with pytest.raises(errors.TrainingError,
                       match=r"non-finite (loss|weights .*) at epoch 2, batch 2 \(global step 6\)"):
        run(model, tmp_path, epochs=3, steps=4, every=1, data=dataset(bad_step=5))
    state = checkpoints.read_state(str(tmp_path))
    assert state["global_step"] == 5  # the checkpoint before the bad step
    good = make_model()
    good.build((None, 3))
    checkpoints.load_checkpoint(good, str(tmp_path / checkpoints.LAST_WEIGHTS))
    assert all(np.all(np.isfinite(w)) for w in good.get_weights())


def test_nan_hidden_from_the_loss_is_named_as_weights(tmp_path):
    model = nan_hiding_model()
    with pytest.raises(errors.TrainingError, match=r"non-finite weights \(.*kernel.*\) after a finite loss"):
        run(model, tmp_path, epochs=3, steps=4, data=dataset(bad_step=5))
    assert checkpoints.read_state(str(tmp_path))["global_step"] == 4  # the last epoch-end checkpoint


def test_nonfinite_variables_reads_the_current_values_each_call():
    # The check is compiled once per model: it must read the variables' values at each call, not the values they
    # held when it was traced, and name each bad variable, trainable or not.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    assert checkpoints.nonfinite_variables(model) == []
    kernel, variance = model.layers[0].kernel, model.layers[1].moving_variance
    good_kernel = kernel.numpy().copy()
    kernel.assign(np.where(np.arange(12).reshape(3, 4) == 7, np.nan, good_kernel).astype(np.float32))
    variance.assign(np.float32([1, np.inf, 1, 1]))
    assert checkpoints.nonfinite_variables(model) == [kernel.path, variance.path]
    kernel.assign(good_kernel)
    assert checkpoints.nonfinite_variables(model) == [variance.path]
    variance.assign(np.ones(4, np.float32))
    assert checkpoints.nonfinite_variables(model) == []


def test_epoch_end_does_not_rewrite_the_weights_a_periodic_save_just_wrote(tmp_path, monkeypatch):
    written = []
    real = checkpoints.atomic_save_weights
    monkeypatch.setattr(checkpoints, "atomic_save_weights",
                        lambda model, path: (written.append(os.path.basename(path)), real(model, path)))
    model = tiny_model()
    run(model, tmp_path, epochs=2, steps=4, every=2)  # periodic saves at steps 2, 4, 6, 8; epochs end at 4 and 8
    assert written.count(checkpoints.LAST_WEIGHTS) == 4
    state = checkpoints.read_state(str(tmp_path))
    assert state["global_step"] == 8 and state["epoch"] == 2
    saved = tiny_model()
    saved.build((None, 3))
    checkpoints.load_checkpoint(saved, str(tmp_path / checkpoints.LAST_WEIGHTS))
    for got, want in zip(saved.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_manager_refuses_nonfinite_weights(tmp_path):
    model = tiny_model()
    model.build((None, 3))
    model.optimizer.build(model.trainable_variables)
    manager = checkpoints.CheckpointManager(str(tmp_path), steps_per_epoch=4)
    manager.set_model(model)
    manager.save()
    before = (tmp_path / checkpoints.LAST_WEIGHTS).read_bytes()
    model.layers[0].kernel.assign(np.full((3, 4), np.nan, np.float32))
    manager.save()
    assert (tmp_path / checkpoints.LAST_WEIGHTS).read_bytes() == before


def test_bad_checkpoints_are_clear_errors(tmp_path):
    model = tiny_model()
    model.build((None, 3))
    with pytest.raises(errors.TrainingError, match="does not exist"):
        checkpoints.load_checkpoint(model, str(tmp_path / "missing.weights.h5"))
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    with pytest.raises(errors.TrainingError, match="other.weights.h5"):
        checkpoints.load_checkpoint(model, path)
    truncated = tmp_path / "truncated.weights.h5"
    model.save_weights(str(truncated))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.TrainingError, match="truncated.weights.h5"):
        checkpoints.load_checkpoint(model, str(truncated))


def test_unreadable_state_is_a_clear_error(tmp_path):
    model = tiny_model()
    model.build((None, 3))
    model.save_weights(str(tmp_path / checkpoints.LAST_WEIGHTS))
    (tmp_path / checkpoints.STATE_FILE).write_text("{not json")
    with pytest.raises(errors.TrainingError, match="state.json"):
        checkpoints.read_state(str(tmp_path))
    (tmp_path / checkpoints.STATE_FILE).write_text(json.dumps({"epoch": 1, "global_step": 3}))
    assert checkpoints.read_state(str(tmp_path))["global_step"] == 3
