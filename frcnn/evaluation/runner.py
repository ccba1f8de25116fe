"""Running a model over dataset records for evaluation: detections in original pixels, their metrics, a whole split.

- :func:`detect_records`: the detector over records through the ``tf.data`` pipeline (``model.predict_on_batch``).
- :func:`evaluate_records`: those detections scored (:func:`frcnn.evaluation.metrics.evaluate`), an unreadable image
  counting as one without detections.
- :func:`evaluate_split`: a split of the dataset a config describes, with the evaluation files written.
"""

import logging

import keras
import numpy as np

from frcnn import data as data_lib
from frcnn.evaluation.metrics import category_id_list, evaluate
from frcnn.evaluation.results import write_evaluation_files
from frcnn.model import unpad_detections

log = logging.getLogger(__name__)


def detect_records(model, cfg, records, max_images=None, verbose=1):
    """Run the detector over dataset records: one dict per image with ``image_id`` and original-pixel ``boxes``,
    ``scores``, ``classes``. Images the pipeline could not decode are missing from the result (and logged)."""
    records = list(records)[:max_images] if max_images else list(records)
    if not records:
        return []
    dataset = data_lib.build_dataset(cfg, records, training=False, batch_size=cfg.eval.batch_size)
    progress = keras.utils.Progbar(len(records), verbose=verbose, unit_name="image")
    detections = []
    for batch in dataset:
        out = model.predict_on_batch(batch)  # detections in original pixels (the batch has scales)
        images = unpad_detections(out)
        detections.extend(images)
        progress.add(len(images))
    return detections


def evaluate_records(model, cfg, records, class_names, category_ids=None, max_images=None, verbose=1):
    """COCO-style (pycocotools) and VOC07 metrics of ``model`` on ``records``; returns (metrics, detections).

    An image the pipeline cannot decode stays in the evaluation with no detections: its ground-truth objects count
    as missed. Leaving it out would raise the score by hiding those objects. Such files are named in a warning and
    listed in ``metrics["unreadable_images"]``; ``detections`` has an empty entry for each.
    """
    records = list(records)[:max_images] if max_images else list(records)
    detections = detect_records(model, cfg, records, verbose=verbose)
    seen = {d["image_id"] for d in detections}
    unreadable = [r for r in records if r.image_id not in seen]
    if unreadable:
        objects = sum(int(np.sum(~r.ignore)) for r in unreadable)
        log.warning("%d of %d images could not be read; their %d ground-truth objects count as missed: %s",
                    len(unreadable), len(records), objects, ", ".join(r.file_name for r in unreadable))
        for r in unreadable:
            detections.append({"image_id": r.image_id, "boxes": np.zeros((0, 4), np.float32),
                               "scores": np.zeros((0,), np.float32), "classes": np.zeros((0,), np.int32)})
        detections.sort(key=lambda d: d["image_id"])
    metrics = evaluate(records, detections, class_names, category_ids=category_ids)
    metrics["unreadable_images"] = [r.file_name for r in unreadable]
    return metrics, detections


def evaluate_split(model, cfg, split, out_dir=None, max_images=None, verbose=1):
    """COCO-style (pycocotools) and VOC07 evaluation of ``model`` on ``split`` of the dataset ``cfg`` describes.

    Returns ``(metrics, files)``: ``metrics`` is :func:`evaluate_records`'s dict (the 12 COCOeval numbers, per-class
    AP and AP50, VOC07 per-class AP50 and their mean, counts, unreadable images) plus ``split`` and ``format``. With
    ``out_dir``, :func:`frcnn.evaluation.results.write_evaluation_files` writes ``metrics.json``, ``results.json`` and
    ``gt.json`` there (``files`` maps each kind to its path); ``tools/evaluate.py --results results.json
    --annotations gt.json`` reproduces these numbers.
    """
    records, class_names, report = data_lib.load_records(cfg, split)
    if cfg.data.classes is not None and tuple(class_names) != tuple(cfg.data.classes):
        raise data_lib.DataError(f"split '{split}' has the classes {list(class_names)}, the model "
                                 f"{list(cfg.data.classes)}")
    if not records:
        raise data_lib.DataError(f"split '{split}' of {cfg.data.root} has no usable images"
                                 + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))
    problem = data_lib.missing_targets(records[:max_images] if max_images else records, False, "evaluate against")
    if problem:
        raise data_lib.DataError(f"split '{split}' of {cfg.data.root} {problem}: no metric can be computed")
    fmt = getattr(records, "format", None)
    category_ids = getattr(records, "category_ids", None)
    if category_ids is not None:
        category_ids = category_id_list(len(class_names), category_ids)
    metrics, detections = evaluate_records(model, cfg, records, class_names, category_ids, max_images, verbose)
    metrics["split"] = split
    metrics["format"] = fmt
    files = {}
    if out_dir:
        files = write_evaluation_files(out_dir, metrics, records, detections, class_names, category_ids, fmt)
    return metrics, files
