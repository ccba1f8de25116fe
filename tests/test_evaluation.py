"""Tests of frcnn.evaluation: VOC07 AP against hand-computed numbers, the COCO path against pycocotools itself."""

import contextlib
import io
import json
import math
import os
import types
import warnings

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn import evaluation as ev
from frcnn.report import format_report

CLASS_NAMES = ("cat", "dog")


def record(image_id, boxes, classes, ignore=None, width=640, height=480):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int32).reshape(-1)
    ignore = np.zeros(len(classes), bool) if ignore is None else np.asarray(ignore, bool)
    return {"image_id": image_id, "width": width, "height": height, "boxes": boxes, "classes": classes,
            "ignore": ignore}


def dets(image_id, boxes, scores, classes):
    return {"image_id": image_id, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, np.float32), "classes": np.asarray(classes, np.int32)}


# ----------------------------------------------------------------------------------------------------------------
# VOC07
# ----------------------------------------------------------------------------------------------------------------
# Hand-worked scenario: one class, two images.
#   image 1 gt: A (0,0,10,10), B (20,20,30,30), D (40,40,50,50) difficult;   image 2 gt: C (0,0,20,20)
#   npos = 3 (A, B, C; D is difficult)
#   detections (score):
#     d1 img1 (0,0,10,10)        0.9  IoU(A)=1                          -> TP, A matched
#     d2 img1 (1,0,11,10)        0.8  IoU(A)=90/110=0.82, A taken       -> FP (duplicate)
#     d3 img1 (40,40,50,50)      0.7  IoU(D)=1, D difficult             -> ignored
#     d4 img1 (60,60,70,70)      0.6  no overlap                        -> FP
#     d5 img2 (0,0,20,20)        0.6  tie with d4; d4 comes first (stable, input order) -> TP, C matched
#     d6 img2 (100,100,110,110)  0.3  no overlap                        -> FP
#   non-ignored, in order: TP FP FP TP FP
#     cum TP   1    1    1    2    2
#     cum FP   0    1    2    2    3
#     recall   1/3  1/3  1/3  2/3  2/3
#     precis.  1    1/2  1/3  1/2  2/5
#   11-point: t = 0, .1, .2, .3 -> max precision at recall >= t = 1     (1/3 >= .3)
#             t = .4, .5, .6    -> max(1/2, 2/5) = 1/2                   (2/3 >= .6)
#             t = .7 ... 1.0    -> no recall reaches t -> 0
#   AP = (4 * 1 + 3 * 1/2 + 4 * 0) / 11 = 5.5 / 11 = 0.5
#   (had the tie gone the other way, TP FP TP FP FP, the AP would be (4 + 3 * 2/3) / 11 = 6/11.)
HAND_RECORDS = [
    record(1, [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 1, 1], [False, False, True]),
    record(2, [[0, 0, 20, 20]], [1]),
]
HAND_DETECTIONS = [
    dets(1, [[0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50], [60, 60, 70, 70]], [0.9, 0.8, 0.7, 0.6], [1] * 4),
    dets(2, [[0, 0, 20, 20], [100, 100, 110, 110]], [0.6, 0.3], [1, 1]),
]


def test_voc07_ap_hand_computed_curve():
    recall = [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3]
    precision = [1, 1 / 2, 1 / 3, 1 / 2, 2 / 5]
    assert ev.voc07_ap(recall, precision) == pytest.approx(0.5, abs=1e-12)


def test_voc07_ap_edge_cases():
    assert ev.voc07_ap([], []) == 0.0
    assert ev.voc07_ap([1.0], [1.0]) == 1.0
    # Recall of exactly 3/10 reaches the t = 0.3 threshold (np.arange(0, 1.1, 0.1) would give 0.30000000000000004).
    assert ev.voc07_ap([3 / 10], [1.0]) == pytest.approx(4 / 11, abs=1e-12)


def test_voc_evaluate_hand_computed():
    out = ev.voc_evaluate(HAND_RECORDS, HAND_DETECTIONS, ("cat",))
    assert out["per_class_AP50"]["cat"] == pytest.approx(0.5, abs=1e-12)
    assert out["mAP50"] == pytest.approx(0.5, abs=1e-12)


def test_voc_evaluate_perfect_and_empty():
    out = ev.voc_evaluate(HAND_RECORDS, [dets(r["image_id"], r["boxes"], np.ones(len(r["boxes"])), r["classes"])
                                         for r in HAND_RECORDS], ("cat",))
    assert out["mAP50"] == 1.0
    assert ev.voc_evaluate(HAND_RECORDS, [], ("cat",))["mAP50"] == 0.0
    assert ev.voc_evaluate(HAND_RECORDS, [dets(1, np.zeros((0, 4)), [], [])], ("cat",))["mAP50"] == 0.0


def test_voc_evaluate_class_without_gt_is_nan_and_excluded():
    detections = [dets(1, [[0, 0, 10, 10], [5, 5, 9, 9]], [0.9, 0.8], [1, 2])]
    out = ev.voc_evaluate([record(1, [[0, 0, 10, 10]], [1])], detections, CLASS_NAMES)
    assert out["per_class_AP50"]["cat"] == 1.0
    assert math.isnan(out["per_class_AP50"]["dog"])
    assert out["mAP50"] == 1.0


def test_voc_evaluate_attribute_records():
    records = [types.SimpleNamespace(**r) for r in HAND_RECORDS]
    detections = [types.SimpleNamespace(**d) for d in HAND_DETECTIONS]
    assert ev.voc_evaluate(records, detections, ("cat",))["mAP50"] == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# COCO: identical to pycocotools run from files
# ----------------------------------------------------------------------------------------------------------------
def synthetic_pair(seed=0):
    """Ground truth over 4 images and 2 classes (small, medium and large boxes, a crowd box, an empty image) and
    noisy detections: jittered copies of the gt, duplicates, random false positives, tied scores."""
    rng = np.random.default_rng(seed)
    records = [
        record(1, [[10, 10, 30, 28], [100, 120, 220, 260], [300, 50, 600, 450]], [1, 2, 1], width=640, height=480),
        record(2, [[5, 5, 60, 70], [200, 200, 260, 250], [400, 300, 500, 420]], [2, 2, 1],
               [False, True, False], width=640, height=480),
        record(3, np.zeros((0, 4)), [], width=320, height=240),
        record(4, [[50, 40, 90, 75]], [1], width=320, height=240),
    ]
    detections = []
    for r in records:
        boxes, scores, classes = [], [], []
        for box, cls in zip(r["boxes"], r["classes"]):
            w, h = box[2] - box[0], box[3] - box[1]
            for _ in range(2):  # a good-ish and a possibly duplicated/poor detection of each gt
                jitter = rng.normal(0, 0.12, 4) * np.array([w, h, w, h])
                boxes.append(box + jitter)
                scores.append(rng.choice([0.3, 0.5, 0.7, 0.9]))  # few distinct values -> ties
                classes.append(cls if rng.random() < 0.85 else 3 - cls)
        for _ in range(3):  # false positives
            x, y = rng.uniform(0, 200, 2)
            w, h = rng.uniform(5, 150, 2)
            boxes.append([x, y, x + w, y + h])
            scores.append(rng.uniform(0, 1))
            classes.append(rng.integers(1, 3))
        detections.append(dets(r["image_id"], boxes, scores, classes))
    return records, detections


def reference_coco_json(records, detections, category_ids):
    """The same data written the way a COCO json file is written, independently of frcnn.evaluation."""
    images, annotations, results = [], [], []
    for r in records:
        images.append({"id": r["image_id"], "width": r["width"], "height": r["height"]})
        for box, cls, ign in zip(r["boxes"], r["classes"], r["ignore"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": r["image_id"],
                                "category_id": category_ids[cls - 1], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": int(ign)})
    for d in detections:
        for box, score, cls in zip(d["boxes"], d["scores"], d["classes"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": d["image_id"], "category_id": category_ids[cls - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    categories = [{"id": c, "name": n} for c, n in zip(category_ids, CLASS_NAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def pycocotools_from_files(tmp_path, gt_json, results):
    gt_file, res_file = tmp_path / "gt.json", tmp_path / "res.json"
    gt_file.write_text(json.dumps(gt_json))
    res_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_dt = coco_gt.loadRes(str(res_file))
        e = COCOeval(coco_gt, coco_dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


@pytest.mark.parametrize("category_ids", [None, (7, 3)])
def test_coco_evaluate_matches_pycocotools_from_files(tmp_path, category_ids):
    records, detections = synthetic_pair()
    ids = category_ids or (1, 2)
    gt_json, results_ref = reference_coco_json(records, detections, ids)
    assert any(a["iscrowd"] for a in gt_json["annotations"])
    reference = pycocotools_from_files(tmp_path, gt_json, results_ref)

    results = ev.detections_to_coco_results(detections, category_ids)
    assert results == results_ref
    json.dumps(results)  # JSON-serialisable
    snapshot = json.dumps(results)
    ours = ev.coco_evaluate(ev.to_coco_ground_truth(records, CLASS_NAMES, category_ids), results)
    assert json.dumps(results) == snapshot  # not mutated by loadRes

    assert [ours[k] for k in ev.COCO_STAT_NAMES] == [float(s) for s in reference.stats]
    assert 0.0 < ours["AP"] < 1.0  # a non-trivial case
    # per-class AP: the standard computation on the reference precision array
    cat_ids = sorted(ids)
    for name, cid in zip(CLASS_NAMES, ids):
        p = reference.eval["precision"][:, :, cat_ids.index(cid), 0, -1]
        assert ours["per_class_AP"][name] == float(np.mean(p[p > -1]))
    assert "Average Precision" in ours["summary"]


def test_coco_perfect_detections_give_one():
    records, _ = synthetic_pair()
    detections = [dets(r["image_id"], r["boxes"], np.ones(len(r["boxes"])), r["classes"]) for r in records]
    m = ev.evaluate(records, detections, CLASS_NAMES)
    # pycocotools computes precision as tp / (tp + fp + np.spacing(1)): "1" is 1 - 2e-16 at some recall points.
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert m[k] == pytest.approx(1.0, abs=1e-12), k
    assert m["per_class_AP"] == pytest.approx({"cat": 1.0, "dog": 1.0}, abs=1e-12)
    assert m["voc07_mAP50"] == 1.0
    assert m["voc07_per_class_AP50"] == {"cat": 1.0, "dog": 1.0}


def test_image_without_gt_with_detections_gives_false_positives():
    records = [record(1, [[0, 0, 100, 100]], [1]), record(2, np.zeros((0, 4)), [])]
    good = dets(1, [[0, 0, 100, 100]], [0.5], [1])
    m = ev.evaluate(records, [good], ("cat",))
    assert m["AP"] == pytest.approx(1.0, abs=1e-12) and m["voc07_mAP50"] == 1.0
    # a higher-scored detection on the empty image: FP, TP -> precision 0, 1/2 at recall 0, 1 -> AP 1/2
    m = ev.evaluate(records, [good, dets(2, [[0, 0, 100, 100]], [0.9], [1])], ("cat",))
    assert m["AP"] == pytest.approx(0.5, abs=1e-12)
    assert m["voc07_mAP50"] == pytest.approx(0.5, abs=1e-12)


def test_empty_detections():
    records, _ = synthetic_pair()
    with pytest.warns(UserWarning, match="no detections"):
        m = ev.evaluate(records, [], CLASS_NAMES)
    assert [m[k] for k in ("AP", "AP50", "AR100")] == [0.0, 0.0, 0.0]
    assert m["per_class_AP"] == {"cat": 0.0, "dog": 0.0}
    assert m["voc07_mAP50"] == 0.0
    assert m["num_detections"] == 0
    with pytest.warns(UserWarning):
        m = ev.evaluate(records, [dets(1, np.zeros((0, 4)), [], [])], CLASS_NAMES)
    assert m["AP"] == 0.0


def test_no_ground_truth_at_all():
    records = [record(1, np.zeros((0, 4)), []), record(2, np.zeros((0, 4)), [])]
    coco_gt = ev.to_coco_ground_truth(records, CLASS_NAMES)
    assert coco_gt.getAnnIds() == [] and sorted(coco_gt.getImgIds()) == [1, 2]
    m = ev.evaluate(records, [dets(1, [[0, 0, 10, 10]], [0.9], [1])], CLASS_NAMES)
    assert m["AP"] == -1.0  # pycocotools' "undefined"
    assert all(math.isnan(v) for v in m["per_class_AP"].values())
    assert math.isnan(m["voc07_mAP50"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ev.evaluate(records, [], CLASS_NAMES)["AP"] == -1.0


def test_unknown_image_id_is_an_error():
    with pytest.raises(ValueError, match="absent"):
        ev.evaluate(HAND_RECORDS, [dets(99, [[0, 0, 1, 1]], [0.5], [1])], ("cat",))


def test_num_detections_truncates_padding():
    padded = dets(1, [[0, 0, 100, 100], [0, 0, 0, 0], [0, 0, 0, 0]], [0.5, 0, 0], [1, 1, 1])
    padded["num_detections"] = np.int32(1)
    assert len(ev.detections_to_coco_results([padded])) == 1


# ----------------------------------------------------------------------------------------------------------------
# Reporting and saving
# ----------------------------------------------------------------------------------------------------------------
def test_format_report_and_save_json(tmp_path):
    records, detections = synthetic_pair()
    m = ev.evaluate(records, detections, CLASS_NAMES)
    report = format_report(m, CLASS_NAMES)
    assert "cat" in report and "dog" in report and "AP50" in report and "VOC07" in report

    m["nan_value"] = float("nan")
    m["array"] = np.arange(3, dtype=np.float32)
    path = tmp_path / "sub" / "metrics.json"
    ev.save_json(m, path)
    loaded = json.loads(path.read_text())
    assert loaded["AP"] == m["AP"] and loaded["nan_value"] is None and loaded["array"] == [0.0, 1.0, 2.0]
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left behind
