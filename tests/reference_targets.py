"""Slow, obvious NumPy oracles for frcnn.targets and frcnn.losses, written with explicit loops.

Used only by the tests. They restate the rules from the brief one box at a time, independently of the vectorised
TensorFlow code (including their own IoU and encode), so that a shared mistake is unlikely.
"""

import math

import numpy as np

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


def iou_one(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def iou_matrix(boxes_a, boxes_b):
    out = np.zeros((len(boxes_a), len(boxes_b)), np.float64)
    for i, a in enumerate(boxes_a):
        for j, b in enumerate(boxes_b):
            out[i, j] = iou_one(a, b)
    return out


def encode_one(ref, target, weights):
    wx, wy, ww, wh = weights
    aw, ah = ref[2] - ref[0], ref[3] - ref[1]
    ax, ay = ref[0] + 0.5 * aw, ref[1] + 0.5 * ah
    gw, gh = target[2] - target[0], target[3] - target[1]
    gx, gy = target[0] + 0.5 * gw, target[1] + 0.5 * gh
    return np.array(
        [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * math.log(gw / aw), wh * math.log(gh / ah)], np.float64
    )


def match_one(iou, gt_valid, fg, bg, low_quality):
    """One image: ``iou (N, M)``, ``gt_valid (M,)`` -> ``matched_idx (N,)``, ``labels (N,)``."""
    n, m = iou.shape
    matched_idx = np.zeros(n, np.int64)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        best, best_j = -1.0, None
        for j in range(m):
            if gt_valid[j] and iou[i, j] > best:  # strict '>' keeps the first of equal maxima
                best, best_j = iou[i, j], j
        if best_j is None:  # no valid gt: IoU 0 and the index is irrelevant
            best, best_j = 0.0, 0
        matched_idx[i] = best_j
        if best >= fg:
            labels[i] = POSITIVE
        elif best < bg:
            labels[i] = NEGATIVE
        else:
            labels[i] = IGNORE
    if low_quality:
        for j in range(m):
            if not gt_valid[j]:
                continue
            highest = max(iou[i, j] for i in range(n))
            if highest <= 0:
                continue
            for i in range(n):
                if iou[i, j] == highest:
                    labels[i] = POSITIVE
    return matched_idx, labels


def rpn_labels_one(anchors, gt_boxes, gt_valid, image_size, fg=0.7, bg=0.3):
    """Unsampled RPN labels and matched gt of one image; anchors with centre outside the image are ignored."""
    height, width = image_size
    inside = np.zeros(len(anchors), bool)
    for i, a in enumerate(anchors):
        cx, cy = 0.5 * (a[0] + a[2]), 0.5 * (a[1] + a[3])
        inside[i] = 0 <= cx < width and 0 <= cy < height
    iou = iou_matrix(anchors, gt_boxes)
    for i in range(len(anchors)):
        if not inside[i]:
            iou[i, :] = -1.0  # out-of-image anchors take no part, not even as a gt's best anchor
    matched_idx, labels = match_one(iou, gt_valid, fg, bg, low_quality=True)
    for i in range(len(anchors)):
        if not inside[i]:
            labels[i] = IGNORE
    return labels, matched_idx, inside


def roi_labels_one(candidates, candidate_valid, gt_boxes, gt_classes, gt_valid, fg=0.5, bg_low=0.0):
    """Per candidate of one image: ``category`` ('fg', 'bg', 'ignore'), best IoU, class and matched gt index."""
    any_gt = any(gt_valid)
    out = []
    for c, valid in zip(candidates, candidate_valid):
        best, best_j = 0.0, None
        for j, g in enumerate(gt_boxes):
            if gt_valid[j]:
                v = iou_one(c, g)
                if best_j is None or v > best:
                    best, best_j = v, j
        if not valid:
            category = "ignore"
        elif not any_gt:
            category = "bg"
        elif best >= fg:
            category = "fg"
        elif best >= bg_low:
            category = "bg"
        else:
            category = "ignore"
        cls = int(gt_classes[best_j]) if category == "fg" else 0
        out.append((category, best, cls, best_j))
    return out


def smooth_l1_one(x, beta):
    x = float(x)
    if beta < 1e-5:
        return abs(x)
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta
