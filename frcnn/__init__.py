"""frcnn: Faster R-CNN (ResNet-50-C4) on Keras 3 with the TensorFlow backend.

    import frcnn
    cfg = frcnn.load_config("voc.yaml", overrides=["model.num_rois=64"])
    model = frcnn.build_model(cfg)
    detections = model.detect([image])   # list of HxWx3 uint8 RGB arrays
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from frcnn.config import Config, ConfigError, load_config, save_config  # noqa: E402
from frcnn.layers import RoiPoolingConv  # noqa: E402
from frcnn.model import FasterRCNN  # noqa: E402
from frcnn import model as _model  # noqa: E402


def build_model(cfg, load_weights=True):
    """:func:`frcnn.model.build_model`, after filling ``data.classes`` from the data when the config does not list
    them (:func:`frcnn.data.resolve_classes`: VOC annotations, COCO categories or the shapes classes).

    The class lookup lives here, above the model, so that ``frcnn.model`` never imports the data pipeline.
    """
    if cfg.data.classes is None:
        from frcnn.data import resolve_classes

        cfg = resolve_classes(cfg)
    return _model.build_model(cfg, load_weights)


__all__ = ["Config", "ConfigError", "FasterRCNN", "RoiPoolingConv", "build_model", "load_config", "save_config"]
__version__ = "0.1.0"
