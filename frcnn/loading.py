"""Loading a trained detector: checkpoint checks, the config saved with it, and building the model it describes.

What ``tools/infer.py``, ``tools/evaluate.py`` and ``tools/export.py`` call before they run anything.

- :func:`find_config` / :func:`load_trained_model`: a training work directory holds ``config.yaml`` (the resolved
  config, with ``data.classes``) and ``checkpoints/{last,best}.weights.h5``; given the weights file, the config is
  found beside it, the model is built without backbone weights and the checkpoint loaded. Every problem (no config,
  a missing, empty, truncated or non-HDF5 file, a checkpoint for other classes) is a :class:`TrainingError` or
  :class:`ConfigError` naming the file, raised before or instead of a Keras traceback.
- :func:`load_pretrained_model`: the same for a Detectron2 detector (``detectron2:<zoo name>`` or a ``.pkl``),
  converted by :mod:`frcnn.pretrained`.

Checkpoints written by training also hold the optimizer's variables. They load into the uncompiled inference
model as they are: Keras' ``load_weights`` walks the model's own attributes, and a model without an optimizer has
nothing to visit under ``optimizer/``, so those variables are skipped silently (no warning, no extra memory).
"""

import dataclasses
import logging
import os
import zipfile

from frcnn import pretrained
from frcnn.checkpoints import BEST_WEIGHTS, LAST_WEIGHTS, intact_alternative, load_checkpoint
from frcnn.config import ConfigError, load_config, resolve_config_path
from frcnn.data import DataError, resolve_classes
from frcnn.errors import TrainingError
from frcnn.model import build_model
from frcnn.workdir import CONFIG_NAME

log = logging.getLogger(__name__)


def find_config(weights):
    """The ``config.yaml`` of the run that wrote ``weights``: beside it, or in its parent folder (weights live in
    ``<workdir>/checkpoints/``). Raises :class:`ConfigError` naming the places looked at."""
    directory = os.path.dirname(os.path.abspath(weights))
    candidates = [os.path.join(directory, CONFIG_NAME), os.path.join(os.path.dirname(directory), CONFIG_NAME)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConfigError(
        f"no {CONFIG_NAME} found for the weights '{weights}' (looked in: {', '.join(candidates)}); "
        "pass the training run's config with --config"
    )


def check_weights_file(path):
    """Fail fast, naming the file, when ``path`` cannot be a Keras checkpoint (``.weights.h5``, or a ``.keras``
    model file): missing, a folder, empty, or not a complete HDF5 file (e.g. cut short by a full disk). Cheap:
    HDF5 checks the file's size against its header without reading the weights."""
    import h5py  # a Keras dependency

    if not os.path.exists(path):
        raise TrainingError(f"checkpoint '{path}' does not exist")
    if not os.path.isfile(path):
        raise TrainingError(f"checkpoint '{path}' is not a file")
    if os.path.getsize(path) == 0:
        raise TrainingError(f"checkpoint '{path}' is empty (0 bytes)")
    if str(path).endswith(".keras"):  # a whole-model archive (model.save): load_weights reads its weights
        if not zipfile.is_zipfile(path):
            raise TrainingError(f"checkpoint '{path}' is not a readable .keras archive; is it complete?")
        return
    if not str(path).endswith(".weights.h5"):
        raise TrainingError(f"checkpoint '{path}': expected a Keras weights file whose name ends in .weights.h5 "
                            "(or a .keras model file)")
    try:
        with h5py.File(path, "r"):
            pass
    except OSError as err:  # h5py reports a truncated file ("truncated file: eof = ...") or a non-HDF5 file
        raise TrainingError(f"checkpoint '{path}' is not a readable HDF5 weights file ({err}); is it complete?"
                            f"{intact_alternative(path)}") from None


def _saved_classes(weights):
    """``data.classes`` of the config saved with ``weights`` (None when there is no readable one)."""
    try:
        return load_config(find_config(weights)).data.classes
    except ConfigError:
        return None


def load_trained_model(weights, config=None, overrides=(), score_thresh=None):
    """Build the detector a training run describes and load its checkpoint: ``(model, cfg, config_path)``.

    ``config``: a config name or path; default :func:`find_config` (the run's resolved ``config.yaml``).
    ``overrides``: ``key=value`` strings applied on top (e.g. ``roi_heads.max_detections=50``). ``score_thresh``: the
    lowest score the caller wants; ``roi_heads.score_thresh`` is lowered to it when higher (this only adds
    detections below the old threshold: the others, their NMS and their order are unchanged).

    The backbone is not initialised from ImageNet (the checkpoint replaces every weight). Frozen BatchNorms are
    folded into their convolutions (:meth:`FasterRCNN.fold_batchnorm`): the model is for inference and export. Raises
    :class:`ConfigError` or :class:`TrainingError` naming the file on any problem.

    ``weights`` may also be ``detectron2:<zoo name>`` or a Detectron2 ``.pkl`` file: see
    :func:`load_pretrained_model` (the config then defaults to ``configs/detectron2_*.yaml``).
    """
    weights = os.fspath(weights)
    if pretrained.is_detectron2_spec(weights):  # detectron2:<zoo name> or a Detectron2 .pkl: converted on load
        return load_pretrained_model(weights, config, overrides, score_thresh)
    check_weights_file(weights)
    config_path = config or find_config(weights)
    cfg = load_config(config_path, overrides)
    if cfg.data.classes is None:
        try:
            cfg = resolve_classes(cfg)
        except DataError as err:
            raise ConfigError(
                f"{config_path}: data.classes is not set and cannot be read from the data ({err}); use the "
                f"{CONFIG_NAME} saved in the training run's work directory"
            ) from None
    saved = _saved_classes(weights) if config else None
    if saved is not None and len(saved) != len(cfg.data.classes):
        raise TrainingError(
            f"checkpoint '{weights}' was trained with {len(saved)} classes ({', '.join(saved)}) according to the "
            f"{CONFIG_NAME} beside it, but {config_path} lists {len(cfg.data.classes)} "
            f"({', '.join(cfg.data.classes)})"
        )
    if saved is not None and tuple(saved) != tuple(cfg.data.classes):
        log.warning("%s names the classes %s, the config saved with %s names them %s; the names of %s are used",
                    config_path, list(cfg.data.classes), weights, list(saved), config_path)
    cfg = _lower_score_thresh(cfg, score_thresh)
    model = build_model(cfg, load_weights=False)
    load_checkpoint(model, weights)
    model.fold_batchnorm()  # for inference, evaluation and export: frozen norms folded into their convolutions
    return model, cfg, os.path.abspath(config_path)


def _lower_score_thresh(cfg, score_thresh):
    """``cfg`` with ``roi_heads.score_thresh`` lowered to ``score_thresh`` when that is lower (never raised)."""
    if score_thresh is not None and score_thresh < cfg.roi_heads.score_thresh:
        cfg = cfg.replace(roi_heads=dataclasses.replace(cfg.roi_heads, score_thresh=float(score_thresh)))
    return cfg


def load_pretrained_model(weights, config=None, overrides=(), score_thresh=None, cache_dir=None):
    """``(model, cfg, config_path)`` for a Detectron2 detector: what ``tools/infer.py``, ``evaluate.py`` and
    ``export.py`` get from ``--weights detectron2:<name>`` or ``--weights model_final_*.pkl``.

    The config defaults to :func:`frcnn.pretrained.default_config`; ``overrides`` and ``score_thresh`` as in
    :func:`load_trained_model`.
    """
    ckpt = pretrained.read_checkpoint(pretrained.resolve(weights, cache_dir))
    config_path = resolve_config_path(config or pretrained.default_config(weights, ckpt))
    cfg = load_config(config_path, overrides)
    if cfg.data.classes is None:
        raise ConfigError(f"{config_path}: data.classes must list the checkpoint's classes in Detectron2's order")
    cfg = _lower_score_thresh(cfg, score_thresh)
    model = build_model(cfg, load_weights=False)
    pretrained.load_detector_weights(model, ckpt)
    model.fold_batchnorm()
    return model, cfg, os.path.abspath(config_path)


def from_preset(preset, config=None, overrides=(), score_thresh=None):
    """A detector ready for inference, keras-hub style (what ``frcnn.FasterRCNN.from_preset`` calls).

    ``preset``: a preset name of :data:`frcnn.pretrained.PRESETS` (``detectron2_coco_r50_c4_3x``, downloaded once),
    ``detectron2:<zoo name>``, a Detectron2 ``.pkl``, a training run's ``.weights.h5`` (its ``config.yaml`` beside
    it), or a training work directory (its best checkpoint, else its last).
    """
    preset = os.fspath(preset)
    entry = pretrained.preset_entry(preset)
    if entry is not None:
        preset = pretrained.PREFIX + entry.name
    elif os.path.isdir(preset):
        folder = os.path.join(preset, "checkpoints")
        for name in (BEST_WEIGHTS, LAST_WEIGHTS):
            if os.path.isfile(os.path.join(folder, name)):
                preset = os.path.join(folder, name)
                break
        else:
            raise TrainingError(f"{preset} is a folder without {BEST_WEIGHTS} or {LAST_WEIGHTS} under checkpoints/: "
                                "not a training work directory")
    elif not (pretrained.is_detectron2_spec(preset) or os.path.exists(preset)):
        raise ConfigError(f"unknown preset '{preset}': use one of {', '.join(pretrained.PRESETS)}, "
                          "detectron2:<zoo name>, a checkpoint file or a training work directory")
    return load_trained_model(preset, config, overrides, score_thresh)[0]
