"""Training: distribution strategy, optimizer and learning-rate schedule, checkpoints that survive any interruption.

Work directory layout (``--workdir``)::

    config.yaml                 resolved config (YAML), enough to rebuild the model without guessing
    checkpoints/last.weights.h5 model + optimizer state, written every ``checkpoint_every`` steps and each epoch
    checkpoints/state.json      {"epoch", "global_step", "best", ...} for the last checkpoint
    checkpoints/best.weights.h5 model (+ optimizer) at the best validation AP so far
    logs/                       TensorBoard

Every file is written to a temporary name in the same folder and renamed over the old one, so a run killed at any
moment (even SIGKILL) leaves the previous complete checkpoint in place; starting the same command again resumes
from it with the same epoch, global step and optimizer state (the data order of the resumed epoch differs). The
step resumed from is the one the weights file holds (the optimizer's ``iterations``), checked against
``state.json``, so a kill between the two renames cannot shift it. The training job owns the work directory
(:func:`own_workdir`, a kernel lock that dies with the process), and a checkpoint that does not fit on the disk
stops the run with a message, keeping the old one.
"""

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from frcnn.errors import TrainingError
from frcnn.fileio import DirectoryLocked, atomic_path, lock_directory
from frcnn.replicas import num_workers

log = logging.getLogger(__name__)

LAST_WEIGHTS = "last.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
STATE_FILE = "state.json"


def check_trainable(cfg):
    """Refuse, before any work, a configuration that cannot train (the message says what to use instead).

    Frozen normalisation keeps BatchNorm's statistics and affine parameters fixed; from random weights those are
    the identity (mean 0, variance 1), so nothing keeps the activations of 50 layers in range: the loss overflows
    within a few steps. Frozen norms need pretrained weights; training from scratch needs a norm that trains.
    """
    m = cfg.model
    if m.norm == "frozen" and m.backbone_weights.lower() == "none":
        raise TrainingError(
            "model.norm=frozen with model.backbone_weights=none cannot train: frozen BatchNorm keeps the identity "
            "statistics of randomly initialised weights and the loss diverges within a few steps. Train from "
            "scratch with model.norm=group (as configs/shapes.yaml does), or start from pretrained weights "
            "(model.backbone_weights=imagenet, a ResNet-50 .h5 file or detectron2:ImageNetPretrained/MSRA/R-50)"
        )
    if m.backbone_weights.lower() == "none" and m.freeze_at > 0:
        log.warning("model.freeze_at=%d with model.backbone_weights=none freezes randomly initialised layers; "
                    "use model.freeze_at=0 to train from scratch", m.freeze_at)


# ------------------------------------------------------------------------------------------------ distribution
#
# How a step is distributed (Keras 3 ``fit`` + ``FasterRCNN.train_step``; see README "Multiple GPUs and machines"):
# - ``fit`` distributes the ``tf.data`` dataset of GLOBAL batches (``train.batch_size``) with
#   ``strategy.experimental_distribute_dataset``: each of the N replicas gets ``batch_size / N`` images (under
#   multi-worker training every worker builds the same dataset and keeps its own part of each global batch).
# - Each replica's losses are means over its own images (normalised by its own sampled anchors / ROIs); the replica
#   divides its total by N before differentiating and the optimizer SUMS the replicas' gradients (Keras'
#   all-reduce), so the update uses the mean over replicas, which is the global-batch mean whenever every image
#   fills its anchor and ROI samples (the usual case, and what Detectron2 does across GPUs).
# - Keras clips gradients and checks them for overflow (mixed_float16) on each replica BEFORE its all-reduce;
#   :func:`sync_replica_gradients`, run by the optimizers of :func:`make_optimizer` (ReplicaConsistentApply),
#   makes both decisions global.
# - Checkpoints and logs are written by the chief only; every worker restores the same checkpoint.


def make_strategy(name):
    """``default`` (one device), ``mirrored`` (all local GPUs) or ``multi_worker`` (machines from ``TF_CONFIG``).

    ``mirrored`` without a GPU mirrors over the logical CPU devices when there are several (the tests split the CPU
    in two) and otherwise trains on the CPU as one replica, with a warning.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(cpus) < 2:
            log.warning("train.strategy=mirrored: no GPU found, training on the CPU as a single replica")
        return tf.distribute.MirroredStrategy(cpus)
    if name == "multi_worker":
        config = os.environ.get("TF_CONFIG")
        if not config:
            raise TrainingError("train.strategy=multi_worker needs the TF_CONFIG environment variable (see README, "
                                "'Multiple GPUs and machines')")
        try:
            task = json.loads(config)["task"]
            task["type"], int(task["index"])
        except (ValueError, KeyError, TypeError) as err:
            raise TrainingError(f"TF_CONFIG is not valid JSON with a 'cluster' and a 'task' {{'type', 'index'}} "
                                f"({type(err).__name__}: {err}): {config}") from err
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise TrainingError(f"unknown train.strategy '{name}'")


def is_chief(strategy=None):
    """True on the worker that writes checkpoints and logs (always true outside multi-worker training).

    The chief is the ``chief`` task when the cluster has one, else worker 0 (the ``TF_CONFIG`` conventions).
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def check_workers_agree(strategy, values, what):
    """Raise :class:`TrainingError` on every worker unless all workers hold the same integer ``values``.

    Multi-worker training needs every worker to make the same decisions (resume or not, from which step, with how
    many steps per epoch): a worker that disagrees would wait forever in a collective operation instead. Does
    nothing outside multi-worker training. Every worker must call it (it is a collective all-gather).
    """
    if num_workers(strategy) < 2:
        return
    local = tf.constant([list(values)], tf.int64)  # (1, V)
    per_replica = strategy.run(lambda: tf.identity(local))
    gathered = strategy.gather(per_replica, axis=0).numpy()  # (replicas, V)
    if not (gathered == gathered[0]).all():
        raise TrainingError(
            f"the workers disagree on {what}: {gathered.tolist()} (one row per replica). Every worker must see the "
            "same data, config and --workdir contents: use a shared --workdir (or copy the checkpoint to each machine)."
        )


def sync_replica_gradients(grads, optimizer):
    """Gradients to pass to ``optimizer.apply`` in a replica's ``train_step``, so that the decisions Keras takes per
    replica before its all-reduce become global ones.

    Keras 3 (TensorFlow backend) sums the replicas' gradients inside ``optimizer.apply``, but:

    - it clips (``global_clipnorm``) each replica's gradient BEFORE that sum. With clipping on, the gradients are
      summed here first, clipped as one global gradient, and each replica passes ``1 / N`` of the clipped sum: the
      optimizer's own sum then rebuilds it and its own clipping is a no-op (norm ``<= clip / N``). Costs a second
      all-reduce of the gradients, only when clipping is on.
    - ``LossScaleOptimizer`` (``mixed_float16``) decides to skip a step from the FIRST replica's local gradients
      only: an overflow on another replica would reach the weights (checked: the weights turn to inf). Here the
      replicas agree first (one scalar all-reduce) and, if any overflowed, every replica's gradients are made
      non-finite, so every replica skips the step and halves the loss scale.

    One replica (or no replica context): returns ``grads`` unchanged.
    """
    if keras.backend.backend() != "tensorflow":
        return grads
    context = tf.distribute.get_replica_context()
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if context is None or replicas == 1:
        return grads
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    inner = optimizer.inner_optimizer if loss_scaled else optimizer
    clip = getattr(inner, "global_clipnorm", None)
    present = [i for i, g in enumerate(grads) if g is not None]
    grads = list(grads)
    if clip:
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        # Under loss scaling the gradients are ``scale`` times too large: clip at ``clip * scale`` (a non-finite
        # norm makes every entry NaN, which the loss-scale optimizer skips on every replica alike).
        threshold = clip * tf.cast(optimizer.dynamic_scale, tf.float32) if loss_scaled else clip
        clipped, _ = tf.clip_by_global_norm([tf.cast(g, tf.float32) for g in summed], threshold)
        for i, g, original in zip(present, clipped, summed):
            grads[i] = tf.cast(g / replicas, original.dtype)
        return grads
    if loss_scaled and present:
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(grads[i])) for i in present])
        overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        first = present[0]
        poison = tf.where(overflowed > 0.0, float("nan"), 0.0)
        grads[first] = grads[first] + tf.cast(poison, grads[first].dtype)
    return grads


# --------------------------------------------------------------------------------------- optimizer and schedule


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
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
            "boundaries": self.boundaries,
            "gamma": self.gamma,
        }


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


def make_optimizer(cfg, steps_per_epoch):
    t = cfg.train
    if t.lr_schedule == "cosine":
        schedule = WarmupCosineDecay(learning_rate(cfg), t.warmup_steps, t.warmup_factor, t.epochs * steps_per_epoch)
    else:
        schedule = WarmupStepDecay(
            learning_rate(cfg),
            t.warmup_steps,
            t.warmup_factor,
            [e * steps_per_epoch for e in t.lr_decay_epochs],
            t.lr_gamma,
        )
    # Weight decay per group (WeightDecayGroups), not Keras' single rate: weight_decay_bias null is weight_decay.
    bias = t.weight_decay if t.weight_decay_bias is None else t.weight_decay_bias
    common = {"global_clipnorm": t.clip_norm, "weight_decay": None,
              "weight_decay_groups": {"kernel": t.weight_decay, "bias": bias, "norm": t.weight_decay_norm},
              "weight_decay_mode": t.weight_decay_mode}
    # The outermost optimizer syncs the replicas' decisions (ReplicaConsistentApply); with mixed_float16 that is the
    # loss-scale wrapper (made here, so compile() does not wrap again) and the inner optimizer is a plain one.
    loss_scaled = t.mixed_precision == "mixed_float16"
    if t.optimizer == "sgd":
        cls = PlainSGD if loss_scaled else SGD
        opt = cls(schedule, momentum=t.momentum, **common)
    else:
        cls = PlainAdam if loss_scaled else Adam
        opt = cls(schedule, **common)
    return LossScaleOptimizer(opt) if loss_scaled else opt


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
        velocity = self.momentums[index]
        if _fused_kernel_applies(gradient, variable):
            tf.raw_ops.ResourceApplyMomentum(var=variable.handle, accum=_handle(velocity), lr=lr, grad=gradient,
                                             momentum=tf.constant(self.momentum, dtype), use_nesterov=self.nesterov)
            return None
        self.assign(velocity, velocity * self.momentum + gradient)
        step = gradient + velocity * self.momentum if self.nesterov else velocity
        self.assign_sub(variable, step * lr)
        return None

    def get_config(self):
        return {**super().get_config(), "weight_decay_groups": self.weight_decay_groups,
                "weight_decay_mode": self.weight_decay_mode}


class ReplicaConsistentApply:
    """Optimizer mixin: ``apply`` passes the gradients through :func:`sync_replica_gradients` first, so that under
    ``tf.distribute`` clipping and loss-scale skips are decided on the global gradient, not per replica. Keras' own
    ``train_step`` calls ``apply``; on one replica and on other backends nothing changes."""

    def apply(self, grads, trainable_variables=None):
        return super().apply(sync_replica_gradients(list(grads), self), trainable_variables)


def _fused_kernel_applies(gradient, variable):
    """Whether a variable's update can be one fused TensorFlow kernel (``ResourceApply*``): the TensorFlow backend,
    a resource variable (Keras hands ``update_step`` the backend variable) and a dense gradient."""
    if keras.backend.backend() != "tensorflow":
        return False
    return hasattr(variable, "handle") and not isinstance(gradient, tf.IndexedSlices)


def _handle(slot):
    # A slot is a Keras variable; its backend variable (or, under tf.distribute, this replica's component of it
    # inside the strategy's update call) owns the resource handle the kernels update in place.
    return slot.value.handle


class _FusedSGD(keras.optimizers.SGD):
    """Keras' SGD. With momentum on TensorFlow, each variable's update is one fused kernel (the same formula:
    ``m = momentum * m - lr * g``, ``w += m``, or Nesterov's) instead of Keras' four elementwise passes."""

    def update_step(self, gradient, variable, learning_rate):
        if not self.momentum or not _fused_kernel_applies(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=_handle(self.momentums[self._get_variable_index(variable)]),
            lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.constant(self.momentum, dtype), use_nesterov=self.nesterov)


class _FusedAdam(keras.optimizers.Adam):
    """Keras' Adam. On TensorFlow each variable's update is one fused kernel (the same formula, Kingma & Ba's with
    epsilon added to ``sqrt(v)``) instead of Keras' ten elementwise passes over the variable and its two slots:
    three times faster here on a ResNet-50's 22 M parameters (docs/NOTES.md)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _fused_kernel_applies(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(tf.constant(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.constant(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.constant(self.beta_1, dtype),
            beta2=tf.constant(self.beta_2, dtype), epsilon=tf.constant(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))


@keras.saving.register_keras_serializable(package="frcnn")
class SGD(ReplicaConsistentApply, WeightDecayGroups, _FusedSGD):
    """The training SGD: fused updates (:class:`_FusedSGD`), weight decay per group (:class:`WeightDecayGroups`),
    replica-consistent ``apply``."""


@keras.saving.register_keras_serializable(package="frcnn")
class Adam(ReplicaConsistentApply, WeightDecayGroups, _FusedAdam):
    """The training Adam: fused updates (:class:`_FusedAdam`), weight decay per group, replica-consistent ``apply``."""


@keras.saving.register_keras_serializable(package="frcnn")
class PlainSGD(WeightDecayGroups, keras.optimizers.SGD):
    """Keras' SGD with weight decay per group: the optimizer inside :class:`LossScaleOptimizer` (mixed_float16)."""


@keras.saving.register_keras_serializable(package="frcnn")
class PlainAdam(WeightDecayGroups, keras.optimizers.Adam):
    """Keras' Adam with weight decay per group: the optimizer inside :class:`LossScaleOptimizer` (mixed_float16)."""


@keras.saving.register_keras_serializable(package="frcnn")
class LossScaleOptimizer(ReplicaConsistentApply, keras.optimizers.LossScaleOptimizer):
    pass


# ------------------------------------------------------------------------------------------------ checkpoints


def own_workdir(workdir, chief=True):
    """Context manager: this run owns ``workdir`` until it ends, or :class:`TrainingError` names the run that does.

    Only the chief takes the lock. Under multi-worker training the other workers share the chief's work directory
    (they read its checkpoint but write nothing there), so they must not be refused. The lock is released by the
    kernel however the process ends (see :func:`frcnn.fileio.lock_directory`).
    """
    if not chief:
        return contextlib.nullcontext()
    return _locked(workdir)


@contextlib.contextmanager
def _locked(workdir):
    try:
        with lock_directory(workdir, "training run"):
            yield
    except DirectoryLocked as err:  # only the lock raises it: the training body has no such error
        raise TrainingError(f"--workdir {err}") from None


# Beyond the variables' own bytes, an HDF5 weights file holds a group and a dataset header per variable.
_H5_OVERHEAD_BYTES = 1 << 20


def checkpoint_bytes(model, path=None):
    """About how many bytes ``model.save_weights`` will write: the model's and optimizer's variables plus HDF5
    overhead, or the size of the checkpoint already at ``path`` when that is larger (the best estimate there is)."""
    variables = list(model.weights)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables) + _H5_OVERHEAD_BYTES
    if path and os.path.isfile(path):
        total = max(total, os.path.getsize(path))
    return total


def _is_disk_full(err):
    # h5py does not always set errno: its message carries the C library's ("errno = 28, error message = ...").
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err) \
        or f"errno = {errno.ENOSPC}," in str(err)


def _no_space(path, needed, free, cause=None):
    directory = os.path.dirname(os.path.abspath(path))
    detail = f" ({cause})" if cause else ""
    return TrainingError(
        f"not enough disk space in {directory} to write {os.path.basename(path)}: it needs about {needed} bytes "
        f"({needed / 2**20:.1f} MiB), {free} bytes are free{detail}. Nothing was replaced: the last good checkpoint "
        "in that directory is kept. Free some space, then run the same command again to resume."
    )


@contextlib.contextmanager
def _guard_disk(path, needed):
    """Refuse to start a write of ``needed`` bytes that cannot fit, and turn a write that fails for lack of space
    into a :class:`TrainingError` naming the directory and the bytes needed.

    The check first: a full disk met inside h5py's C code ends in a traceback (at worst a crash) instead of a
    message. The write is atomic (:func:`frcnn.fileio.atomic_path`), so a failure leaves the old file in place and
    removes the partial one; the space check is an estimate (other processes write too), hence the catch as well.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise _no_space(path, needed, free)
    try:
        yield
    except OSError as err:
        if not _is_disk_full(err):
            raise
        raise _no_space(path, needed, shutil.disk_usage(directory).free, err.strerror or err) from None


def atomic_save_weights(model, path):
    """``model.save_weights`` (model and optimizer variables) to a temporary file, then rename over ``path``.

    The file holds the optimizer's ``iterations``: the global step of these weights, which a resumed run takes
    from the weights themselves (see :func:`restore_checkpoint`)."""
    with _guard_disk(path, checkpoint_bytes(model, path)):
        with atomic_path(path, ".weights.h5") as tmp:
            model.save_weights(tmp, overwrite=True)


def atomic_write_json(obj, path):
    text = json.dumps(obj, indent=2)
    with _guard_disk(path, len(text.encode()) + 4096):
        with atomic_path(path, ".json") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)


def has_checkpoint(checkpoint_dir):
    """True when ``checkpoint_dir`` holds a ``last`` weights file to resume from (with or without its state)."""
    return os.path.isfile(os.path.join(checkpoint_dir, LAST_WEIGHTS))


def restore_checkpoint(model, checkpoint_dir, steps_per_epoch, state=None):
    """Load the ``last`` checkpoint (model and optimizer) into the compiled ``model``; returns the state to resume
    from, whose ``global_step`` and ``epoch`` come from the WEIGHTS.

    The weights file and ``state.json`` are two files, each replaced atomically but not together: a run killed
    between the two renames leaves weights one checkpoint ahead of the state. The weights carry their own step
    (the optimizer's ``iterations``), so they are trusted and ``state.json`` is checked against them: a
    disagreement is logged and the weights' step wins, so a kill at any instant resumes exactly where the weights
    are. ``best`` and the rest still come from ``state.json`` (None without one).
    """
    path = os.path.join(checkpoint_dir, LAST_WEIGHTS)
    load_checkpoint(model, path, with_optimizer=True)
    step = int(model.optimizer.iterations.numpy())
    state = dict(state or {})
    recorded = state.get("global_step")
    if recorded is None:
        log.warning("%s has no (readable) %s: resuming from the step its weights hold, %d", checkpoint_dir,
                    STATE_FILE, step)
    elif int(recorded) != step:
        log.warning("%s says global step %s but %s holds step %d (the run was stopped between writing the two): "
                    "resuming from the weights' step %d", os.path.join(checkpoint_dir, STATE_FILE), recorded,
                    LAST_WEIGHTS, step, step)
    state.update(global_step=step, epoch=step // steps_per_epoch)
    return state


def read_state(checkpoint_dir):
    """The last checkpoint's state dict, or None when there is no complete checkpoint."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(checkpoint_dir, LAST_WEIGHTS))):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise TrainingError(f"checkpoint state '{path}' is unreadable ({err}); move it away to start afresh") from err


class CheckpointManager(keras.callbacks.Callback):
    """Writes ``last`` every ``every_steps`` steps and at each epoch end, and ``best`` when ``monitor`` improves.

    Weights and ``state.json`` are each replaced atomically; the state is written after the weights. A kill
    between the two leaves the state one checkpoint behind; :func:`restore_checkpoint` resumes from the step the
    weights hold. A write that does not fit on the disk raises :class:`TrainingError` and keeps the old files.
    Nothing is written after a non-finite loss, and never weights that hold a NaN or an infinity. When a periodic save
    fell on the epoch's last step, the epoch end (after validation, which changes no weight) does not write the same
    ``last`` weights again: only the state, for the new ``best``.
    """

    def __init__(self, checkpoint_dir, steps_per_epoch, every_steps=0, monitor="val_AP", best=None, chief=True):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.monitor = monitor
        self.best = best
        self.chief = chief
        self._periodic_step = None  # the global step of the last periodic save

    def global_step(self):
        return int(self.model.optimizer.iterations.numpy())

    def save(self, reason="", new_best=False, write_last=True):
        """Write ``last`` (unless ``write_last`` is false), ``best`` with ``new_best``, and the state."""
        step = self.global_step()
        epoch = step // self.steps_per_epoch  # completed epochs (a run stopped mid-epoch resumes inside it)
        # Only the chief writes. The other workers need not take part: save_weights reads the model and optimizer
        # variables, which are mirrored (each worker reads its own copy, no collective op); the metric variables,
        # whose reading would be a collective, are not saved. Two writers would race on a shared --workdir.
        if not self.chief:
            return
        bad = nonfinite_variables(self.model)
        if bad:
            # Never replace a good checkpoint with poisoned weights (StopOnNonFinite stops the run itself).
            log.error("checkpoint at step %d NOT written: non-finite values in %s", step, ", ".join(bad[:5]))
            return
        if new_best:
            atomic_save_weights(self.model, os.path.join(self.checkpoint_dir, BEST_WEIGHTS))
            log.info("new best %s = %.4f at epoch %d", self.monitor, self.best, epoch)
        if write_last:
            atomic_save_weights(self.model, os.path.join(self.checkpoint_dir, LAST_WEIGHTS))
        atomic_write_json(
            {"epoch": epoch, "global_step": step, "best": self.best, "monitor": self.monitor,
             "steps_per_epoch": self.steps_per_epoch},
            os.path.join(self.checkpoint_dir, STATE_FILE),
        )
        log.info("checkpoint saved at epoch %d, step %d%s", epoch, step, f" ({reason})" if reason else "")

    def on_train_batch_end(self, batch, logs=None):
        step = self.global_step()
        if self.every_steps and _finite(logs) and step % self.every_steps == 0:
            self.save("periodic")
            self._periodic_step = step

    def on_epoch_end(self, epoch, logs=None):
        if not _finite(logs):
            return
        value = (logs or {}).get(self.monitor)
        new_best = value is not None and np.isfinite(value) and (self.best is None or value > self.best)
        if new_best:
            self.best = float(value)
        self.save("end of epoch", new_best=new_best, write_last=self.global_step() != self._periodic_step)


def _finite(logs):
    loss = (logs or {}).get("loss")
    return loss is None or bool(np.isfinite(loss))


def nonfinite_variables(model):
    """Names of the model's variables (weights and normalisation statistics) holding a NaN or an infinity.

    The loss alone cannot be trusted to reveal a NaN: oneDNN's fused matmul + bias + ReLU kernel (on by default on
    processors with AVX512_BF16 or AMX) maps NaN to 0, so a NaN input can poison a layer's weights through its
    gradient while the reported loss stays finite. The weights cannot hide it. One reduction per variable, all in
    one compiled function (see :func:`_finite_flags`), read back in one go.
    """
    variables = model.weights
    if not variables:
        return []
    finite = keras.ops.convert_to_numpy(_finite_flags(model, variables))
    return [v.path for v, ok in zip(variables, finite) if not ok]


_FINITE_CHECKS = weakref.WeakKeyDictionary()  # model -> (ids of its variables, compiled check)


def _finite_flags(model, variables):
    """``(len(variables),)`` bools: each variable free of NaN and infinity.

    Run after every training step (:class:`StopOnNonFinite`), so it is compiled once per model and variable list:
    op by op, the 222 variables of the ResNet-50 detector took 45 ms here (10% of a shapes training step), as one
    TensorFlow graph 8 ms (docs/NOTES.md). JAX jits it over the variables' values; other backends run it eagerly.
    """
    key = tuple(id(v) for v in variables)
    cached = _FINITE_CHECKS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]()

    def flags(values):
        return keras.ops.stack([keras.ops.all(keras.ops.isfinite(v)) for v in values])

    backend = keras.backend.backend()
    if backend == "tensorflow":
        check = tf.function(lambda: flags(variables), autograph=False)
    elif backend == "jax":
        import jax

        jitted = jax.jit(flags)
        check = lambda: jitted([v.value for v in variables])  # noqa: E731
    else:
        check = lambda: flags(variables)  # noqa: E731
    _FINITE_CHECKS[model] = (key, check)
    return check()


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss or weight, naming the epoch and step.

    Checked after every step: the loss, then every variable of the model (see :func:`nonfinite_variables` for why
    the loss is not enough). :class:`CheckpointManager` also refuses to write non-finite weights, so the last
    checkpoint on disk is the last good one.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0
        self.message = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            what = "loss"
        else:
            bad = nonfinite_variables(self.model)
            if not bad:
                return
            what = f"weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) after a finite loss"
        step = int(self.model.optimizer.iterations.numpy())
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in (logs or {}).items())
        self.message = (
            f"non-finite {what} at epoch {self._epoch + 1}, batch {batch + 1} (global step {step}): {terms}. "
            "Training stopped; the last good checkpoint is kept. Check the input data for NaN values, then lower "
            "train.lr or set train.clip_norm."
        )
        self.model.stop_training = True


class TimeLeft(keras.callbacks.Callback):
    """Prints, after each epoch (its validation included), the time spent and an estimate of the time left for
    the whole run: Keras' progress bar estimates only the epoch in progress."""

    def __init__(self, total_epochs):
        super().__init__()
        self.total_epochs = total_epochs
        self._start = self._first = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._start is None:
            self._start, self._first = time.monotonic(), epoch

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1 - self._first
        spent = time.monotonic() - self._start
        left = spent / done * (self.total_epochs - epoch - 1)
        print(f"epoch {epoch + 1}/{self.total_epochs} done: {_minutes(spent)} so far, about {_minutes(left)} left")


def _minutes(seconds):
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def steps_per_epoch(cfg, num_train_images):
    """``train.steps_per_epoch`` when set (the data repeats as needed), else one pass over the training images at
    the global batch size."""
    if cfg.train.steps_per_epoch:
        return cfg.train.steps_per_epoch
    return max(1, math.ceil(num_train_images / cfg.train.batch_size))


def load_checkpoint(model, path, with_optimizer=False):
    """Load a ``.weights.h5`` checkpoint into ``model``; a missing, truncated or mismatched file is a clear error.

    Keras checks every variable's shape, so a checkpoint made for another number of classes (or another
    architecture) fails here instead of loading partially.
    """
    if not os.path.isfile(path):
        raise TrainingError(f"checkpoint '{path}' does not exist")
    if with_optimizer and model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(path)
    except Exception as err:  # h5py OSError on a truncated file, ValueError on shape or structure mismatch
        raise TrainingError(
            f"checkpoint '{path}' cannot be loaded into this model ({type(err).__name__}: {err}). Is it complete, "
            "and was it trained with the same classes and model settings (see the config.yaml next to it)?"
        ) from err


def fit_resumable(model, dataset, epochs, steps, callbacks, manager, stop_on_nan, start_step=0, verbose=1):
    """``model.fit`` from global step ``start_step`` to ``epochs * steps``; returns the Keras histories.

    ``fit`` cannot start in the middle of an epoch, so a run resumed mid-epoch first finishes that epoch with a
    shorter ``fit`` and then runs the remaining whole epochs. Ctrl-C saves a checkpoint (via ``manager``) before the
    ``KeyboardInterrupt`` goes on; a non-finite loss raises :class:`TrainingError` naming the step.
    """
    epoch, step_in_epoch = divmod(start_step, steps)
    histories = []
    common = {"callbacks": callbacks, "verbose": verbose, "shuffle": False}
    try:
        if step_in_epoch and epoch < epochs:
            histories.append(model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1,
                                       steps_per_epoch=steps - step_in_epoch, **common))
            epoch += 1
        if epoch < epochs and not stop_on_nan.message:
            histories.append(model.fit(dataset, initial_epoch=epoch, epochs=epochs, steps_per_epoch=steps, **common))
    except KeyboardInterrupt:
        manager.save("interrupted")
        print(f"\ninterrupted: checkpoint saved in {manager.checkpoint_dir}; run the same command again to resume")
        raise
    if stop_on_nan.message:
        raise TrainingError(stop_on_nan.message)
    return histories
