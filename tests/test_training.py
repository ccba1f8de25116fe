"""Checkpointing, resumption, NaN and Ctrl-C handling of frcnn.training, on a tiny Keras model (fast).

The same functions drive the detector in frcnn.engine.train; tests/test_train.py runs them on the real model.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from frcnn import training
from frcnn.config import load_config


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
    stop = training.StopOnNonFinite()
    manager = training.CheckpointManager(str(ckpt), steps, every_steps=every)
    return training.fit_resumable(model, data or dataset(), epochs, steps, [stop, *extra, manager], manager, stop,
                                  start_step=start_step, verbose=0), manager


def test_warmup_step_decay_schedule():
    sched = training.WarmupStepDecay(0.1, warmup_steps=10, warmup_factor=0.01, boundaries=[20, 30], gamma=0.1)
    lr = [float(sched(s)) for s in (0, 5, 10, 19, 20, 29, 30, 100)]
    np.testing.assert_allclose(lr, [0.001, 0.0505, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)
    again = training.WarmupStepDecay.from_config(sched.get_config())
    assert float(again(25)) == pytest.approx(0.01)


def test_warmup_cosine_schedule():
    sched = training.WarmupCosineDecay(0.1, warmup_steps=10, warmup_factor=0.01, total_steps=100)
    steps = np.array([0, 5, 10, 50, 75, 100, 150])
    want = 0.1 * 0.5 * (1 + np.cos(np.pi * np.minimum(steps / 100, 1)))
    warm = np.minimum(steps / 10, 1)
    want = want * (0.01 * (1 - warm) + warm)
    np.testing.assert_allclose([float(sched(s)) for s in steps], want, rtol=1e-5, atol=1e-9)
    assert float(sched(50)) == pytest.approx(0.05) and float(sched(100)) == pytest.approx(0.0, abs=1e-9)
    again = training.WarmupCosineDecay.from_config(sched.get_config())
    assert float(again(75)) == pytest.approx(float(sched(75)))
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.epochs=3", "train.scale_lr=false", "train.lr=0.02",
                             "train.warmup_steps=0"])
    schedule = training.make_optimizer(cfg, steps_per_epoch=10)._learning_rate
    assert isinstance(schedule, training.WarmupCosineDecay) and schedule.total_steps == 30
    with pytest.raises(Exception, match="train.lr_schedule"):
        load_config(None, ["train.lr_schedule=linear"])


def test_optimizer_from_config_scales_lr_and_skips_decay_of_norms():
    cfg = load_config(None, ["train.batch_size=4", "train.lr=0.02", "train.reference_batch_size=16"])
    assert training.learning_rate(cfg) == pytest.approx(0.005)
    opt = training.make_optimizer(cfg, steps_per_epoch=100)
    assert isinstance(opt, keras.optimizers.SGD)
    # float64: the first warmup step decays by lr * weight_decay = 5e-10, below float32's resolution at 1.0.
    bias = keras.Variable(np.ones(3), name="bias", dtype="float64")
    kernel = keras.Variable(np.ones(3), name="kernel", dtype="float64")
    gamma = keras.Variable(np.ones(3), name="gamma", dtype="float64")
    opt.build([bias, kernel, gamma])
    opt.apply_gradients([(np.zeros(3), v) for v in (bias, kernel, gamma)])  # a zero gradient: only decay moves them
    decayed = {v.name: bool(np.all(v.numpy() < 1.0)) for v in (bias, kernel, gamma)}
    assert decayed["kernel"] and not decayed["bias"] and not decayed["gamma"]


def _torch_sgd(params, grads, lrs, momentum, rates, nesterov=False):
    """torch.optim.SGD.step in float64 NumPy (dampening 0), one rate per parameter group: ``d = g + wd * w``;
    ``buf = d`` at the first step, then ``buf = momentum * buf + d``; ``w -= lr * buf`` (Nesterov: ``lr * (d +
    momentum * buf)``)."""
    params = [p.astype(np.float64) for p in params]
    bufs = [None] * len(params)
    for step, lr in enumerate(lrs):
        for i, (p, wd) in enumerate(zip(params, rates)):
            d = grads[step][i] + wd * p
            bufs[i] = d.copy() if bufs[i] is None else momentum * bufs[i] + d
            params[i] = p - lr * ((d + momentum * bufs[i]) if nesterov else bufs[i])
    return params


@pytest.mark.parametrize("precision", ["off", "mixed_float16"])
def test_coupled_weight_decay_per_group_follows_torch_sgd(precision):
    """Detectron2's solver: torch's SGD with L2 decay in the gradient, per group (kernels 1e-4, biases the same
    (WEIGHT_DECAY_BIAS None), norms 0), through warm-up (the rate changes every step) and a decay step."""
    cfg = load_config("detectron2_base.yaml", [
        "data.classes=[a]", "train.batch_size=16", "train.warmup_steps=3", "train.lr_decay_epochs=[1]",
        "train.weight_decay=0.01", f"train.mixed_precision={precision}"])  # 0.01: decay visible in a few steps
    opt = training.make_optimizer(cfg, steps_per_epoch=5)
    inner = getattr(opt, "inner_optimizer", opt)
    assert isinstance(inner, training.WeightDecayGroups) and inner.weight_decay_mode == "coupled"
    assert inner.weight_decay_groups == {"kernel": 0.01, "bias": 0.01, "norm": 0.0}
    rng = np.random.default_rng(0)
    init = {name: rng.standard_normal((3, 2)) for name in ("kernel", "bias", "gamma")}
    variables = [keras.Variable(init[name], name=name, dtype="float64") for name in init]
    grads = [[rng.standard_normal((3, 2)) for _ in variables] for _ in range(8)]
    opt.build(variables)
    lrs = [float(opt.learning_rate)]
    scale = float(opt.scale_loss(1.0)) if precision == "mixed_float16" else 1.0  # the loss-scale wrapper divides
    for step in grads:
        opt.apply([keras.ops.convert_to_tensor(g * scale) for g in step], variables)
        lrs.append(float(opt.learning_rate))
    assert lrs[0] < lrs[1] < lrs[3] and lrs[5] < lrs[4]  # the steps cover warm-up and the decay at step 5
    want = _torch_sgd(list(init.values()), grads, lrs[:-1], momentum=0.9, rates=[0.01, 0.01, 0.0])
    for var, expected in zip(variables, want):
        np.testing.assert_allclose(var.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_fused_torch_momentum_kernel_follows_torch_sgd():
    """Coupled mode on TensorFlow: one fused ResourceApplyMomentum per variable (torch's form), float32."""
    rng = np.random.default_rng(1)
    init = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)]
    grads = [[rng.standard_normal((3, 4)).astype(np.float32) for _ in init] for _ in range(4)]
    for nesterov in (False, True):
        opt = training.SGD(0.05, momentum=0.9, nesterov=nesterov, weight_decay_mode="coupled",
                           weight_decay_groups={"kernel": 0.1, "bias": 0.0, "norm": 0.0})
        variables = [keras.Variable(w, name=name) for w, name in zip(init, ("kernel", "bias"))]
        step = tf.function(lambda gs: opt.apply(gs, variables))
        for g in grads:
            step([tf.constant(x) for x in g])
        want = _torch_sgd(init, grads, [0.05] * 4, momentum=0.9, rates=[0.1, 0.0], nesterov=nesterov)
        for var, expected in zip(variables, want):
            np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)
        graph = step.get_concrete_function([tf.TensorSpec((3, 4))] * 2).graph
        assert "ResourceApplyMomentum" in {op.type for op in graph.get_operations()}


def test_decoupled_weight_decay_per_group():
    """frcnn's default: Keras' decoupled decay (w -= lr * rate * w before the update), per group."""
    cfg = load_config(None, ["train.weight_decay=0.1", "train.weight_decay_bias=0.05", "train.weight_decay_norm=0.02",
                             "train.warmup_steps=0", "train.scale_lr=false", "train.lr=0.5"])
    opt = training.make_optimizer(cfg, steps_per_epoch=100)
    assert opt.weight_decay_mode == "decoupled"
    variables = [keras.Variable(np.ones(3), name=name, dtype="float64") for name in ("kernel", "bias", "beta")]
    opt.build(variables)
    opt.apply([np.zeros(3)] * 3, variables)  # a zero gradient: only the decay moves them
    np.testing.assert_allclose([v.numpy()[0] for v in variables], [1 - 0.5 * 0.1, 1 - 0.5 * 0.05, 1 - 0.5 * 0.02])


def _numpy_updates(kind, w, grads, lr, wd=0.0, momentum=0.9, nesterov=False, b1=0.9, b2=0.999, eps=1e-7):
    """The optimizers' formulas in float64 NumPy: decoupled weight decay first, then Adam (Kingma & Ba, epsilon
    added to sqrt(v)) or SGD with momentum (Keras' form: m = momentum m - lr g; w += m, or Nesterov's)."""
    w, m, v = w.astype(np.float64), np.zeros_like(w, np.float64), np.zeros_like(w, np.float64)
    for t, g in enumerate(grads, start=1):
        w = w - lr * wd * w
        if kind == "adam":
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            w = w - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        else:
            m = momentum * m - lr * g
            w = w + (momentum * m - lr * g if nesterov else m)
    return w


@pytest.mark.parametrize("kind, kwargs, kernel", [
    ("adam", dict(weight_decay=0.1), "ResourceApplyAdam"),
    ("sgd", dict(momentum=0.9), "ResourceApplyKerasMomentum"),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.1), "ResourceApplyKerasMomentum"),
])
def test_fused_optimizer_updates_follow_the_formulas(kind, kwargs, kernel):
    """On TensorFlow each variable's update is one fused kernel; the result is the optimizer's formula."""
    rng = np.random.default_rng(0)
    init = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4)]
    cls = training.Adam if kind == "adam" else training.SGD
    opt = cls(0.05, **kwargs)
    var = keras.Variable(init, name="kernel")
    step = tf.function(lambda g: opt.apply([g], [var]))
    for g in grads:
        step(tf.constant(g))
    options = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    want = _numpy_updates(kind, init, grads, 0.05, kwargs.get("weight_decay", 0.0), **options)
    np.testing.assert_allclose(var.numpy(), want, rtol=1e-5, atol=1e-6)
    ops = {op.type for op in step.get_concrete_function(tf.TensorSpec((3, 4))).graph.get_operations()}
    assert kernel in ops


def test_checkpoints_are_written_atomically_with_state(tmp_path):
    model = tiny_model()
    run(model, tmp_path, epochs=2, steps=5, every=2)
    state = training.read_state(str(tmp_path))
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
    state = training.read_state(str(tmp_path / "split"))
    assert state["global_step"] == 6 and state["epoch"] == 1
    resumed = tiny_model()
    resumed.build((None, 3))
    training.load_checkpoint(resumed, str(tmp_path / "split" / training.LAST_WEIGHTS), with_optimizer=True)
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
    state = training.read_state(str(tmp_path))
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
    with pytest.raises(training.TrainingError,
                       match=r"non-finite (loss|weights .*) at epoch 2, batch 2 \(global step 6\)"):
        run(model, tmp_path, epochs=3, steps=4, every=1, data=dataset(bad_step=5))
    state = training.read_state(str(tmp_path))
    assert state["global_step"] == 5  # the checkpoint before the bad step
    good = make_model()
    good.build((None, 3))
    training.load_checkpoint(good, str(tmp_path / training.LAST_WEIGHTS))
    assert all(np.all(np.isfinite(w)) for w in good.get_weights())


def test_nan_hidden_from_the_loss_is_named_as_weights(tmp_path):
    model = nan_hiding_model()
    with pytest.raises(training.TrainingError, match=r"non-finite weights \(.*kernel.*\) after a finite loss"):
        run(model, tmp_path, epochs=3, steps=4, data=dataset(bad_step=5))
    assert training.read_state(str(tmp_path))["global_step"] == 4  # the last epoch-end checkpoint


def test_nonfinite_variables_reads_the_current_values_each_call():
    # The check is compiled once per model: it must read the variables' values at each call, not the values they
    # held when it was traced, and name each bad variable, trainable or not.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    assert training.nonfinite_variables(model) == []
    kernel, variance = model.layers[0].kernel, model.layers[1].moving_variance
    good_kernel = kernel.numpy().copy()
    kernel.assign(np.where(np.arange(12).reshape(3, 4) == 7, np.nan, good_kernel).astype(np.float32))
    variance.assign(np.float32([1, np.inf, 1, 1]))
    assert training.nonfinite_variables(model) == [kernel.path, variance.path]
    kernel.assign(good_kernel)
    assert training.nonfinite_variables(model) == [variance.path]
    variance.assign(np.ones(4, np.float32))
    assert training.nonfinite_variables(model) == []


def test_epoch_end_does_not_rewrite_the_weights_a_periodic_save_just_wrote(tmp_path, monkeypatch):
    written = []
    real = training.atomic_save_weights
    monkeypatch.setattr(training, "atomic_save_weights",
                        lambda model, path: (written.append(os.path.basename(path)), real(model, path)))
    model = tiny_model()
    run(model, tmp_path, epochs=2, steps=4, every=2)  # periodic saves at steps 2, 4, 6, 8; epochs end at 4 and 8
    assert written.count(training.LAST_WEIGHTS) == 4
    state = training.read_state(str(tmp_path))
    assert state["global_step"] == 8 and state["epoch"] == 2
    saved = tiny_model()
    saved.build((None, 3))
    training.load_checkpoint(saved, str(tmp_path / training.LAST_WEIGHTS))
    for got, want in zip(saved.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_manager_refuses_nonfinite_weights(tmp_path):
    model = tiny_model()
    model.build((None, 3))
    model.optimizer.build(model.trainable_variables)
    manager = training.CheckpointManager(str(tmp_path), steps_per_epoch=4)
    manager.set_model(model)
    manager.save()
    before = (tmp_path / training.LAST_WEIGHTS).read_bytes()
    model.layers[0].kernel.assign(np.full((3, 4), np.nan, np.float32))
    manager.save()
    assert (tmp_path / training.LAST_WEIGHTS).read_bytes() == before


def test_bad_checkpoints_are_clear_errors(tmp_path):
    model = tiny_model()
    model.build((None, 3))
    with pytest.raises(training.TrainingError, match="does not exist"):
        training.load_checkpoint(model, str(tmp_path / "missing.weights.h5"))
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    with pytest.raises(training.TrainingError, match="other.weights.h5"):
        training.load_checkpoint(model, path)
    truncated = tmp_path / "truncated.weights.h5"
    model.save_weights(str(truncated))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(training.TrainingError, match="truncated.weights.h5"):
        training.load_checkpoint(model, str(truncated))


def test_unreadable_state_is_a_clear_error(tmp_path):
    model = tiny_model()
    model.build((None, 3))
    model.save_weights(str(tmp_path / training.LAST_WEIGHTS))
    (tmp_path / training.STATE_FILE).write_text("{not json")
    with pytest.raises(training.TrainingError, match="state.json"):
        training.read_state(str(tmp_path))
    (tmp_path / training.STATE_FILE).write_text(json.dumps({"epoch": 1, "global_step": 3}))
    assert training.read_state(str(tmp_path))["global_step"] == 3
