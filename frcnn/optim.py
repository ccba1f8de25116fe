"""Optimisation: the learning-rate schedules and :func:`make_optimizer`, the optimizer a config describes.

- :class:`WarmupStepDecay`: linear warm-up, then the rate times ``gamma`` at each boundary (Detectron2's
  ``WarmupMultiStepLR``); :class:`WarmupCosineDecay`: linear warm-up times a cosine to 0 at the last step.
- :func:`make_optimizer`: SGD with momentum or Adam, weight decay on the kernels, optional global-norm clipping,
  loss scaling under ``mixed_float16``. On TensorFlow the optimizers of :mod:`frcnn.tf_optimizers` (replica-consistent
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


def make_optimizer(cfg, steps_per_epoch):
    """The optimizer ``cfg.train`` describes, with its schedule over ``steps_per_epoch``-step epochs."""
    t = cfg.train
    schedule = make_schedule(cfg, steps_per_epoch)
    common = {"global_clipnorm": t.clip_norm, "weight_decay": t.weight_decay or None}
    if t.optimizer == "sgd":
        common["momentum"] = t.momentum
    loss_scaled = t.mixed_precision == "mixed_float16"
    if keras.backend.backend() == "tensorflow":
        from frcnn import tf_optimizers

        # The outermost optimizer makes the replicas' decisions consistent; with mixed_float16 that is the
        # loss-scale wrapper (made here, so compile() does not wrap again) around a plain Keras optimizer.
        if loss_scaled:
            inner = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[t.optimizer](schedule, **common)
        else:
            cls = {"sgd": tf_optimizers.SGD, "adam": tf_optimizers.Adam}[t.optimizer]
            inner = cls(schedule, fused_kernels=speed_paths_on(t.speed_paths), **common)
        wrapper = tf_optimizers.LossScaleOptimizer
    else:
        inner = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[t.optimizer](schedule, **common)
        wrapper = keras.optimizers.LossScaleOptimizer
    if t.weight_decay:
        # Decay only the kernels, as is usual for detectors: biases and normalisation parameters are left alone.
        inner.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return wrapper(inner) if loss_scaled else inner
