"""The error of a training run or of the weights it reads, below every module that raises it.

``frcnn.config.ConfigError`` (a bad config) and ``frcnn.data.DataError`` (bad data) live with their modules;
:class:`TrainingError` lives here because the model's weight loaders (``frcnn.pretrained``) raise it as well as the
training job, and the model must not import the training job. ``frcnn.training.TrainingError`` is this class.
"""


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, a checkpoint that does not fit the model); the message says why."""
