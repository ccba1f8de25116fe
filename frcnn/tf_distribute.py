"""``tf.distribute`` for the training job and the model: strategies, the replicas' shared decisions, and the model
subclass that works around what Keras 3 does differently under a strategy. TensorFlow only: imported only on the
TensorFlow backend (the training job asks :func:`frcnn.distribution.make_distribution`, ``frcnn.model.build_model``
asks :func:`frcnn.replicas.in_tf_strategy`).

How a step is distributed (Keras 3 ``fit``; see README "Multiple GPUs and machines"):

- ``fit`` distributes the ``tf.data`` dataset of GLOBAL batches (``train.batch_size``) with
  ``strategy.experimental_distribute_dataset``: each of the N replicas gets ``batch_size / N`` images (under
  multi-worker training every worker builds the same dataset and keeps its own part of each global batch).
- Each replica's losses are normalised over its own images; the replica divides its total by N before
  differentiating (:meth:`DistributedFasterRCNN.compute_loss`) and the optimizer SUMS the replicas' gradients
  (Keras' all-reduce), so the update uses the mean over replicas.
- Keras clips gradients and checks them for overflow (mixed_float16) on each replica BEFORE its all-reduce;
  :func:`sync_replica_gradients`, run by the optimizers of :mod:`frcnn.tf_optimizers` (:class:`ReplicaConsistentApply`),
  makes both decisions global.
- Checkpoints and logs are written by the chief only; every worker restores the same checkpoint.

Owns: everything that knows about ``tf.distribute``. Imports TensorFlow; nothing outside the TensorFlow path may
import it.
"""

import json
import logging
import os

import keras
import tensorflow as tf

from frcnn.errors import TrainingError
from frcnn.model import GT_KEYS, FasterRCNN, batch_dict
from frcnn.replicas import multi_worker, num_replicas, num_workers, replicas_of

log = logging.getLogger(__name__)


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


class TFDistribution:
    """The training job's view of a ``tf.distribute`` strategy (see :mod:`frcnn.distribution` for the interface)."""

    def __init__(self, name):
        self.strategy = make_strategy(name)  # first, before any TensorFlow op: multi-worker configures collectives
        self.num_replicas = self.strategy.num_replicas_in_sync
        self.is_chief = is_chief(self.strategy)
        self.description = (f"{type(self.strategy).__name__}: {self.num_replicas} replicas"
                            if self.num_replicas > 1 else None)

    def scope(self):
        return self.strategy.scope()

    def check_workers_agree(self, values, what):
        check_workers_agree(self.strategy, values, what)

    def distribute_dataset(self, dataset):
        # Under multi-worker training every worker builds the same (identically seeded) dataset and keeps its own
        # part of each global batch (DATA sharding; there is no file list to shard by).
        if not isinstance(dataset, tf.data.Dataset):  # the NumPy pipeline (a keras.utils.PyDataset): as it is
            return dataset
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)


# ------------------------------------------------------------------------------------------- replica decisions


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


class ReplicaConsistentApply:
    """Optimizer mixin: ``apply`` passes the gradients through :func:`sync_replica_gradients` first, so that under
    ``tf.distribute`` clipping and loss-scale skips are decided on the global gradient, not per replica. Keras' own
    ``train_step`` calls ``apply``; on one replica nothing changes."""

    def apply(self, grads, trainable_variables=None):
        return super().apply(sync_replica_gradients(list(grads), self), trainable_variables)


# ------------------------------------------------------------------------------------------------- the model


@keras.saving.register_keras_serializable(package="frcnn")
class DistributedFasterRCNN(FasterRCNN):
    """:class:`frcnn.model.FasterRCNN` built under a ``tf.distribute`` strategy (``frcnn.model.build_model`` picks it
    there). The same model and weights; three places where Keras 3 needs help under a strategy."""

    def compute_loss(self, *args, **kwargs):
        # Each replica sees its share of the global batch and the replicas' gradients are summed: each replica's
        # loss is divided by their number (as Keras' compiled losses do), so the update follows the global mean.
        return super().compute_loss(*args, **kwargs) / num_replicas()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if multi_worker():
            # Keras 3 averages each logged value over the workers with strategy.reduce("MEAN", value, axis=0),
            # which fails on a scalar (tensorflow/tensorflow#72388): hand it 1-element vectors (it returns scalars).
            logs = {name: tf.reshape(value, (1,)) for name, value in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # For a model created under a strategy, Keras takes the first batch of fit/evaluate and averages it over the
        # replicas (strategy.reduce("MEAN")) to build the model symbolically: that fails on our bool (gt_valid)
        # entries. build_model has built every layer already, so there is nothing to build from data; Keras then
        # only builds the optimizer.
        if iterator is not None and all(layer.built for layer in self._flatten_layers()):
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def predict_on_batch(self, x):
        """Detections of one batch, run ONCE on the first replica's copy of the weights.

        With several replicas, Keras' ``predict_on_batch`` runs the whole batch on every replica and concatenates
        the copies (each image N times). Here the batch runs in one plain ``tf.function`` outside the strategy, with
        no collective operation, so under multi-worker training the chief can evaluate alone."""
        if replicas_of(self) == 1:
            return super().predict_on_batch(x)
        x = {key: tf.convert_to_tensor(value) for key, value in batch_dict(x).items() if key not in GT_KEYS}
        cache = self.__dict__.setdefault("_local_predict", [])  # out of sight of Keras' attribute tracking
        if not cache:
            cache.append(tf.function(lambda batch: self(batch, training=False), reduce_retracing=True))
        return {name: value.numpy() for name, value in cache[0](x).items()}

    def fold_batchnorm(self):
        folded = super().fold_batchnorm()
        if folded:
            self.__dict__.pop("_local_predict", None)
        return folded

