"""The work directory of a training run (``--workdir``): its layout, the lock that makes one run its owner, and the
checks before a run resumes there.

Layout::

    config.yaml                 resolved config (YAML), enough to rebuild the model without guessing
    checkpoints/last.weights.h5 model + optimizer state, written every ``checkpoint_every`` steps and each epoch
    checkpoints/state.json      {"epoch", "global_step", "best", ...} for the last checkpoint
    checkpoints/best.weights.h5 model (+ optimizer) at the best validation AP so far
    logs/                       TensorBoard

The training job owns the work directory (:func:`own_workdir`, a kernel lock that dies with the process); a resume
is checked against the ``config.yaml`` the checkpoint was made with (:func:`check_resume_config`: another class
list is refused, other changes listed). The checkpoint files themselves are :mod:`frcnn.checkpoints`'.

Owns: the work directory's layout and ownership. Must not import the training job, the model or a backend.
"""

import contextlib
import logging
import os

from frcnn.config import ConfigError, load_config
from frcnn.errors import TrainingError
from frcnn.fileio import DirectoryLocked, check_inside, lock_directory

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def own_workdir(workdir, chief=True):
    """Context manager: this run owns ``workdir`` until it ends, or :class:`TrainingError` names the run that does.

    Only the chief takes the lock. Under multi-worker training the other workers share the chief's work directory
    (they read its checkpoint but write nothing there), so they must not be refused. The lock is released by the
    kernel however the process ends (see :func:`frcnn.fileio.lock_directory`). A directory that cannot be used (a
    file in the way or on its path, read-only, no permission) or whose ``checkpoints``/``logs`` folder is a link
    out of it is a :class:`TrainingError` of one line naming the path and the reason.
    """
    if not chief:
        return contextlib.nullcontext()
    return _locked(workdir)


@contextlib.contextmanager
def _locked(workdir):
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock_directory(workdir, "training run"))
        except (DirectoryLocked, OSError) as err:  # OSError: UnusableDirectory, one line naming path and reason
            raise TrainingError(f"--workdir {err}") from None
        check_workdir_links(workdir)
        yield


# What a run writes under its work directory: a symbolic link there pointing elsewhere would carry the writes out.
WORKDIR_FOLDERS = (CHECKPOINT_DIR, "logs", os.path.join("logs", "images"), os.path.join("logs", "train"),
                   os.path.join("logs", "validation"))


def check_workdir_links(workdir):
    """Refuse (:class:`TrainingError`) a work directory whose ``checkpoints``, ``logs``... folder is a symbolic
    link leading outside it. Files written directly in it are replaced atomically (a link there is replaced, never
    written through)."""
    for name in WORKDIR_FOLDERS:
        try:
            check_inside(os.path.join(workdir, name), workdir, "--workdir folder")
        except OSError as err:
            raise TrainingError(str(err)) from None


# ------------------------------------------------------------------------------------ resuming with a new config


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value):
    return "null" if value is None else (f"[{', '.join(map(str, value))}]" if isinstance(value, (list, tuple))
                                         else str(value))


def check_resume_config(workdir, cfg):
    """Before a resumed run touches anything: compare ``cfg`` with the ``config.yaml`` the checkpoint was made with.

    A different class list (other names, or the same names in another order) is refused with
    :class:`TrainingError`: the checkpoint's class ids would silently take another meaning. Every other changed
    setting (``train.batch_size``, ``roi_heads.num_rois``, ``train.lr``...) is listed in one warning; the run goes
    on with the new values. Returns the changed keys as ``{key: (old, new)}``. Without a readable ``config.yaml``
    nothing can be compared, which is logged.
    """
    path = os.path.join(workdir, CONFIG_NAME)
    if not os.path.isfile(path):
        log.warning("%s has a checkpoint but no %s: the settings it was made with cannot be compared", workdir,
                    CONFIG_NAME)
        return {}
    try:
        saved = load_config(path)
    except ConfigError as err:
        log.warning("the %s the checkpoint was made with cannot be read (%s): settings not compared", path, err)
        return {}
    old_classes, new_classes = saved.data.classes, cfg.data.classes
    if old_classes is not None and new_classes is not None and tuple(old_classes) != tuple(new_classes):
        how = "in another order" if sorted(old_classes) == sorted(new_classes) else "other classes"
        raise TrainingError(
            f"--workdir {workdir}: the checkpoint was trained with the classes {_show(old_classes)} ({path}); this "
            f"run has {_show(new_classes)} ({how}), so every class id would change meaning. Resume with "
            f"data.classes={_show(old_classes)} in that order, or use a new --workdir"
        )
    old, new = _flat(saved.to_dict()), _flat(cfg.to_dict())
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if changed:
        log.warning("resuming %s with changed settings (checkpoint's value -> this run's): %s", workdir,
                    ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items()))
    return changed
