"""The files of an evaluation: JSON writing, the files an evaluation of a model leaves, and scoring a COCO results file.

- :func:`save_json`: atomic, strict JSON (numpy values become Python values, ``nan`` becomes ``null``).
- :func:`write_evaluation_files`: ``metrics.json``, ``results.json`` (standard COCO results) and ``gt.json`` (the
  ground truth as evaluated) of :func:`frcnn.evaluation.evaluate_split`.
- :func:`score_results_file`: score a COCO results file against a COCO annotation file, without a model.

Scoring ``results.json`` against ``gt.json`` reproduces the numbers of the evaluation that wrote them.
"""

import contextlib
import io
import json
import math
import os
from collections.abc import Mapping

import numpy as np
from pycocotools.coco import COCO

from frcnn.evaluation.metrics import add_voc07, coco_evaluate, detections_to_coco_results, to_coco_ground_truth
from frcnn.fileio import atomic_path

_SHOWN_BAD_ENTRIES = 5  # bad results entries named in the error; the rest are counted


def _jsonable(obj):
    """Numpy scalars / arrays -> Python; non-finite floats -> None, so the file is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_json(obj, path):
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same directory, then ``os.replace``).

    Numpy values become Python values and ``nan`` / ``inf`` become ``null`` (strict JSON, readable by any tool).
    """
    with atomic_path(os.fspath(path), ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=True, allow_nan=False)


def write_evaluation_files(out_dir, metrics, records, detections, class_names, category_ids=None, fmt=None):
    """Write ``metrics.json``, ``results.json`` and ``gt.json`` of an evaluation to ``out_dir``; returns
    ``{"metrics" | "results" | "gt": path}``.

    - ``results.json``: the detections as a standard COCO results list (``image_id``, ``category_id``,
      ``bbox = [x, y, w, h]`` in original pixels, ``score``), with the dataset's own category ids (COCO) and, for
      COCO data (``fmt == "coco"``), the dataset's image ids (``Record.source_id``), so the file can be scored against
      the original annotation file; for VOC and shapes data ``image_id`` is the record's index in the split;
    - ``gt.json``: the ground truth exactly as evaluated (the images read, difficult / crowd boxes as ``iscrowd``),
      as a COCO annotation file with the same ids: :func:`score_results_file` on the two reproduces the numbers;
    - ``metrics.json``: ``metrics`` plus the absolute paths of the two files above (added to ``metrics`` too).
    """
    by_id = {r.image_id: r for r in records}
    # COCO data keeps the dataset's image ids (results then also score against the official annotations).
    use_source = fmt == "coco" and all(isinstance(by_id[d["image_id"]].source_id, (int, np.integer))
                                       for d in detections)

    def out_id(image_id):
        return int(by_id[image_id].source_id) if use_source else int(image_id)

    evaluated = [by_id[d["image_id"]] for d in detections]
    gt = to_coco_ground_truth(
        [{"image_id": out_id(r.image_id), "width": r.width, "height": r.height, "boxes": r.boxes,
          "classes": r.classes, "ignore": r.ignore} for r in evaluated],
        class_names, category_ids,
    ).dataset
    for image, record in zip(gt["images"], evaluated):  # same order: one image per record
        image["file_name"] = os.path.basename(record.file_name)
    results = detections_to_coco_results(
        [dict(d, image_id=out_id(d["image_id"])) for d in detections], category_ids)
    files = {k: os.path.join(out_dir, k + ".json") for k in ("metrics", "results", "gt")}
    metrics["results_file"] = os.path.abspath(files["results"])
    metrics["gt_file"] = os.path.abspath(files["gt"])
    save_json(results, files["results"])
    save_json(gt, files["gt"])
    save_json(metrics, files["metrics"])
    return files


def _read_json_file(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} file '{path}' does not exist") from None
    except OSError as err:
        raise ValueError(f"{what} file '{path}' cannot be read ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"{what} file '{path}' is not valid JSON ({err})") from None


def _number(value):
    """True for a real JSON number (``bool`` is an ``int`` subclass in Python but not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_problem(r, images, categories):
    """What is wrong with one results entry (a string), or None when it can be scored."""
    if not isinstance(r, dict):
        return f"not an object: {str(r)[:80]}"
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
    if missing:
        return f"missing {', '.join(missing)}"
    bbox, score = r["bbox"], r["score"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
        return f"bbox {str(bbox)[:80]} is not [x, y, w, h] of 4 numbers"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {bbox} has a non-finite value"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"bbox {bbox} has a width or height that is not positive"
    if not _number(score):
        return f"score {score!r} is not a number"
    if not math.isfinite(score):
        return f"score {score} is not finite"
    if not 0.0 <= score <= 1.0 + 1e-6:  # a confidence (float32 rounding aside); above 1 it outranks all others
        return f"score {score} is outside [0, 1]"
    for key in ("image_id", "category_id"):
        if isinstance(r[key], bool):  # True == 1 in Python: it would be scored as id 1
            return f"{key} {r[key]!r} is a boolean, not an id"
        if not isinstance(r[key], (int, float, str)):
            return f"{key} {str(r[key])[:40]} is not an id"
    if r["image_id"] not in images:
        return f"image_id {r['image_id']!r} is not in the annotation file"
    if r["category_id"] not in categories:
        return f"category_id {r['category_id']!r} is not among the annotation file's categories {sorted(categories)}"
    return None


def _check_results(results, path, coco_gt):
    """Refuse a results file unless EVERY entry can be scored.

    pycocotools accepts garbage silently: a NaN box matches nothing yet can make AP 100 (an image whose only
    detection is NaN counts as having no false positive), a negative width gives a negative area, a string score
    fails deep inside its sort. So each entry is checked here (4 finite numbers with a positive width and height, a
    finite numeric score, an image and a category the annotation file has) and the file is refused, naming the first
    bad entries and how many there are. So are scores outside ``[0, 1]``, boolean ids (``true`` would be scored as
    id 1) and exact duplicates of an earlier entry (scored as a false positive).
    """
    if not isinstance(results, list):
        raise ValueError(f"results file '{path}' must hold a JSON list of detections (COCO results format), "
                         f"got {type(results).__name__}")
    categories = set(coco_gt.getCatIds())
    images = set(coco_gt.getImgIds())
    bad = []
    first_seen = {}
    for i, r in enumerate(results):
        problem = _entry_problem(r, images, categories)
        if problem is None:
            # The same detection twice counts as a true positive and a false positive: it changes AP.
            key = (r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"])
            if key in first_seen:
                problem = f"duplicate of entry {first_seen[key]}"
            else:
                first_seen[key] = i
        if problem:
            bad.append((i, problem))
    if bad:
        shown = "; ".join(f"entry {i}: {problem}" for i, problem in bad[:_SHOWN_BAD_ENTRIES])
        more = f" (and {len(bad) - _SHOWN_BAD_ENTRIES} more)" if len(bad) > _SHOWN_BAD_ENTRIES else ""
        raise ValueError(f"results file '{path}': {len(bad)} of {len(results)} entries cannot be scored, so the "
                         f"file is refused: {shown}{more}")


def score_results_file(results_path, annotations_path):
    """Score a COCO results file against a COCO annotation file (no model): ``(metrics, class_names)``.

    ``metrics`` has the same keys as :func:`frcnn.evaluation.metrics.evaluate`: the 12 COCOeval numbers and per-class AP
    (pycocotools), and the VOC07 11-point AP50 per class and its mean computed on the same boxes (``iscrowd``
    annotations are ignore regions, as VOC difficult boxes). Classes are the annotation file's categories in
    increasing id order. Raises ``ValueError`` naming the file for unreadable or malformed input.
    """
    data = _read_json_file(annotations_path, "annotation")
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"annotation file '{annotations_path}' is not a COCO annotation file (it needs 'images', "
                         "'annotations' and 'categories')")
    coco_gt = COCO()
    coco_gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    results = _read_json_file(results_path, "results")
    _check_results(results, results_path, coco_gt)
    try:
        metrics = coco_evaluate(coco_gt, results)
    except ValueError as err:
        raise ValueError(f"{results_path}: {err} (annotations: {annotations_path})") from None

    cat_ids = sorted(coco_gt.getCatIds())
    class_names = [str(coco_gt.cats[c]["name"]) for c in cat_ids]
    class_of = {c: k for k, c in enumerate(cat_ids, start=1)}
    records = []
    for image in data["images"]:
        anns = coco_gt.imgToAnns.get(image["id"], [])
        boxes = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # [x, y, w, h] -> [x1, y1, x2, y2]
        records.append({"image_id": image["id"], "width": image.get("width", 0), "height": image.get("height", 0),
                        "boxes": boxes, "classes": [class_of[a["category_id"]] for a in anns],
                        "ignore": [bool(a.get("iscrowd", 0)) for a in anns]})
    per_image = {r["image_id"]: {"image_id": r["image_id"], "boxes": [], "scores": [], "classes": []}
                 for r in records}
    for r in results:
        x, y, w, h = r["bbox"]
        det = per_image[r["image_id"]]
        det["boxes"].append([x, y, x + w, y + h])
        det["scores"].append(r["score"])
        det["classes"].append(class_of[r["category_id"]])
    metrics = add_voc07(metrics, records, list(per_image.values()), class_names, len(results))
    return metrics, class_names
