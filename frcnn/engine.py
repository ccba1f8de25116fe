"""The training job: ``fit`` with checkpoints, resumption and evaluation on the validation split.

``tools/train.py`` only parses arguments and calls :func:`train`. Evaluation itself (running the model over records,
the metrics, the files) lives in :mod:`frcnn.evaluation`; :class:`EvaluationCallback` runs it between epochs.
"""

import dataclasses
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from frcnn import data as data_lib
from frcnn import evaluation
from frcnn.evaluation import evaluate_records
from frcnn import training
from frcnn.config import save_config
from frcnn.fileio import remove_stale_temporaries
from frcnn.model import build_model
from frcnn.tensorboard_logs import SummaryWriter, scalar_callback
from frcnn.visualize import draw_confident, save_image

log = logging.getLogger(__name__)


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluates on the validation split every ``every`` epochs and adds ``val_AP``, ``val_AP50``, ``val_AP75`` and
    ``val_voc07_mAP50`` to the epoch logs, where TensorBoard and the best-checkpoint choice read them.

    Place it before :class:`frcnn.training.CheckpointManager` and ``TensorBoard`` in the callback list.
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


# ------------------------------------------------------------------------------------------------------ training


def _log_data(name, records, class_names, report):
    text = data_lib.summary(records, class_names, report)
    print(f"{name}:\n{text}")


def train(cfg, workdir, verbose=1):
    """Train the detector described by ``cfg`` in ``workdir`` (resuming from its last checkpoint if there is one).

    Returns ``(model, result)`` where ``result`` has the final validation metrics (or None), the history and the
    path of an annotated prediction image.
    """
    training.check_trainable(cfg)  # a combination that cannot train is refused before anything is read or written
    # First, before any TensorFlow op: a multi-worker strategy configures the runtime's collectives at creation.
    strategy = training.make_strategy(cfg.train.strategy)
    chief = training.is_chief(strategy)
    # Before anything is written there: two runs in one work directory overwrite each other's checkpoints.
    with training.own_workdir(workdir, chief):
        return _train(cfg, workdir, strategy, chief, verbose)


def _train(cfg, workdir, strategy, chief, verbose):
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.batch_size % strategy.num_replicas_in_sync:
        raise training.TrainingError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be a multiple of the "
            f"{strategy.num_replicas_in_sync} replicas of train.strategy={cfg.train.strategy}"
        )

    train_records, class_names, train_report = data_lib.load_records(cfg, cfg.data.train_split)
    if cfg.data.classes is None:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, classes=tuple(class_names)))
    _log_data(f"training split '{cfg.data.train_split}'", train_records, class_names, train_report)
    if not train_records:
        raise training.TrainingError(f"the training split '{cfg.data.train_split}' has no usable images")
    problem = data_lib.missing_targets(train_records, cfg.data.use_difficult, "train on")
    if problem:
        raise training.TrainingError(f"the training split '{cfg.data.train_split}' {problem}")
    val_records, val_report = None, None
    if cfg.data.val_split:
        val_records, _, val_report = data_lib.load_records(cfg, cfg.data.val_split)
        _log_data(f"validation split '{cfg.data.val_split}'", val_records, class_names, val_report)
        problem = data_lib.missing_targets(val_records, False, "evaluate against")
        if problem:
            log.warning("the validation split '%s' %s: its metrics will be undefined (-1)", cfg.data.val_split,
                        problem)

    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if chief:
        save_config(cfg, os.path.join(workdir, "config.yaml"))
    if chief:
        remove_stale_temporaries(checkpoint_dir)  # left by a run killed while writing a checkpoint
    state = training.read_state(checkpoint_dir)
    resume = training.has_checkpoint(checkpoint_dir)
    steps = training.steps_per_epoch(cfg, len(train_records))
    # Multi-worker: every worker must resume (from a shared --workdir) or not, and cut the same epochs.
    training.check_workers_agree(
        strategy, [int(resume), steps, len(train_records)],
        "whether to resume from a checkpoint, the steps per epoch and the number of training images",
    )
    if state and state.get("steps_per_epoch") not in (None, steps):
        raise training.TrainingError(
            f"{checkpoint_dir}: the checkpoint was made with {state['steps_per_epoch']} steps per epoch, this run "
            f"has {steps}; resume with the same data and train.batch_size/steps_per_epoch, or use a new --workdir"
        )

    # Variables (model, optimizer) are created and restored inside the scope, so they are mirrored on every replica.
    with strategy.scope():
        # model.backbone_weights may name Detectron2 weights (R-50.pkl, a zoo detector): build_model loads them.
        model = build_model(cfg, load_weights=not resume)
        # train.jit_compile: XLA on the whole training step (every op of the model is keras.ops).
        # On JAX the step is always compiled (jax.jit: XLA); without it Keras would run the model op by op.
        jit = cfg.train.jit_compile or keras.backend.backend() == "jax"
        model.compile(optimizer=training.make_optimizer(cfg, steps), jit_compile=jit)
        if resume:
            # The step comes from the weights (state.json is checked against them): see restore_checkpoint.
            state = training.restore_checkpoint(model, checkpoint_dir, steps, state)
            print(f"resuming from {checkpoint_dir}: epoch {state['epoch']}, global step {state['global_step']}")
    if resume:
        training.check_workers_agree(strategy, [state["global_step"]], "the checkpoint step to resume from")
    if strategy.num_replicas_in_sync > 1:
        print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replicas, global batch "
              f"{cfg.train.batch_size}, learning rate {training.learning_rate(cfg):g}")
    if cfg.train.jit_compile and not cfg.input.fixed_size:
        log.warning("train.jit_compile without input.fixed_size: XLA compiles again for every new padded batch shape")

    # The GLOBAL batch: fit splits it across the replicas. Under multi-worker training every worker builds the same
    # (identically seeded) dataset and keeps its own part of each global batch (DATA sharding; there is no file
    # list to shard by).
    dataset = data_lib.build_dataset(cfg, train_records, training=True, batch_size=cfg.train.batch_size)
    if isinstance(dataset, tf.data.Dataset):  # JAX and PyTorch get the NumPy pipeline (a keras.utils.PyDataset)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
    category_ids = getattr(val_records, "category_ids", None)
    stop_on_nan = training.StopOnNonFinite()
    callbacks = [stop_on_nan]
    evaluator = None
    # Evaluation runs on the chief alone, on one device (FasterRCNN.predict_on_batch); the other workers go on.
    if chief and val_records and cfg.train.val_every:
        evaluator = EvaluationCallback(cfg, val_records, class_names, category_ids, cfg.train.val_every,
                                       cfg.train.val_max_images, image_log_dir=os.path.join(workdir, "logs", "images"))
        callbacks.append(evaluator)
    if chief and verbose:
        callbacks.append(training.TimeLeft(cfg.train.epochs))  # after the evaluator: its time counts
    manager = training.CheckpointManager(
        checkpoint_dir, steps, every_steps=cfg.train.checkpoint_every, monitor="val_AP",
        best=state.get("best") if state else None, chief=chief,
    )
    callbacks.append(manager)
    if chief:
        callbacks.append(scalar_callback(os.path.join(workdir, "logs")))  # Keras' own on TensorFlow

    histories = training.fit_resumable(
        model, dataset, cfg.train.epochs, steps, callbacks, manager, stop_on_nan,
        start_step=int(state["global_step"]) if state else 0, verbose=verbose,
    )

    history = {}
    for h in histories:
        for key, values in h.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    result = {"history": history, "metrics": None, "prediction_image": None}
    if val_records and chief:
        metrics = evaluator.last_metrics if evaluator and evaluator.last_metrics else None
        if metrics is None:
            metrics, _ = evaluate_records(model, cfg, val_records, class_names, category_ids,
                                          cfg.train.val_max_images, verbose=verbose)
        result["metrics"] = metrics
        evaluation.save_json(metrics, os.path.join(workdir, "val_metrics.json"))
        result["prediction_image"] = _annotate_example(model, val_records, workdir)
    return model, result


def _annotate_example(model, records, workdir):
    """Draw the detections on the first readable validation image; returns the written path (or None)."""
    for record in records:
        try:
            image = data_lib.load_image(record.file_name)
        except data_lib.DataError:
            continue
        drawn = draw_confident(image, model.detect([image])[0], model.class_names)
        return save_image(os.path.join(workdir, "prediction.jpg"), drawn)
    return None

