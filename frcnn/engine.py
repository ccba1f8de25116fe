"""The training job: ``fit`` with checkpoints, resumption and evaluation on the validation split.

``tools/train.py`` only parses arguments and calls :func:`train`. The pieces it puts together live in their own
modules: :mod:`frcnn.distribution` (devices), :mod:`frcnn.optim` (optimizer and schedule),
:mod:`frcnn.checkpoints` (the work directory and its checkpoints), :mod:`frcnn.callbacks` (NaN guard, validation,
time left) and :mod:`frcnn.evaluation`.

Owns: the order of a training run. Imports TensorFlow only through ``frcnn.distribution`` on that backend.
"""

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading

import keras

from frcnn import checkpoints, evaluation, optim
from frcnn import workdir as workdir_lib
from frcnn import data as data_lib
from frcnn.callbacks import EvaluationCallback, StopOnNonFinite, TimeLeft
from frcnn.config import save_config
from frcnn.distribution import make_distribution
from frcnn.errors import TrainingError
from frcnn.evaluation import evaluate_records
from frcnn.fileio import remove_stale_temporaries
from frcnn.inference import detect
from frcnn.model import build_model
from frcnn.tensorboard_logs import scalar_callback
from frcnn.visualize import draw_confident, save_image

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------------ training


def _log_data(name, records, class_names, report):
    text = data_lib.summary(records, class_names, report)
    print(f"{name}:\n{text}")


def train(cfg, workdir, verbose=1):
    """Train the detector described by ``cfg`` in ``workdir`` (resuming from its last checkpoint if there is one).

    Returns ``(model, result)`` where ``result`` has the final validation metrics (or None), the history and the
    path of an annotated prediction image.
    """
    check_trainable(cfg)  # a combination that cannot train is refused before anything is read or written
    # First, before any TensorFlow op: a multi-worker strategy configures the runtime's collectives at creation.
    distribution = make_distribution(cfg)
    # Before anything is written there: two runs in one work directory overwrite each other's checkpoints.
    with workdir_lib.own_workdir(workdir, distribution.is_chief), stop_on_signals():
        return _train(cfg, workdir, distribution, verbose)


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler stopping the job) during training; ``signum`` says which. A
    ``KeyboardInterrupt``, so whatever handles Ctrl-C handles both; the tools exit with ``128 + signum``."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


@contextlib.contextmanager
def stop_on_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, the first SIGINT or SIGTERM raises :class:`Interrupted` (so :func:`fit_resumable` saves a
    checkpoint before the run ends); any later one is logged and ignored, so that a scheduler's repeated TERM
    cannot cut that save short (SIGKILL still ends the process: the previous checkpoint is then kept, see
    :mod:`frcnn.checkpoints`). The previous handlers come back at the end. Outside the main thread (where Python
    delivers signals) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if received:
            log.warning("%s received while the run stops: ignored (the checkpoint is being saved)",
                        signal.Signals(signum).name)
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _load_splits(cfg):
    """``(cfg with data.classes, train records, val records or None)``, each split summarised on stdout."""
    train_records, class_names, train_report = data_lib.load_records(cfg, cfg.data.train_split)
    if cfg.data.classes is None:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, classes=tuple(class_names)))
    _log_data(f"training split '{cfg.data.train_split}'", train_records, class_names, train_report)
    if not train_records:
        raise TrainingError(f"the training split '{cfg.data.train_split}' has no usable images")
    problem = data_lib.missing_targets(train_records, cfg.data.use_difficult, "train on")
    if problem:
        raise TrainingError(f"the training split '{cfg.data.train_split}' {problem}")
    val_records = None
    if cfg.data.val_split:
        val_records, _, val_report = data_lib.load_records(cfg, cfg.data.val_split)
        _log_data(f"validation split '{cfg.data.val_split}'", val_records, class_names, val_report)
        problem = data_lib.missing_targets(val_records, False, "evaluate against")
        if problem:
            log.warning("the validation split '%s' %s: its metrics will be undefined (-1)", cfg.data.val_split,
                        problem)
    return cfg, train_records, val_records


def _train(cfg, workdir, distribution, verbose):
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.batch_size % distribution.num_replicas:
        raise TrainingError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be a multiple of the "
            f"{distribution.num_replicas} replicas of train.strategy={cfg.train.strategy}"
        )
    cfg, train_records, val_records = _load_splits(cfg)
    steps = steps_per_epoch(cfg, len(train_records))
    checkpoint_dir = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
    state = _check_resume(cfg, workdir, checkpoint_dir, distribution, steps, len(train_records))
    model, state = _build(cfg, workdir, checkpoint_dir, distribution, steps, state)
    # The GLOBAL batch: fit splits it across the replicas.
    dataset = distribution.distribute_dataset(
        data_lib.build_dataset(cfg, train_records, training=True, batch_size=cfg.train.batch_size))
    callbacks, evaluator, manager, stop_on_nan = _callbacks(cfg, workdir, checkpoint_dir, distribution,
                                                            val_records, steps, state, verbose)
    histories = fit_resumable(
        model, dataset, cfg.train.epochs, steps, callbacks, manager, stop_on_nan,
        start_step=int(state["global_step"]) if state else 0, verbose=verbose,
    )
    history = {}
    for h in histories:
        for key, values in h.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    result = {"history": history, "metrics": None, "prediction_image": None}
    if val_records and distribution.is_chief:
        metrics = evaluator.last_metrics if evaluator and evaluator.last_metrics else None
        if metrics is None:
            metrics, _ = evaluate_records(model, cfg, val_records, cfg.data.classes,
                                          getattr(val_records, "category_ids", None), cfg.train.val_max_images,
                                          verbose=verbose)
        result["metrics"] = metrics
        evaluation.save_json(metrics, os.path.join(workdir, "val_metrics.json"))
        result["prediction_image"] = _annotate_example(model, val_records, workdir)
    return model, result


def _check_resume(cfg, workdir, checkpoint_dir, distribution, steps, num_images):
    """The state of the checkpoint to resume from (None to start afresh), once every check has passed: the same
    class list as the checkpoint's (other changes are listed), the same steps per epoch, and under multi-worker
    training the same decisions on every worker. Nothing in the work directory changes before."""
    if distribution.is_chief:
        remove_stale_temporaries(checkpoint_dir)  # left by a run killed while writing a checkpoint
    resume = checkpoints.has_checkpoint(checkpoint_dir)
    state = checkpoints.read_state(checkpoint_dir)
    if resume and distribution.is_chief:
        # A different class list is refused, other changes listed, before anything in the work directory changes.
        workdir_lib.check_resume_config(workdir, cfg)
    # Multi-worker: every worker must resume (from a shared --workdir) or not, and cut the same epochs.
    distribution.check_workers_agree(
        [int(resume), steps, num_images],
        "whether to resume from a checkpoint, the steps per epoch and the number of training images",
    )
    if state and state.get("steps_per_epoch") not in (None, steps):
        raise TrainingError(
            f"{checkpoint_dir}: the checkpoint was made with {state['steps_per_epoch']} steps per epoch, this run "
            f"has {steps}; resume with the same data and train.batch_size/steps_per_epoch, or use a new --workdir"
        )
    return (state or {}) if resume else None


def _build(cfg, workdir, checkpoint_dir, distribution, steps, state):
    """The compiled model, restored from the checkpoint when ``state`` is not None: ``(model, state)``, the state
    then with the step the weights hold. Writes the resolved config.yaml only now (a refused run leaves the one
    its checkpoint was made with, which tools/infer.py reads)."""
    resume = state is not None
    # Variables (model, optimizer) are created and restored inside the scope, so they are mirrored on every replica.
    with distribution.scope():
        # model.backbone_weights may name Detectron2 weights (R-50.pkl, a zoo detector): build_model loads them.
        model = build_model(cfg, load_weights=not resume)
        # train.jit_compile: XLA on the whole training step (every op of the model is keras.ops).
        # On JAX the step is always compiled (jax.jit: XLA); without it Keras would run the model op by op.
        jit = cfg.train.jit_compile or keras.backend.backend() == "jax"
        model.compile(optimizer=optim.make_optimizer(cfg, steps), jit_compile=jit)
        if resume:
            # The step comes from the weights (state.json is checked against them): see restore_checkpoint.
            state = checkpoints.restore_checkpoint(model, checkpoint_dir, steps, state)
            print(f"resuming from {checkpoint_dir}: epoch {state['epoch']}, global step {state['global_step']}")
    if distribution.is_chief:
        save_config(cfg, os.path.join(workdir, workdir_lib.CONFIG_NAME))
    if resume:
        distribution.check_workers_agree([state["global_step"]], "the checkpoint step to resume from")
    if distribution.description:
        print(f"{distribution.description}, global batch {cfg.train.batch_size}, learning rate "
              f"{optim.learning_rate(cfg):g}")
    if cfg.train.jit_compile and not cfg.input.fixed_size:
        log.warning("train.jit_compile without input.fixed_size: XLA compiles again for every new padded batch shape")
    return model, state


def _callbacks(cfg, workdir, checkpoint_dir, distribution, val_records, steps, state, verbose):
    """``(callbacks, evaluator or None, checkpoint manager, NaN guard)`` in the order they must run: the NaN guard,
    validation (chief only, on one device: see DistributedFasterRCNN.predict_on_batch), the time left (its estimate
    counts validation), checkpoints (after validation: the best one needs its AP), TensorBoard scalars."""
    chief = distribution.is_chief
    stop_on_nan = StopOnNonFinite()
    callbacks = [stop_on_nan]
    evaluator = None
    if chief and val_records and cfg.train.val_every:
        evaluator = EvaluationCallback(cfg, val_records, cfg.data.classes, getattr(val_records, "category_ids", None),
                                       cfg.train.val_every, cfg.train.val_max_images,
                                       image_log_dir=os.path.join(workdir, "logs", "images"))
        callbacks.append(evaluator)
    if chief and verbose:
        callbacks.append(TimeLeft(cfg.train.epochs))
    manager = checkpoints.CheckpointManager(
        checkpoint_dir, steps, every_steps=cfg.train.checkpoint_every, monitor="val_AP",
        best=state.get("best") if state else None, chief=chief,
    )
    callbacks.append(manager)
    if chief:
        callbacks.append(scalar_callback(os.path.join(workdir, "logs")))  # Keras' own on TensorFlow
    return callbacks, evaluator, manager, stop_on_nan


def _annotate_example(model, records, workdir):
    """Draw the detections on the first readable validation image; returns the written path (or None)."""
    for record in records:
        try:
            image = data_lib.load_image(record.file_name)
        except data_lib.DataError:
            continue
        drawn = draw_confident(image, detect(model, [image])[0], model.class_names)
        return save_image(os.path.join(workdir, "prediction.jpg"), drawn)
    return None


def steps_per_epoch(cfg, num_train_images):
    """``train.steps_per_epoch`` when set (the data repeats as needed), else one pass over the training images at
    the global batch size."""
    if cfg.train.steps_per_epoch:
        return cfg.train.steps_per_epoch
    return max(1, math.ceil(num_train_images / cfg.train.batch_size))


def fit_resumable(model, dataset, epochs, steps, callbacks, manager, stop_on_nan, start_step=0, verbose=1):
    """``model.fit`` from global step ``start_step`` to ``epochs * steps``; returns the Keras histories.

    ``fit`` cannot start in the middle of an epoch, so a run resumed mid-epoch first finishes that epoch with a
    shorter ``fit`` and then runs the remaining whole epochs. Ctrl-C, and SIGTERM under :func:`stop_on_signals`, save
    a checkpoint (via ``manager``) before the ``KeyboardInterrupt`` goes on; a non-finite loss raises
    :class:`TrainingError` naming the step.
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
    except KeyboardInterrupt as err:
        what = f"stopped by {err.args[0]}" if isinstance(err, Interrupted) else "interrupted"
        manager.save(what)
        print(f"\n{what}: checkpoint saved in {manager.checkpoint_dir}; run the same command again to resume",
              flush=True)
        raise
    if stop_on_nan.message:
        raise TrainingError(stop_on_nan.message)
    return histories
