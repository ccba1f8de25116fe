"""TensorBoard logs without TensorFlow: an event-file writer for scalars and images, and a Keras callback for the
training scalars.

Owns: :class:`SummaryWriter` (event files written with the ``tensorboard`` package's record writer and protos, as
torch's ``SummaryWriter`` does; PNG encoding by OpenCV), :class:`ScalarLogger` (the epoch scalars, and every
``update_freq`` steps the batch scalars, in the layout of ``keras.callbacks.TensorBoard``: ``<log_dir>/train`` and
``<log_dir>/validation``, tags ``epoch_<metric>`` and ``batch_<metric>``, the learning rate as
``epoch_learning_rate``) and :func:`scalar_callback`, which picks Keras' own ``TensorBoard`` callback on the
TensorFlow backend (it needs ``tf.summary``) and :class:`ScalarLogger` on the others. The validation images go
through :class:`SummaryWriter` on every backend.

Must not import TensorFlow: the file is opened by Python, not through ``tensorboard.compat``'s ``tf.io.gfile`` (which
imports TensorFlow wherever it is installed), so logs go to local paths only.
"""

import itertools
import os
import socket
import threading
import time

import keras
import numpy as np

_counter = itertools.count()


class SummaryWriter:
    """Appends summaries to a new event file in ``log_dir`` (created if needed); TensorBoard reads the folder.

    ``add_scalar(tag, value, step)``, ``add_image(tag, image, step)``; ``flush()`` after each write (the logs are
    small: a few scalars per epoch and a few images), ``close()`` at the end (or use it as a context manager).
    """

    def __init__(self, log_dir, filename_suffix=""):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2 = event_pb2
        os.makedirs(log_dir, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_counter)}{filename_suffix}")
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "wb")
        self._writer = RecordWriter(self._file)
        self._lock = threading.Lock()
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        with self._lock:
            if self._file is None:
                raise ValueError(f"SummaryWriter for {self.path} is closed")
            self._writer.write(event.SerializeToString())
            self._file.flush()

    def _summary(self, step, value):
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(value=[value])
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def add_scalar(self, tag, value, step):
        """One scalar (anything ``float()`` takes, a 0-d array too) at ``step``."""
        from tensorboard.compat.proto import summary_pb2

        self._summary(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(np.asarray(value))))

    def add_image(self, tag, image, step):
        """One ``(H, W, 3)`` uint8 RGB image (or ``(H, W)`` gray) at ``step``, PNG-encoded."""
        import cv2
        from tensorboard.compat.proto import summary_pb2

        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"add_image wants an (H, W, 3) or (H, W) uint8 image, got {image.dtype} {image.shape}")
        pixels = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1])  # OpenCV writes BGR
        ok, png = cv2.imencode(".png", pixels)
        if not ok:
            raise ValueError(f"OpenCV could not PNG-encode the image for {tag}")
        height, width = image.shape[:2]
        encoded = summary_pb2.Summary.Image(height=height, width=width, colorspace=1 if image.ndim == 2 else 3,
                                            encoded_image_string=png.tobytes())
        self._summary(step, summary_pb2.Summary.Value(tag=tag, image=encoded))

    def flush(self):
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self):
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _learning_rate(optimizer):
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer wraps the real one
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        return None
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class ScalarLogger(keras.callbacks.Callback):
    """The training scalars to TensorBoard without TensorFlow, laid out as ``keras.callbacks.TensorBoard`` does:
    epoch logs to ``<log_dir>/train`` as ``epoch_<name>`` (plus ``epoch_learning_rate``), the ``val_`` ones to
    ``<log_dir>/validation`` without the prefix, stepped by epoch; with ``update_freq`` an integer N, the batch logs
    every N steps as ``batch_<name>`` stepped by the optimizer's step (which a resumed run continues)."""

    def __init__(self, log_dir, update_freq="epoch"):
        super().__init__()
        if update_freq != "epoch" and (not isinstance(update_freq, int) or update_freq < 1):
            raise ValueError(f"update_freq must be 'epoch' or a positive number of steps, not {update_freq!r}")
        self.log_dir = log_dir
        self.update_freq = update_freq
        self._writers = {}
        self._batches = 0

    def _writer(self, name):
        if name not in self._writers:
            self._writers[name] = SummaryWriter(os.path.join(self.log_dir, name))
        return self._writers[name]

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq == "epoch" or not isinstance(logs, dict):
            return
        self._batches += 1
        if self._batches % self.update_freq:
            return
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        writer = self._writer("train")
        for name, value in logs.items():
            if np.ndim(value) == 0:
                writer.add_scalar(f"batch_{name}", value, step)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        lr = _learning_rate(getattr(self.model, "optimizer", None))
        if lr is not None:
            logs.setdefault("learning_rate", lr)
        for name, value in logs.items():
            if np.ndim(value) != 0:
                continue
            if name.startswith("val_"):
                self._writer("validation").add_scalar(f"epoch_{name[4:]}", value, epoch)
            else:
                self._writer("train").add_scalar(f"epoch_{name}", value, epoch)

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def scalar_callback(log_dir, update_freq="epoch"):
    """The callback that logs the training scalars: Keras' own ``TensorBoard`` on the TensorFlow backend (graph
    off), :class:`ScalarLogger` on JAX and PyTorch (where TensorFlow may be absent)."""
    if keras.backend.backend() == "tensorflow":
        return keras.callbacks.TensorBoard(log_dir, write_graph=False, update_freq=update_freq)
    return ScalarLogger(log_dir, update_freq=update_freq)
