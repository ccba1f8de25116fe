"""What the model and the training job need to know about ``tf.distribute``: replicas and worker processes.

Stdlib and Keras only at import; TensorFlow is imported when a question is asked on the TensorFlow backend, so the
model keeps running on other backends (where there is always one replica and one worker).
"""

import keras


def num_replicas():
    """Replicas of the current ``tf.distribute`` strategy (1 on other backends)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def replicas_of(model):
    """Replicas of the strategy ``model`` was created under (1 when none)."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.num_replicas_in_sync if strategy is not None else 1


def num_workers(strategy):
    """How many processes (machines) take part in ``strategy`` (1 outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return sum(len(cluster.get(job, ())) for job in ("chief", "worker"))


def multi_worker():
    """True inside a ``tf.distribute`` strategy spanning several worker processes (TensorFlow backend only)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return num_workers(tf.distribute.get_strategy()) > 1


def in_tf_strategy():
    """True on the TensorFlow backend inside the scope of a (non-default) ``tf.distribute`` strategy."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()
