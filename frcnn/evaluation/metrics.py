"""Detection metrics: COCO-style AP through pycocotools, and Pascal VOC2007 11-point AP.

Pure NumPy + pycocotools: nothing here runs the model. VOC07 matching uses :func:`frcnn.boxes.pairwise_iou_numpy`,
the NumPy form of the project's one IoU.

Conventions
-----------
Boxes are the project's convention (``frcnn/boxes.py``): ``(x1, y1, x2, y2)`` float32 continuous pixel
coordinates in the *original* image, width ``x2 - x1`` (no ``+ 1``). COCO's ``[x, y, w, h]`` is the same
continuous convention, so the conversion is ``[x1, y1, x2 - x1, y2 - y1]``.

Class ids: 0 is background and never appears here; ``1..C-1`` index ``class_names`` (class ``k`` is
``class_names[k - 1]``). COCO category ids are ``category_ids[k - 1]`` when given (e.g. the real, non-contiguous
COCO ids), else ``k``.

Inputs
------
``records``: ground truth, one per image, dicts or attribute objects with ``image_id`` (int), ``width``,
``height`` (original size), ``boxes`` (K, 4), ``classes`` (K,) in 1..C-1 and optionally ``ignore`` (K,) bool (VOC
*difficult* or COCO *iscrowd*; all False when absent). ``detections``: one dict per image with ``image_id``,
``boxes`` (N, 4) in original pixels, ``scores`` (N,) and ``classes`` (N,) in 1..C-1; if it also holds
``num_detections`` (the padded output of the detection layer), only the first ``num_detections`` rows are used.

All metrics are fractions in [0, 1] (not percentages). COCOeval's "no ground truth" value ``-1`` is kept in the
12 summary numbers (that is what pycocotools reports); per-class values use ``nan`` for "undefined".
"""

import contextlib
import copy
import io
import math
import warnings
from collections.abc import Mapping

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn.boxes import pairwise_iou_numpy

# The 12 numbers of COCOeval.stats for iouType="bbox", in order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# --------------------------------------------------------------------------------------------------------------
# Input access
# --------------------------------------------------------------------------------------------------------------
def _get(obj, name, default=None):
    """``obj[name]`` for mappings, ``obj.name`` otherwise; ``default`` when missing."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _gt_arrays(record):
    """``(image_id, boxes (K,4) float64, classes (K,) int64, ignore (K,) bool)`` of one ground-truth record."""
    image_id = int(_get(record, "image_id"))
    boxes = np.asarray(_get(record, "boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
    classes = np.asarray(_get(record, "classes", np.zeros((0,))), dtype=np.int64).reshape(-1)
    ignore = _get(record, "ignore")
    ignore = np.zeros(len(classes), bool) if ignore is None else np.asarray(ignore, dtype=bool).reshape(-1)
    if not len(boxes) == len(classes) == len(ignore):
        raise ValueError(
            f"image {image_id}: boxes, classes and ignore disagree in length "
            f"({len(boxes)}, {len(classes)}, {len(ignore)})"
        )
    # float32 is the stored precision; the maths below runs in float64 on those exact values.
    return image_id, boxes.astype(np.float64), classes, ignore


def _det_arrays(detection):
    """``(image_id, boxes (N,4) float64, scores (N,) float64, classes (N,) int64)`` of one detections dict."""
    image_id = int(_get(detection, "image_id"))
    boxes = np.asarray(_get(detection, "boxes"), dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(_get(detection, "scores"), dtype=np.float32).reshape(-1)
    classes = np.asarray(_get(detection, "classes"), dtype=np.int64).reshape(-1)
    num = _get(detection, "num_detections")
    if num is not None:
        num = int(np.asarray(num).reshape(()))
        boxes, scores, classes = boxes[:num], scores[:num], classes[:num]
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(
            f"image {image_id}: detection boxes, scores and classes disagree in length "
            f"({len(boxes)}, {len(scores)}, {len(classes)})"
        )
    return image_id, boxes.astype(np.float64), scores.astype(np.float64), classes


def category_id_list(num_classes, category_ids):
    """COCO category id of each class 1..num_classes, as a list (index k - 1)."""
    if category_ids is None:
        return list(range(1, num_classes + 1))
    ids = list(category_ids)
    # A configured class that a COCO file does not list has no id (None): give it a fresh one above the others,
    # so that its detections can still be written and scored.
    fresh = max([int(c) for c in ids if c is not None], default=0)
    for k, cid in enumerate(ids):
        if cid is None:
            fresh += 1
            ids[k] = fresh
    ids = [int(c) for c in ids]
    if len(ids) != num_classes:
        raise ValueError(f"category_ids has {len(ids)} entries for {num_classes} classes")
    if len(set(ids)) != len(ids):
        raise ValueError(f"category_ids are not unique: {ids}")
    return ids


def _check_classes(classes, num_classes, what):
    if len(classes) and (classes.min() < 1 or classes.max() > num_classes):
        raise ValueError(f"{what}: class ids must be in 1..{num_classes}, got {sorted(set(classes.tolist()))}")


def _unique_ids(ids, what):
    seen = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{what}: image_id {i} appears more than once")
        seen.add(i)
    return seen


def _xywh(box):
    """One ``(x1, y1, x2, y2)`` box -> COCO ``[x, y, w, h]`` as plain Python floats."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


# --------------------------------------------------------------------------------------------------------------
# COCO (pycocotools)
# --------------------------------------------------------------------------------------------------------------
def to_coco_ground_truth(records, class_names, category_ids=None):
    """Ground-truth ``records`` as an in-memory pycocotools ``COCO`` object (no file is written).

    Images carry ``width`` / ``height``; annotations carry ``bbox = [x1, y1, x2 - x1, y2 - y1]``, ``area = w * h``
    and ``iscrowd = 1`` for ``ignore`` boxes. COCOeval turns ``iscrowd`` into its ignore flag: a detection matched
    to a crowd box counts as neither TP nor FP, crowd boxes are not counted in recall, and several detections may
    match the same crowd box. (Its IoU with a crowd box is intersection / detection area.) That is the standard
    way to make VOC *difficult* boxes ignore regions in COCOeval.

    Every class becomes a category, even one without annotations (COCOeval then reports -1 for it and
    :func:`coco_evaluate` reports nan). Annotation ids start at 1: COCOeval stores the matched gt id in its match
    table and reads 0 as "unmatched", so an id of 0 would silently lose a true positive.
    """
    cat_ids = category_id_list(len(class_names), category_ids)
    images, annotations = [], []
    image_ids = []
    for record in records:
        image_id, boxes, classes, ignore = _gt_arrays(record)
        _check_classes(classes, len(class_names), f"ground truth of image {image_id}")
        image_ids.append(image_id)
        images.append({"id": image_id, "width": int(_get(record, "width")), "height": int(_get(record, "height"))})
        for box, cls, ign in zip(boxes, classes, ignore):
            bbox = _xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_ids[int(cls) - 1],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": int(bool(ign)),
                }
            )
    _unique_ids(image_ids, "ground truth")
    categories = [{"id": cid, "name": str(name)} for cid, name in zip(cat_ids, class_names)]
    coco = COCO()
    # 'annotations' must exist even when empty: createIndex only builds catToImgs when the key is present, and
    # loadRes / COCOeval expect 'images' and 'categories'.
    coco.dataset = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco_results(detections, category_ids=None):
    """Per-image detections -> COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h], score}``.

    Values are plain Python ints and floats (JSON-serialisable; float32 inputs survive a JSON round trip exactly).
    With ``category_ids`` class ``k`` maps to ``category_ids[k - 1]``, else to ``k``.
    """
    results = []
    for detection in detections:
        image_id, boxes, scores, classes = _det_arrays(detection)
        if category_ids is not None:
            ids = [int(c) for c in category_ids]
            _check_classes(classes, len(ids), f"detections of image {image_id}")
        for box, score, cls in zip(boxes, scores, classes):
            cat = int(cls) if category_ids is None else ids[int(cls) - 1]
            results.append({"image_id": image_id, "category_id": cat, "bbox": _xywh(box), "score": float(score)})
    return results


def _empty_results(coco_gt):
    """The COCO object ``loadRes`` would build for zero detections (``loadRes([])`` fails on ``anns[0]``)."""
    res = COCO()
    res.dataset = {
        "info": {},
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate(coco_gt, results):
    """Run pycocotools' COCOeval (bbox) of ``results`` (COCO result dicts) against ``coco_gt`` (a ``COCO``).

    Returns a dict with
    - the 12 ``COCOeval.stats`` as floats under :data:`COCO_STAT_NAMES` (AP is AP@[.5:.95], maxDets 100; -1 where
      pycocotools reports -1, i.e. no ground truth in that setting);
    - ``per_class_AP``: {category name: AP@[.5:.95]} and ``per_class_AP50``: {name: AP@.5} (COCO's 101-point AP),
      from ``eval['precision'][t, :, k, area=all, maxDets=100]`` averaging the entries > -1, as detectron2 does;
      ``nan`` for a category without ground truth;
    - ``summary``: the text ``COCOeval.summarize()`` prints (captured, not printed) for logging.

    ``results`` is not modified (``loadRes`` mutates the dicts it gets, so it receives a deep copy). With no
    results at all, a warning is issued and the evaluation runs with an empty detection set (AP 0 for every
    category with ground truth).
    """
    known = set(coco_gt.getImgIds())
    unknown = sorted({int(r["image_id"]) for r in results} - known)
    if unknown:
        raise ValueError(f"results refer to image ids absent from the ground truth: {unknown[:10]}")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        if len(results) == 0:
            warnings.warn("coco_evaluate: no detections; every AP / AR is 0 (or -1 where there is no ground truth)")
            coco_dt = _empty_results(coco_gt)
        else:
            coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()

    metrics = {name: float(value) for name, value in zip(COCO_STAT_NAMES, coco_eval.stats)}
    precision = coco_eval.eval["precision"]  # (T iou thresholds, R recall points, K categories, A areas, M maxDets)
    params = coco_eval.params
    area_all = list(params.areaRngLbl).index("all")
    max_dets = len(params.maxDets) - 1  # 100
    iou50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    per_class, per_class50 = {}, {}
    for k, cat_id in enumerate(params.catIds):
        # evaluate() turns catIds into numpy ints, which loadCats() does not accept: index the dict directly.
        name = coco_gt.cats[int(cat_id)]["name"]
        per_class[name] = _mean_valid(precision[:, :, k, area_all, max_dets])
        per_class50[name] = _mean_valid(precision[iou50, :, k, area_all, max_dets])
    metrics["per_class_AP"] = per_class
    metrics["per_class_AP50"] = per_class50
    metrics["summary"] = summary.getvalue()
    return metrics


def _mean_valid(values):
    values = values[values > -1]
    return float(np.mean(values)) if values.size else float("nan")


# --------------------------------------------------------------------------------------------------------------
# Pascal VOC2007
# --------------------------------------------------------------------------------------------------------------
def voc07_ap(recall, precision):
    """VOC2007 11-point interpolated AP: mean over ``t`` in {0, 0.1, ..., 1} of ``max(precision[recall >= t])``
    (0 when no recall reaches ``t``), the definition of the VOC2007 devkit (``VOCevaldet.m``).

    Thresholds are exactly ``k / 10`` (``np.arange(11) / 10``), not ``np.arange(0, 1.1, 0.1)``, whose
    ``0.30000000000000004`` would wrongly exclude a recall of exactly 3/10. The 11 values are summed then divided
    by 11 (the devkit accumulates ``p / 11``, which differs in the last bit; perfect detections give exactly 1.0
    here). Empty inputs give 0.0.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall and precision differ in length: {recall.shape} vs {precision.shape}")
    total = 0.0
    for t in np.arange(11) / 10.0:
        mask = recall >= t
        total += float(precision[mask].max()) if mask.any() else 0.0
    return total / 11.0


def voc_evaluate(records, detections, class_names, iou_thresh=0.5):
    """Pascal VOC2007-style AP per class at one IoU threshold, with the 11-point AP of :func:`voc07_ap`.

    Per class: all detections of that class over all images, sorted by descending score (stable: ties keep the
    input order, images in the order of ``detections`` then rows within an image); each is compared with *all*
    ground truth of that class in its image and takes the one of highest IoU (first on ties):
    - IoU >= ``iou_thresh`` with a *difficult* (``ignore``) box: ignored, neither TP nor FP;
    - IoU >= ``iou_thresh`` with a box not yet matched: TP, and the box is now matched;
    - IoU >= ``iou_thresh`` with an already matched box: FP (a duplicate), even if another box would match;
    - otherwise (or no ground truth of that class in the image, or an image without records): FP.
    Recall is over ``npos``, the number of non-difficult boxes; precision is TP / (TP + FP) over the non-ignored
    detections. ``>=`` follows the MATLAB devkit (py-faster-rcnn's ``voc_eval.py`` uses ``>``).

    IoU uses the project's continuous convention (width ``x2 - x1``). The original devkit works on 1-based integer
    pixel coordinates with ``+ 1`` widths; both give the same IoU for boxes read as ``(xmin - 1, ymin - 1, xmax,
    ymax)``, as the VOC reader does, but detections are real-valued here and not rounded.

    A class with no non-difficult ground truth has AP ``nan`` and is left out of ``mAP50`` (the VOC devkit never
    meets that case on VOC; detectron2 assumes every class has ground truth). ``mAP50`` is ``nan`` if no class has
    ground truth. Returns ``{"per_class_AP50": {name: AP}, "mAP50": float}`` (keys say 50 whatever
    ``iou_thresh`` is).
    """
    num_classes = len(class_names)
    gt = {}
    for record in records:
        image_id, boxes, classes, ignore = _gt_arrays(record)
        _check_classes(classes, num_classes, f"ground truth of image {image_id}")
        if image_id in gt:
            raise ValueError(f"ground truth: image_id {image_id} appears more than once")
        gt[image_id] = (boxes, classes, ignore)
    dets = [_det_arrays(d) for d in detections]
    _unique_ids([d[0] for d in dets], "detections")
    unknown = sorted({d[0] for d in dets} - set(gt))
    if unknown:
        raise ValueError(f"detections refer to image ids absent from the ground truth: {unknown[:10]}")
    for image_id, _, _, classes in dets:
        _check_classes(classes, num_classes, f"detections of image {image_id}")

    per_class = {}
    for k in range(1, num_classes + 1):
        gt_k = {}
        npos = 0
        for image_id, (boxes, classes, ignore) in gt.items():
            sel = classes == k
            gt_k[image_id] = (boxes[sel], ignore[sel], np.zeros(int(sel.sum()), bool))
            npos += int(np.count_nonzero(~ignore[sel]))
        det_images, det_boxes, det_scores = [], [], []
        for image_id, boxes, scores, classes in dets:
            sel = classes == k
            det_images.extend([image_id] * int(sel.sum()))
            det_boxes.append(boxes[sel])
            det_scores.append(scores[sel])
        det_boxes = np.concatenate(det_boxes) if det_boxes else np.zeros((0, 4))
        det_scores = np.concatenate(det_scores) if det_scores else np.zeros((0,))
        order = np.argsort(-det_scores, kind="stable")

        is_tp = []  # one entry per non-ignored detection, in score order
        for d in order:
            boxes, ignore, matched = gt_k[det_images[d]]
            if len(boxes) == 0:
                is_tp.append(False)
                continue
            ious = pairwise_iou_numpy(det_boxes[d : d + 1], boxes)[0]
            j = int(np.argmax(ious))
            if ious[j] >= iou_thresh:
                if ignore[j]:
                    continue  # on a difficult box: neither TP nor FP
                if not matched[j]:
                    matched[j] = True
                    is_tp.append(True)
                else:
                    is_tp.append(False)  # duplicate detection
            else:
                is_tp.append(False)
        name = str(class_names[k - 1])
        if npos == 0:
            per_class[name] = float("nan")
            continue
        tp = np.cumsum(np.asarray(is_tp, dtype=np.float64))
        fp = np.cumsum(1.0 - np.asarray(is_tp, dtype=np.float64))
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[name] = voc07_ap(recall, precision)
    valid = [v for v in per_class.values() if not math.isnan(v)]
    return {"per_class_AP50": per_class, "mAP50": float(np.mean(valid)) if valid else float("nan")}


# --------------------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------------------
def evaluate(records, detections, class_names, category_ids=None):
    """COCO-style and VOC07 metrics of ``detections`` against ``records`` in one flat dict.

    Keys: the 12 COCO numbers (``AP``, ``AP50``, ... see :data:`COCO_STAT_NAMES`), ``per_class_AP`` and
    ``per_class_AP50`` (COCO, keyed by class name), ``summary`` (pycocotools' printed table), ``voc07_mAP50``,
    ``voc07_per_class_AP50``, ``num_images`` and ``num_detections``.
    """
    records = list(records)
    detections = list(detections)
    coco_gt = to_coco_ground_truth(records, class_names, category_ids)
    results = detections_to_coco_results(detections, category_ids)
    metrics = coco_evaluate(coco_gt, results)
    return add_voc07(metrics, records, detections, class_names, len(results))


def add_voc07(metrics, records, detections, class_names, num_detections):
    """``metrics`` (from :func:`coco_evaluate`) completed with ``voc07_mAP50``, ``voc07_per_class_AP50`` (of
    :func:`voc_evaluate` on the same boxes), ``num_images`` and ``num_detections``; returns ``metrics``."""
    voc = voc_evaluate(records, detections, class_names)
    metrics["voc07_mAP50"] = voc["mAP50"]
    metrics["voc07_per_class_AP50"] = voc["per_class_AP50"]
    metrics["num_images"] = len(records)
    metrics["num_detections"] = num_detections
    return metrics


def agreement(reference, detections, class_names, sizes, reference_min_score=0.5):
    """How well ``detections`` reproduce ``reference`` detections of the same images (another precision, another
    implementation): the COCO metrics of ``detections`` scored with the reference's detections of score at least
    ``reference_min_score`` as ground truth. ``reference`` and ``detections``: one dict per image (``boxes``,
    ``scores``, ``classes``) in the same order; ``sizes``: ``(height, width)`` per image. AP50 1.0 means every
    confident reference detection is found, with its class, ranked above the detections that match nothing."""
    from frcnn.data.records import make_record

    records, dets = [], []
    for i, (ref, det, (height, width)) in enumerate(zip(reference, detections, sizes)):
        keep = np.asarray(ref["scores"]) >= reference_min_score
        records.append(make_record(i, f"image {i}", width, height, np.asarray(ref["boxes"])[keep],
                                   np.asarray(ref["classes"])[keep]))
        dets.append({"image_id": i, "boxes": det["boxes"], "scores": det["scores"], "classes": det["classes"]})
    return evaluate(records, dets, class_names)
