"""Evaluation, in one place: the metrics, running a model over dataset records, and the files of an evaluation.

- :mod:`frcnn.evaluation.metrics`: COCO-style AP through pycocotools and Pascal VOC2007 11-point AP, pure NumPy on
  ground-truth records and detections (no TensorFlow, no model);
- :mod:`frcnn.evaluation.runner`: the detector over records (:func:`detect_records`), scored
  (:func:`evaluate_records`, also used between training epochs), and over a whole split (:func:`evaluate_split`,
  what ``tools/evaluate.py`` runs);
- :mod:`frcnn.evaluation.results`: strict JSON (:func:`save_json`), the ``metrics.json`` / ``results.json`` /
  ``gt.json`` an evaluation writes, and the scoring of a COCO results file without a model
  (:func:`score_results_file`).

Arrows: runner -> results -> metrics; runner also reads ``frcnn.data``. The printed table is
:func:`frcnn.report.format_report`.
"""

from frcnn.evaluation.metrics import (
    COCO_STAT_NAMES, add_voc07, agreement, category_id_list, coco_evaluate, detections_to_coco_results, evaluate,
    to_coco_ground_truth, voc07_ap, voc_evaluate,
)
from frcnn.evaluation.results import save_json, score_results_file, write_evaluation_files
from frcnn.evaluation.runner import detect_records, evaluate_records, evaluate_split

__all__ = [
    "COCO_STAT_NAMES", "add_voc07", "agreement", "category_id_list", "coco_evaluate", "detect_records", "detections_to_coco_results",
    "evaluate", "evaluate_records", "evaluate_split", "save_json", "score_results_file", "to_coco_ground_truth",
    "voc07_ap", "voc_evaluate", "write_evaluation_files",
]
