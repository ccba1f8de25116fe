"""frcnn.optim (schedules, make_optimizer) and frcnn.tf_optimizers (the fused kernels): formulas against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from frcnn import optim, tf_optimizers
from frcnn.config import load_config


def test_warmup_step_decay_schedule():
    sched = optim.WarmupStepDecay(0.1, warmup_steps=10, warmup_factor=0.01, boundaries=[20, 30], gamma=0.1)
    lr = [float(sched(s)) for s in (0, 5, 10, 19, 20, 29, 30, 100)]
    np.testing.assert_allclose(lr, [0.001, 0.0505, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)
    again = optim.WarmupStepDecay.from_config(sched.get_config())
    assert float(again(25)) == pytest.approx(0.01)


def test_warmup_cosine_schedule():
    sched = optim.WarmupCosineDecay(0.1, warmup_steps=10, warmup_factor=0.01, total_steps=100)
    steps = np.array([0, 5, 10, 50, 75, 100, 150])
    want = 0.1 * 0.5 * (1 + np.cos(np.pi * np.minimum(steps / 100, 1)))
    warm = np.minimum(steps / 10, 1)
    want = want * (0.01 * (1 - warm) + warm)
    np.testing.assert_allclose([float(sched(s)) for s in steps], want, rtol=1e-5, atol=1e-9)
    assert float(sched(50)) == pytest.approx(0.05) and float(sched(100)) == pytest.approx(0.0, abs=1e-9)
    again = optim.WarmupCosineDecay.from_config(sched.get_config())
    assert float(again(75)) == pytest.approx(float(sched(75)))
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.epochs=3", "train.scale_lr=false", "train.lr=0.02",
                             "train.warmup_steps=0"])
    schedule = optim.make_optimizer(cfg, steps_per_epoch=10)._learning_rate
    assert isinstance(schedule, optim.WarmupCosineDecay) and schedule.total_steps == 30
    with pytest.raises(Exception, match="train.lr_schedule"):
        load_config(None, ["train.lr_schedule=linear"])


def test_optimizer_from_config_scales_lr_and_skips_decay_of_norms():
    cfg = load_config(None, ["train.batch_size=4", "train.lr=0.02", "train.reference_batch_size=16"])
    assert optim.learning_rate(cfg) == pytest.approx(0.005)
    opt = optim.make_optimizer(cfg, steps_per_epoch=100)
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
    opt = optim.make_optimizer(cfg, steps_per_epoch=5)
    inner = getattr(opt, "inner_optimizer", opt)
    assert isinstance(inner, optim.WeightDecayGroups) and inner.weight_decay_mode == "coupled"
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
        opt = tf_optimizers.SGD(0.05, momentum=0.9, nesterov=nesterov, weight_decay_mode="coupled",
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
    opt = optim.make_optimizer(cfg, steps_per_epoch=100)
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
    cls = tf_optimizers.Adam if kind == "adam" else tf_optimizers.SGD
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
