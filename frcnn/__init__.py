"""frcnn: Faster R-CNN (ResNet-50-C4) on Keras 3: TensorFlow (the default backend), JAX or PyTorch.

    import frcnn
    cfg = frcnn.load_config("voc.yaml", overrides=["train.batch_size=4"])
    model = frcnn.build_model(cfg)
    detections = frcnn.detect(model, [image])   # list of HxWx3 uint8 RGB arrays
    model = frcnn.FasterRCNN.from_preset("detectron2_coco_r50_c4_3x")   # Detectron2's trained R50-C4

``import frcnn`` is cheap: the names below are imported on first use (PEP 562), so the command-line tools can set
up logging and the Keras backend before Keras (and its backend) is imported.

Backend: ``KERAS_BACKEND`` (or ``~/.keras/keras.json``) as Keras reads it. Where neither names one, frcnn picks
TensorFlow, or JAX, then PyTorch, when TensorFlow is not installed.
"""

import importlib
import importlib.util
import json
import os

__version__ = "0.2.0"


_BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy"}


def _importable(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests hide TensorFlow that way)
        return False


def _default_backend():
    """TensorFlow unless the user chose a backend; JAX or PyTorch where TensorFlow is not installed.

    ``~/.keras/keras.json`` counts as a choice only when its backend is importable: Keras writes that file, naming
    TensorFlow, the first time it is imported, also on a machine where only JAX is installed."""
    if "KERAS_BACKEND" in os.environ:
        return
    config = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "keras.json")
    try:
        with open(config, encoding="utf-8") as f:
            chosen = json.load(f).get("backend")
        if chosen and _importable(_BACKEND_MODULES.get(chosen, chosen)):
            return
    except (OSError, ValueError, AttributeError):
        pass
    for backend in ("tensorflow", "jax", "torch"):
        if _importable(_BACKEND_MODULES[backend]):
            os.environ["KERAS_BACKEND"] = backend
            return
    os.environ["KERAS_BACKEND"] = "tensorflow"  # Keras' own default; its import error then says what is missing


_default_backend()

# name -> module that defines it
_EXPORTS = {
    "Config": "frcnn.config",
    "ConfigError": "frcnn.config",
    "load_config": "frcnn.config",
    "save_config": "frcnn.config",
    "RoiPoolingConv": "frcnn.layers",
    "FasterRCNN": "frcnn.model",
    "detect": "frcnn.inference",
    "load_trained_model": "frcnn.loading",
}

__all__ = sorted(_EXPORTS) + ["__version__", "build_model"]


def build_model(cfg, load_weights=True):
    """:func:`frcnn.model.build_model`, after filling ``data.classes`` from the data when the config does not list
    them (:func:`frcnn.data.resolve_classes`: VOC annotations, COCO categories or the shapes classes).

    The class lookup lives here, above the model, so that ``frcnn.model`` never imports the data pipeline.
    """
    from frcnn import model

    if cfg.data.classes is None:
        from frcnn.data import resolve_classes

        cfg = resolve_classes(cfg)
    return model.build_model(cfg, load_weights)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'frcnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
