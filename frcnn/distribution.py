"""How the training job spreads a step over devices, whatever the backend: :func:`make_distribution`.

A distribution has ``scope()`` (where the model and optimizer are made), ``num_replicas``, ``is_chief`` (the process
that writes checkpoints and logs), ``check_workers_agree(values, what)`` (a collective check that every process
takes the same decisions), ``distribute_dataset(dataset)`` and ``description`` (None for one device).

- TensorFlow: ``train.strategy`` is a ``tf.distribute`` strategy (:class:`frcnn.tf_distribute.TFDistribution`).
- Other backends: one device (:class:`LocalDistribution`).

Owns: the choice of distribution. Imports TensorFlow only on the TensorFlow backend.
"""

import contextlib

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


def make_distribution(cfg):
    """The distribution ``train.strategy`` names, for the current Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from frcnn.tf_distribute import TFDistribution

        return TFDistribution(cfg.train.strategy)
    if cfg.train.strategy != "default":
        raise TrainingError(f"train.strategy={cfg.train.strategy} is a tf.distribute strategy and needs the "
                            f"TensorFlow backend (this is {backend}); use train.strategy=default")
    return LocalDistribution()
