"""How the training job spreads a step over devices, whatever the backend: :func:`make_distribution`.

A distribution has ``scope()`` (where the model and optimizer are made), ``num_replicas``, ``is_chief`` (the process
that writes checkpoints and logs), ``check_workers_agree(values, what)`` (a collective check that every process
takes the same decisions), ``distribute_dataset(dataset)`` and ``description`` (None for one device).

- TensorFlow: ``train.strategy`` is a ``tf.distribute`` strategy (:class:`frcnn.tf_distribute.TFDistribution`).
- JAX, ``train.strategy=data_parallel``: Keras' ``keras.distribution.DataParallel`` over every local device
  (:class:`JaxDataParallel`): each device takes its share of the global batch, the gradients are averaged by XLA.
- Otherwise: one device (:class:`LocalDistribution`).

Owns: the choice of distribution. Imports TensorFlow only on the TensorFlow backend.
"""

import contextlib
import os

import keras

from frcnn.errors import TrainingError


class LocalDistribution:
    """One process, the backend's default device placement."""

    num_replicas = 1
    is_chief = True
    description = None

    def scope(self):
        return contextlib.nullcontext()

    def check_workers_agree(self, values, what):
        pass

    def distribute_dataset(self, dataset):
        return dataset


class JaxDataParallel(LocalDistribution):
    """``keras.distribution.DataParallel`` over every device of this process (JAX). Set before the model is built,
    so its variables are replicated and each batch is split along its first axis; the losses are those of the global
    batch (checked against one device: tests/test_jax_distribution.py).

    Several processes (``jax.distributed.initialize`` through ``keras.distribution.initialize``, from the
    ``KERAS_DISTRIBUTION_*`` variables) are refused for training: each process would need its own share of every
    batch from the input pipeline, which it does not cut yet (README, "JAX across devices")."""

    def __init__(self):
        import jax

        if int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")) > 1 or jax.process_count() > 1:
            raise TrainingError("train.strategy=data_parallel trains on the devices of one process; several "
                                "processes (KERAS_DISTRIBUTION_NUM_PROCESSES) need a sharded input pipeline, which "
                                "frcnn does not have yet")
        self.devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=self.devices))
        self.num_replicas = len(self.devices)
        self.description = f"DataParallel: {self.num_replicas} devices"


def make_distribution(cfg):
    """The distribution ``train.strategy`` names, for the current Keras backend."""
    backend = keras.backend.backend()
    strategy = cfg.train.strategy
    if strategy == "data_parallel":
        if backend != "jax":
            raise TrainingError(f"train.strategy=data_parallel is Keras' DataParallel for the JAX backend "
                                f"(KERAS_BACKEND=jax); this is {backend}"
                                + (": use train.strategy=mirrored or multi_worker" if backend == "tensorflow" else ""))
        return JaxDataParallel()
    if backend == "tensorflow":
        from frcnn.tf_distribute import TFDistribution

        return TFDistribution(strategy)
    if strategy != "default":
        raise TrainingError(f"train.strategy={strategy} is a tf.distribute strategy and needs the TensorFlow "
                            f"backend (this is {backend}); use train.strategy=default"
                            + (" or data_parallel" if backend == "jax" else ""))
    return LocalDistribution()
