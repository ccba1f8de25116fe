"""Datasets (Pascal VOC, COCO, the synthetic ``shapes``) and the input pipelines (``tf.data`` or NumPy).

Typical use::

    cfg = resolve_classes(cfg)                       # fills data.classes from the data when not given
    records, class_names, report = load_records(cfg, cfg.data.train_split)
    print(summary(records, class_names, report))
    dataset = build_dataset(cfg, records, training=True)   # tf.data on TensorFlow, NumPy (PyDataset) otherwise

Records (:class:`frcnn.data.records.Record`) keep boxes in ORIGINAL image pixels with class ids ``1..C-1``
(0 is the background, ``frcnn.targets.BACKGROUND``); batches follow ``docs/CONTRACTS.md``. Bad data is skipped with
a reason in the report (or raises :class:`DataError` with ``data.strict``).

This package imports only ``frcnn.config`` and ``frcnn.transform`` from the project. ``import frcnn.data`` imports
neither TensorFlow nor Keras: :mod:`frcnn.data.tf_pipeline` (TensorFlow) and :mod:`frcnn.data.numpy_pipeline`
(Keras' ``PyDataset``) are imported when a dataset is built.
"""

import dataclasses

from frcnn.data.coco import coco_class_names, load_coco
from frcnn.data.imageio import inspect_image, load_image
from frcnn.data.pipeline import build_dataset, check_decodable
from frcnn.data.records import DataError, Issue, Record, RecordList, Report, missing_targets, summary
from frcnn.data.shapes import SHAPE_CLASSES, ensure_shapes, shapes_config
from frcnn.data.voc import load_voc, voc_class_names

__all__ = [
    "DataError", "Issue", "Record", "RecordList", "Report", "SHAPE_CLASSES", "build_dataset", "check_decodable",
    "inspect_image",
    "load_image", "load_records", "missing_targets", "resolve_classes", "summary",
]


def resolve_classes(cfg):
    """``cfg`` with ``data.classes`` filled (``dataclasses.replace``) when it is not given.

    voc: sorted object names of the train split's annotations (all roots); coco: category names of the train split
    in category-id order; shapes: :data:`SHAPE_CLASSES`. A config that already lists classes is returned as is.
    """
    if cfg.data.classes is not None:
        return cfg
    fmt = cfg.data.format
    if fmt == "shapes":
        return shapes_config(cfg)
    # data.format is one of voc, coco, shapes: the config refuses any other value.
    if fmt == "voc":
        names = voc_class_names(cfg, cfg.data.train_split)
    else:
        names = coco_class_names(cfg, cfg.data.train_split)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=tuple(names)))


def load_records(cfg, split):
    """Read ``split`` of the dataset ``cfg.data`` describes: ``(records, class_names, report)``.

    ``records`` is a :class:`RecordList` (``image_id`` = index), ``class_names`` the class tuple without
    background, ``report`` the :class:`Report` of skipped files and fixes. shapes data is generated on first use.
    Without ``data.classes``, the class list comes from the train split (so that train and val agree; for COCO from
    the categories of the split's own JSON, which COCO keeps identical across splits). Raises :class:`DataError`
    for a missing root or split file, and for any bad file in strict mode.
    """
    fmt = cfg.data.format
    if fmt == "shapes":
        root = ensure_shapes(cfg)
        cfg = shapes_config(cfg)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
        records, report = load_voc(cfg, split, format="shapes")
    elif fmt == "voc":
        class_names = cfg.data.classes
        if class_names is None and split != cfg.data.train_split:
            class_names = voc_class_names(cfg, cfg.data.train_split)
        records, report = load_voc(cfg, split, class_names)
    else:  # coco (the config allows no other format)
        records, report = load_coco(cfg, split)
    return records, records.class_names, report
