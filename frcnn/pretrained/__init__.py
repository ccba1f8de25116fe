"""Weights from elsewhere: Keras' ImageNet ResNet-50, and Detectron2's R50-C4 model-zoo checkpoints and MSRA's
ImageNet ``R-50.pkl``.

- :mod:`frcnn.pretrained.registry`: the zoo, ``detectron2:<name>`` specs, downloads and their SHA-256 records, the
  zoo's class lists and the config that fits each checkpoint;
- :mod:`frcnn.pretrained.reader`: reading the pickles into Detectron2's names;
- :mod:`frcnn.pretrained.convert`: the conversion into this detector's layers.

Public API (re-exported here): :func:`load_backbone` (the initial weights ``model.backbone_weights`` names, what
``frcnn.model.build_model`` calls), :func:`load_detector_weights` (a whole Detectron2 detector),
:func:`load_initial_weights`, :func:`read_checkpoint`, :func:`resolve`, :func:`is_detectron2_spec`,
:func:`zoo_entry`, :func:`default_config`. A whole Detectron2 detector ready to use (what the tools call) comes from
:func:`frcnn.loading.load_pretrained_model`, or ``frcnn.FasterRCNN.from_preset``.
"""

from frcnn.pretrained.convert import (
    class_permutation, conv_kernel, dense_kernel, frozen_bn_values, load_detector_weights, load_initial_weights,
    resnet_plan,
)
from frcnn.pretrained.reader import Checkpoint, read_checkpoint
from frcnn.pretrained.registry import (
    COCO_CATEGORY_IDS, COCO_CLASSES, PREFIX, PRESETS, VOC_CLASSES, ZOO, PretrainedError, ZooEntry, check_sidecar,
    default_config, is_detectron2_spec, preset_entry, resolve, sha256_file, zoo_entry,
)

__all__ = [
    "COCO_CATEGORY_IDS", "COCO_CLASSES", "Checkpoint", "PREFIX", "PRESETS", "PretrainedError", "VOC_CLASSES", "ZOO",
    "ZooEntry", "check_sidecar", "class_permutation", "conv_kernel", "default_config", "dense_kernel",
    "frozen_bn_values", "is_detectron2_spec", "load_backbone", "load_detector_weights", "load_initial_weights",
    "preset_entry", "read_checkpoint", "resnet_plan", "resolve", "sha256_file", "zoo_entry",
]


def load_backbone(model, weights):
    """Initialise ``model`` from ``weights`` (``model.backbone_weights``): ``none`` leaves it random; Detectron2
    specs and ``.pkl`` files go through :func:`load_initial_weights` (trunk and res5, and a zoo detector's RPN);
    ``imagenet`` and Keras ResNet-50 ``.h5`` files through :func:`frcnn.backbone.load_backbone_weights`."""
    if is_detectron2_spec(weights):
        return load_initial_weights(model, weights)
    from frcnn.backbone import load_backbone_weights

    return load_backbone_weights(weights, model.trunk, model.roi_heads.head.res5.layer)
