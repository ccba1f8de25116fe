"""The training job's Keras callbacks: :class:`StopOnNonFinite` (the NaN guard), :class:`TimeLeft` (time spent and
left, per epoch) and :class:`EvaluationCallback` (validation mAP between epochs, and its images in TensorBoard).
Checkpoints are written by :class:`frcnn.checkpoints.CheckpointManager`.

Owns: what runs between steps and epochs. Must not import the training job (``frcnn.engine``) or TensorFlow.
"""

import os
import time

import keras
import numpy as np

from frcnn import data as data_lib
from frcnn.checkpoints import nonfinite_variables
from frcnn.evaluation import evaluate_records
from frcnn.tensorboard_logs import SummaryWriter
from frcnn.visualize import draw_confident


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


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluates on the validation split every ``every`` epochs and adds ``val_AP``, ``val_AP50``, ``val_AP75`` and
    ``val_voc07_mAP50`` to the epoch logs, where TensorBoard and the best-checkpoint choice read them.

    Place it before :class:`frcnn.checkpoints.CheckpointManager` and ``TensorBoard`` in the callback list.
    """

    def __init__(self, cfg, records, class_names, category_ids=None, every=1, max_images=None, image_log_dir=None,
                 num_images=3):
        super().__init__()
        self.image_log_dir = image_log_dir
        self.num_images = num_images
        self._image_writer = None
        self.cfg = cfg
        self.records = records
        self.class_names = class_names
        self.category_ids = category_ids
        self.every = every
        self.max_images = max_images
        self.last_metrics = None

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.params.get("epochs")
        if logs is None or not self.every or ((epoch + 1) % self.every and not last):
            return
        metrics, detections = evaluate_records(self.model, self.cfg, self.records, self.class_names,
                                               self.category_ids, self.max_images, verbose=0)
        self.last_metrics = metrics
        if self.image_log_dir and self.num_images:
            self._write_images(detections, epoch)
        for key in ("AP", "AP50", "AP75", "voc07_mAP50"):
            value = metrics.get(key)
            logs[f"val_{key}"] = float(value) if value is not None and value >= 0 else 0.0
        print(f"\nepoch {epoch + 1}: val AP {logs['val_AP']:.4f}  AP50 {logs['val_AP50']:.4f}  "
              f"VOC07 mAP50 {logs['val_voc07_mAP50']:.4f}")

    def _write_images(self, detections, epoch):
        """The first ``num_images`` validation images with this evaluation's detections drawn, to TensorBoard
        (``<logs>/images``, one tag per image, stepped by epoch like Keras' own epoch summaries)."""
        if self._image_writer is None:
            self._image_writer = SummaryWriter(self.image_log_dir)  # no TensorFlow needed
        by_id = {d["image_id"]: d for d in detections}
        written = 0
        for record in self.records:
            if written == self.num_images:
                break
            if record.image_id not in by_id:
                continue
            try:
                image = data_lib.load_image(record.file_name)
            except data_lib.DataError:
                continue
            drawn = draw_confident(image, by_id[record.image_id], self.model.class_names)
            self._image_writer.add_image(f"validation/{os.path.basename(record.file_name)}", drawn, step=epoch)
            written += 1
        self._image_writer.flush()
