"""Checkpoints that survive any interruption: atomic writes with a disk-space guard, :class:`CheckpointManager`
(the callback that writes them), restoring, and loading weights of older layouts. The work directory that holds them
(its layout, lock and the resume checks) is :mod:`frcnn.workdir`.

Every file is written to a temporary name in the same folder and renamed over the old one, so a run killed at any
moment (even SIGKILL) leaves the previous complete checkpoint in place; starting the same command again resumes
from it with the same epoch, global step and optimizer state (the data order of the resumed epoch differs). The
step resumed from is the one the weights file holds (the optimizer's ``iterations``), checked against
``state.json``, so a kill between the two renames cannot shift it. A damaged checkpoint names the intact one beside
it (:func:`intact_alternative`), and a checkpoint that does not fit on the disk stops the run with a message,
keeping the old one.

Owns: checkpoint files. Must not import the training job, the data pipeline or TensorFlow (the finite
check compiles with the backend's own compiler, imported under that backend only).
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import weakref

import keras
import numpy as np

from frcnn.errors import TrainingError
from frcnn.fileio import atomic_path

log = logging.getLogger(__name__)

LAST_WEIGHTS = "last.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
STATE_FILE = "state.json"


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


# ------------------------------------------------------------------------------------------ restore and load


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


def load_checkpoint(model, path, with_optimizer=False):
    """Load a ``.weights.h5`` checkpoint into ``model``; a missing, truncated or mismatched file is a clear error.

    Keras checks every variable's shape, so a checkpoint made for another number of classes (or another
    architecture) fails here instead of loading partially. The message is a few lines at most (Keras' own lists
    every layer), and for a damaged file it names the intact checkpoint beside it, if there is one.
    """
    if not os.path.isfile(path):
        raise TrainingError(f"checkpoint '{path}' does not exist")
    if with_optimizer and model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    damage = damaged_h5(path) if os.fspath(path).endswith(".h5") else None  # a .keras file is a zip archive
    if damage:
        raise TrainingError(f"checkpoint '{path}' is damaged ({damage}).{intact_alternative(path)}")
    try:
        load_weights(model, path)
    except Exception as err:  # h5py OSError on a truncated file, ValueError on shape or structure mismatch
        raise TrainingError(
            f"checkpoint '{path}' does not fit this model: {_load_error_summary(err)}. Was it trained with the same "
            "classes and model settings (see the config.yaml next to it)?"
        ) from None


def damaged_h5(path):
    """Why ``path`` is not a complete HDF5 file (h5py's reason, e.g. ``truncated file: eof = ...``), or None."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return None
    except OSError as err:
        return str(err)


def intact_alternative(path):
    """For a damaged checkpoint: a sentence naming the other checkpoint of its folder (``last`` for ``best`` and
    the reverse) when that one is intact, else ``""``."""
    folder, name = os.path.split(os.path.abspath(path))
    others = {LAST_WEIGHTS: BEST_WEIGHTS, BEST_WEIGHTS: LAST_WEIGHTS}
    other = os.path.join(folder, others.get(name, LAST_WEIGHTS))
    if other == os.path.abspath(path) or not os.path.isfile(other) or damaged_h5(other):
        return ""
    advice = f" {other} is intact: use it (--weights {other})"
    if name == LAST_WEIGHTS:
        advice += (f", or resume training from it by copying it over the damaged file (cp {other} {path}; the run "
                   "resumes from the step it holds)")
    return advice + "."


_KERAS_COUNT = re.compile(r"A total of (\d+) objects could not be loaded")
_KERAS_SHAPE = re.compile(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))\. "
                          r"Target variable: <Variable path=([^,\s>]+)")


def _load_error_summary(err):
    """One line from Keras' loading error (which lists every layer that failed, with its values)."""
    text = str(err).strip()
    parts = []
    count = _KERAS_COUNT.search(text)
    if count:
        parts.append(f"{count.group(1)} of its layers could not be loaded")
    shape = _KERAS_SHAPE.search(text)
    if shape:
        parts.append(f"{shape.group(3)} has the shape {shape.group(1)} here but {shape.group(2)} in the file")
    if not parts:
        first = text.splitlines()[0] if text else ""
        parts.append(f"{type(err).__name__}: " + (first[:240] + " ..." if len(first) > 240 else first))
    return ", e.g. ".join(parts)


def load_weights(model, filepath):
    """``model.load_weights(filepath)``; also reads ``.weights.h5`` checkpoints written before the model was split
    into RPN and ROI parts, or before frozen norms were FrozenBatchNormalization layers (their variable paths are
    renamed on the fly, in a temporary copy)."""
    legacy = _legacy_weights(filepath, _has_frozen_norms(model))
    if legacy is None:
        return model.load_weights(filepath)
    try:
        return model.load_weights(legacy)
    finally:
        os.remove(legacy)


def _has_frozen_norms(model):
    from frcnn.backbone import norm_kind

    trunk = getattr(model, "trunk", None)
    return trunk is not None and norm_kind(trunk) == "frozen"


# Checkpoints written before the RPN and ROI parts existed: old variable path prefix -> new one.
_LEGACY_PATHS = (
    ("layers/rpn_head/", "layers/rpn/head/"),
    ("layers/roi_head/", "layers/roi_heads/head/"),
)
# Keras names a layer's variables in a weights file after its class: frozen norms were plain BatchNormalization
# layers before FrozenBatchNormalization (frcnn.backbone) existed. Same order, so the same counters.
_PLAIN_BN = re.compile(r"(^|/)batch_normalization(_\d+)?(?=/)")


def _legacy_weights(filepath, frozen_norm):
    """A temporary copy of an old-layout ``.weights.h5`` with today's variable paths, or None when the file needs
    none (or is not a ``.weights.h5``). Old layouts: the RPN and ROI heads before they became parts, and (for a
    model whose norms are frozen) frozen norms saved as plain BatchNormalization."""
    path = os.fspath(filepath)
    if not path.endswith(".weights.h5") or not os.path.isfile(path):
        return None
    import h5py

    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        parts = "layers/rpn_head" in f
        norms = frozen_norm and any(_PLAIN_BN.search(name) for name in names)
        if not (parts or norms):
            return None
        fd, tmp = tempfile.mkstemp(suffix=".weights.h5")  # not beside the checkpoint: its folder may be read-only
        os.close(fd)
        with h5py.File(tmp, "w") as out:
            for key, value in f.attrs.items():
                out.attrs[key] = value
            for name in names:
                new = name
                for old, prefix in _LEGACY_PATHS:
                    if new.startswith(old):
                        new = prefix + new[len(old):]
                if norms:
                    new = _PLAIN_BN.sub(r"\1frozen_batch_normalization\2", new)
                out.create_dataset(new, data=f[name][()])
    return tmp


# ----------------------------------------------------------------------------------------- writing checkpoints


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

    Run after every training step (:class:`frcnn.callbacks.StopOnNonFinite`), so it is compiled once per model and
    variable list (one TensorFlow graph, or ``jax.jit`` over the variables' values; other backends run it eagerly):
    op by op it costs a noticeable part of a small training step (docs/NOTES.md).
    """
    key = tuple(id(v) for v in variables)
    cached = _FINITE_CHECKS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]()

    def flags(values):
        return keras.ops.stack([keras.ops.all(keras.ops.isfinite(v)) for v in values])

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        check = tf.function(lambda: flags(variables), autograph=False)
    elif backend == "jax":
        import jax

        jitted = jax.jit(flags)
        check = lambda: jitted([v.value for v in variables])  # noqa: E731
    else:
        check = lambda: flags(variables)  # noqa: E731
    _FINITE_CHECKS[model] = (key, check)
    return check()


