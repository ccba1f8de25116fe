"""Optimisation: the learning-rate schedules and :func:`make_optimizer`, the optimizer a config describes.

- :class:`WarmupStepDecay`: linear warm-up, then the rate times ``gamma`` at each boundary (Detectron2's
  ``WarmupMultiStepLR``); :class:`WarmupCosineDecay`: linear warm-up times a cosine to 0 at the last step.
- :func:`make_optimizer`: SGD with momentum or Adam, weight decay per group of variables (kernels, biases, norms;
  decoupled as Keras or coupled as torch's SGD, :class:`WeightDecayGroups`), optional global-norm clipping, loss
  scaling under ``mixed_float16``. On TensorFlow the optimizers of :mod:`frcnn.tf_optimizers` (replica-consistent
  decisions under ``tf.distribute``; fused kernels where ``train.speed_paths`` allows); Keras' own elsewhere.

Owns: schedules and optimizers. Imports TensorFlow only on the TensorFlow backend (through ``tf_optimizers``).
"""

import math

import keras

from frcnn.precision import speed_paths_on


@keras.saving.register_keras_serializable(package="frcnn")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``base_lr * warmup_factor`` to ``base_lr`` over ``warmup_steps``, then step decay:
    the rate is multiplied by ``gamma`` at each step in ``boundaries``."""

    def __init__(self, base_lr, warmup_steps, warmup_factor, boundaries, gamma):
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.boundaries = [int(b) for b in boundaries]
        self.gamma = float(gamma)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        decays = 0.0
        for boundary in self.boundaries:
            decays = decays + keras.ops.cast(step >= boundary, "float32")
        lr = self.base_lr * keras.ops.power(self.gamma, decays)
        return _warmup(lr, step, self.warmup_steps, self.warmup_factor)

    def get_config(self):
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps, "warmup_factor": self.warmup_factor,
                "boundaries": self.boundaries, "gamma": self.gamma}


def _warmup(lr, step, warmup_steps, warmup_factor):
    """``lr`` scaled by the linear warm-up factor at ``step`` (from ``warmup_factor`` to 1 over ``warmup_steps``)."""
    if warmup_steps <= 0:
        return lr
    alpha = keras.ops.minimum(step / warmup_steps, 1.0)
    return lr * (warmup_factor * (1.0 - alpha) + alpha)


@keras.saving.register_keras_serializable(package="frcnn")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up as in :class:`WarmupStepDecay`, times a cosine decay from ``base_lr`` at step 0 to 0 at
    ``total_steps`` (Loshchilov & Hutter's SGDR without restarts; Detectron2's ``WarmupCosineLR``)."""

    def __init__(self, base_lr, warmup_steps, warmup_factor, total_steps):
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        progress = keras.ops.minimum(step / max(self.total_steps, 1), 1.0)
        lr = self.base_lr * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        return _warmup(lr, step, self.warmup_steps, self.warmup_factor)

    def get_config(self):
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps, "warmup_factor": self.warmup_factor,
                "total_steps": self.total_steps}


def learning_rate(cfg):
    """The base rate for ``train.batch_size`` (linear scaling rule from ``reference_batch_size``)."""
    t = cfg.train
    return t.lr * t.batch_size / t.reference_batch_size if t.scale_lr else t.lr


def make_schedule(cfg, steps_per_epoch):
    t = cfg.train
    if t.lr_schedule == "cosine":
        return WarmupCosineDecay(learning_rate(cfg), t.warmup_steps, t.warmup_factor, t.epochs * steps_per_epoch)
    return WarmupStepDecay(learning_rate(cfg), t.warmup_steps, t.warmup_factor,
                           [e * steps_per_epoch for e in t.lr_decay_epochs], t.lr_gamma)


class WeightDecayGroups:
    """Optimizer mixin: weight decay at one rate per group of variables, decoupled (Keras) or coupled (torch's SGD,
    which Detectron2 trains with).

    ``weight_decay_groups`` ``{"kernel", "bias", "norm"}``: the rate of the variables named ``bias``, of the
    normalisation parameters (``gamma``, ``beta``) and of every other variable (kernels). ``weight_decay_mode``:

    - ``decoupled``: ``w -= lr * rate * w`` before the update (Keras' ``weight_decay``, per group);
    - ``coupled``: ``g += rate * w`` before the update, i.e. an L2 term in the loss, as ``torch.optim.SGD``'s
      ``weight_decay`` (Detectron2: ``SOLVER.WEIGHT_DECAY``, ``WEIGHT_DECAY_BIAS``, ``WEIGHT_DECAY_NORM``). SGD with
      momentum then also takes torch's momentum form, ``v = momentum * v + g``, ``w -= lr * v`` (Nesterov:
      ``w -= lr * (g + momentum * v)``), which differs from Keras' ``m = momentum * m - lr * g``, ``w += m`` only
      while the learning rate changes (warm-up, steps). With momentum 0.9 the coupled decay weighs about ten times
      as much as the decoupled one at the same rate.

    Without ``weight_decay_groups`` the optimizer is Keras' own (its ``weight_decay`` argument works as usual)."""

    def __init__(self, *args, weight_decay_groups=None, weight_decay_mode="decoupled", **kwargs):
        super().__init__(*args, **kwargs)
        if weight_decay_mode not in ("decoupled", "coupled"):
            raise ValueError(f"weight_decay_mode must be decoupled or coupled, got {weight_decay_mode!r}")
        if weight_decay_groups is not None:
            if self.weight_decay:
                raise ValueError("give either weight_decay or weight_decay_groups, not both")
            weight_decay_groups = {key: float(weight_decay_groups.get(key) or 0.0)
                                   for key in ("kernel", "bias", "norm")}
        self.weight_decay_groups = weight_decay_groups
        self.weight_decay_mode = weight_decay_mode

    @staticmethod
    def decay_group(variable):
        """``bias``, ``norm`` or ``kernel`` (everything else), from the variable's name."""
        name = variable.name.split("/")[-1].split(":")[0]
        return "bias" if name == "bias" else "norm" if name in ("gamma", "beta") else "kernel"

    def build(self, variables):
        super().build(variables)
        if self.weight_decay_groups is not None:
            self._decay_rates = [self.weight_decay_groups[self.decay_group(v)] for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        if self.weight_decay_groups is None:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        rate = self._decay_rates[index]
        dtype = variable.dtype
        lr = keras.ops.cast(learning_rate, dtype)
        if self.weight_decay_mode == "decoupled":
            if rate:
                self.assign_sub(variable, variable * (lr * rate))
            return super().update_step(gradient, variable, learning_rate)
        gradient = keras.ops.cast(gradient, dtype)
        if rate:
            gradient = gradient + variable * rate  # Python floats: no float32 rounding of the rates
        if not (isinstance(self, keras.optimizers.SGD) and self.momentum):
            return super().update_step(gradient, variable, learning_rate)
        return self._torch_momentum_step(gradient, variable, self.momentums[index], lr)

    def _torch_momentum_step(self, gradient, variable, velocity, lr):
        """torch's SGD momentum update (coupled mode); :mod:`frcnn.tf_optimizers` runs it as one fused kernel."""
        self.assign(velocity, velocity * self.momentum + gradient)
        step = gradient + velocity * self.momentum if self.nesterov else velocity
        self.assign_sub(variable, step * lr)

    def get_config(self):
        return {**super().get_config(), "weight_decay_groups": self.weight_decay_groups,
                "weight_decay_mode": self.weight_decay_mode}


@keras.saving.register_keras_serializable(package="frcnn")
class SGD(WeightDecayGroups, keras.optimizers.SGD):
    """Keras' SGD with weight decay per group (:class:`WeightDecayGroups`): the training SGD of the backends other
    than TensorFlow, and the optimizer inside a loss-scale wrapper (``mixed_float16``)."""


@keras.saving.register_keras_serializable(package="frcnn")
class Adam(WeightDecayGroups, keras.optimizers.Adam):
    """Keras' Adam with weight decay per group (:class:`WeightDecayGroups`)."""


def make_optimizer(cfg, steps_per_epoch):
    """The optimizer ``cfg.train`` describes, with its schedule over ``steps_per_epoch``-step epochs."""
    t = cfg.train
    schedule = make_schedule(cfg, steps_per_epoch)
    # Weight decay per group (WeightDecayGroups), not Keras' single rate: weight_decay_bias null is weight_decay.
    bias = t.weight_decay if t.weight_decay_bias is None else t.weight_decay_bias
    common = {"global_clipnorm": t.clip_norm,
              "weight_decay_groups": {"kernel": t.weight_decay, "bias": bias, "norm": t.weight_decay_norm},
              "weight_decay_mode": t.weight_decay_mode}
    if t.optimizer == "sgd":
        common["momentum"] = t.momentum
    loss_scaled = t.mixed_precision == "mixed_float16"
    plain = {"sgd": SGD, "adam": Adam}[t.optimizer]
    if keras.backend.backend() != "tensorflow":
        optimizer = plain(schedule, **common)
        return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaled else optimizer
    from frcnn import tf_optimizers

    # The outermost optimizer makes the replicas' decisions consistent under tf.distribute; with mixed_float16 that
    # is the loss-scale wrapper (made here, so compile() does not wrap again) around a plain optimizer.
    if loss_scaled:
        return tf_optimizers.LossScaleOptimizer(plain(schedule, **common))
    cls = {"sgd": tf_optimizers.SGD, "adam": tf_optimizers.Adam}[t.optimizer]
    return cls(schedule, fused_kernels=speed_paths_on(t.speed_paths), **common)
