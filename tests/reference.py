"""Slow, obvious NumPy reference implementations, used ONLY as test oracles.

Everything is float64 NumPy, written as literally as possible (per-sample loops for RoIAlign, greedy NMS with an
explicit suppressed list) so that a reader can check it against the papers / Detectron2 by eye. The conventions are
those of the project (see ``frcnn/boxes.py``): boxes ``(x1, y1, x2, y2)`` in continuous pixel coordinates, width
``x2 - x1``; R-CNN deltas with weights ``(wx, wy, ww, wh)``.

Functions
---------
- ``area(boxes)``, ``iou(a, b)``: areas ``(N,)``; pairwise IoU ``(N, M)`` (0 when the union is empty).
- ``encode(reference, target, weights)``, ``decode(deltas, reference, weights)``: R-CNN box deltas.
- ``clip(boxes, height, width)``: clip boxes to an image.
- ``nms(boxes, scores, thresh)``: greedy NMS, returns kept indices, best first.
- ``bilinear(features, y, x)``, ``roi_align(features, boxes, pool, stride, sampling_ratio)``: Detectron2
  ``ROIAlign(aligned=True)`` for one image.
- ``proposals(...)``, ``detections(...)``: the proposal and detection decoders for one image.
- ``group_norm(x, gamma, beta, groups, epsilon)``: group normalisation of a channels-last batch.
"""

import math

import numpy as np

# Same value as frcnn.boxes.BBOX_XFORM_CLIP (restated so the oracle does not import the code it checks).
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def area(boxes):
    """Areas of ``(N, 4)`` boxes; empty / inverted boxes have area 0."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.maximum(boxes[:, 2] - boxes[:, 0], 0.0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)


def iou(a, b):
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes: ``(N, M)``, one pair at a time."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = area(a)
    area_b = area(b)
    out = np.zeros((len(a), len(b)), np.float64)
    for i in range(len(a)):
        for j in range(len(b)):
            iw = max(min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]), 0.0)
            ih = max(min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]), 0.0)
            inter = iw * ih
            union = area_a[i] + area_b[j] - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def encode(reference, target, weights=(1.0, 1.0, 1.0, 1.0)):
    """Deltas ``(N, 4)`` that turn ``reference`` boxes into ``target`` boxes (both ``(N, 4)``)."""
    reference = np.asarray(reference, np.float64).reshape(-1, 4)
    target = np.asarray(target, np.float64).reshape(-1, 4)
    wx, wy, ww, wh = weights
    aw = reference[:, 2] - reference[:, 0]
    ah = reference[:, 3] - reference[:, 1]
    ax = reference[:, 0] + 0.5 * aw
    ay = reference[:, 1] + 0.5 * ah
    gw = target[:, 2] - target[:, 0]
    gh = target[:, 3] - target[:, 1]
    gx = target[:, 0] + 0.5 * gw
    gy = target[:, 1] + 0.5 * gh
    return np.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * np.log(gw / aw), wh * np.log(gh / ah)], axis=1)


def decode(deltas, reference, weights=(1.0, 1.0, 1.0, 1.0)):
    """Apply ``(N, 4)`` deltas to ``(N, 4)`` reference boxes; ``dw``, ``dh`` capped at ``BBOX_XFORM_CLIP``."""
    deltas = np.asarray(deltas, np.float64).reshape(-1, 4)
    reference = np.asarray(reference, np.float64).reshape(-1, 4)
    wx, wy, ww, wh = weights
    aw = reference[:, 2] - reference[:, 0]
    ah = reference[:, 3] - reference[:, 1]
    ax = reference[:, 0] + 0.5 * aw
    ay = reference[:, 1] + 0.5 * ah
    cx = deltas[:, 0] / wx * aw + ax
    cy = deltas[:, 1] / wy * ah + ay
    w = np.exp(np.minimum(deltas[:, 2] / ww, BBOX_XFORM_CLIP)) * aw
    h = np.exp(np.minimum(deltas[:, 3] / wh, BBOX_XFORM_CLIP)) * ah
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)


def clip(boxes, height, width):
    """Clip ``(N, 4)`` boxes to ``[0, width] x [0, height]``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, height)
    return boxes


def nms(boxes, scores, thresh):
    """Greedy NMS. Visit boxes by score descending (ties: lower index first); keep a box unless a kept box has
    IoU > ``thresh`` with it. Returns the kept indices into ``boxes``, best first (int64 array)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[position + 1:]
        if len(rest):
            overlaps = iou(boxes[i:i + 1], boxes[rest])[0]
            suppressed[rest[overlaps > thresh]] = True
    return np.asarray(keep, np.int64)


def bilinear(features, y, x):
    """Detectron2's ``bilinear_interpolate`` on one ``(H, W, C)`` map at feature coordinates ``(y, x)``.

    Outside ``[-1, H] x [-1, W]``: zeros. Otherwise coordinates below 0 become 0, and a point at or beyond the last
    row / column takes that row / column.
    """
    height, width = features.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(features.shape[2], np.float64)
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low = int(y)
    x_low = int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly = y - y_low
    lx = x - x_low
    hy = 1.0 - ly
    hx = 1.0 - lx
    return (
        hy * hx * features[y_low, x_low]
        + hy * lx * features[y_low, x_high]
        + ly * hx * features[y_high, x_low]
        + ly * lx * features[y_high, x_high]
    )


def roi_align(features, boxes, pool, stride, sampling_ratio):
    """RoIAlign of one image, Detectron2 ``ROIAlign(aligned=True)``.

    ``features`` ``(H, W, C)``; ``boxes`` ``(N, 4)`` in image pixels ``(x1, y1, x2, y2)``; returns
    ``(N, pool, pool, C)`` float64. Box in feature coordinates: ``box / stride - 0.5``; ``pool x pool`` equal bins;
    ``sampling_ratio x sampling_ratio`` samples per bin at sub-bin centres; a bin is the mean of its samples.
    """
    features = np.asarray(features, np.float64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.zeros((len(boxes), pool, pool, features.shape[2]), np.float64)
    for n, (x1, y1, x2, y2) in enumerate(boxes):
        start_x = x1 / stride - 0.5
        start_y = y1 / stride - 0.5
        bin_w = (x2 / stride - 0.5 - start_x) / pool
        bin_h = (y2 / stride - 0.5 - start_y) / pool
        for ph in range(pool):
            for pw in range(pool):
                total = np.zeros(features.shape[2], np.float64)
                for iy in range(sampling_ratio):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                    for ix in range(sampling_ratio):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                        total += bilinear(features, y, x)
                out[n, ph, pw] = total / (sampling_ratio * sampling_ratio)
    return out


def proposals(logits, deltas, anchors, image_size, pre_nms_topk, post_nms_topk, nms_thresh, min_size=0.0,
              weights=(1.0, 1.0, 1.0, 1.0)):
    """The RPN proposal decoder for one image.

    ``logits`` ``(A,)``, ``deltas`` ``(A, 4)``, ``anchors`` ``(A, 4)``, ``image_size`` ``(height, width)``.
    Top ``min(pre_nms_topk, A)`` by logit, decode, clip, drop boxes with shorter side < ``min_size`` or empty,
    greedy NMS, keep ``post_nms_topk``. Returns ``(boxes (n, 4), logits (n,))``, best first, ``n <= post_nms_topk``.
    """
    logits = np.asarray(logits, np.float64)
    order = np.argsort(-logits, kind="stable")[:min(pre_nms_topk, len(logits))]
    boxes = decode(np.asarray(deltas)[order], np.asarray(anchors)[order], weights)
    boxes = clip(boxes, image_size[0], image_size[1])
    scores = logits[order]
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    ok = (side >= min_size) & (side > 0)
    boxes, scores = boxes[ok], scores[ok]
    keep = nms(boxes, scores, nms_thresh)[:post_nms_topk]
    return boxes[keep], scores[keep]


def detections(class_probs, box_deltas, proposal_boxes, proposal_valid, image_size, score_thresh, nms_thresh,
               max_detections, weights=(10.0, 10.0, 5.0, 5.0)):
    """The detection decoder for one image.

    ``class_probs`` ``(R, C)`` (column 0 background), ``box_deltas`` ``(R, 4 * (C - 1))``, ``proposal_boxes``
    ``(R, 4)``, ``proposal_valid`` ``(R,)``. For each class 1..C-1: decode, clip, keep valid proposals with
    ``score > score_thresh``, NMS; then the ``max_detections`` best over all classes. Returns ``(boxes (n, 4),
    scores (n,), classes (n,))``, sorted by score descending.
    """
    class_probs = np.asarray(class_probs, np.float64)
    box_deltas = np.asarray(box_deltas, np.float64)
    proposal_valid = np.asarray(proposal_valid, bool)
    num_classes = class_probs.shape[1]
    all_boxes, all_scores, all_classes = [], [], []
    for c in range(1, num_classes):
        boxes = decode(box_deltas[:, 4 * (c - 1):4 * c], proposal_boxes, weights)
        boxes = clip(boxes, image_size[0], image_size[1])
        scores = class_probs[:, c]
        ok = proposal_valid & (scores > score_thresh)
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, nms_thresh)
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_classes.append(np.full(len(keep), c, np.int64))
    boxes = np.concatenate(all_boxes, axis=0).reshape(-1, 4)
    scores = np.concatenate(all_scores)
    classes = np.concatenate(all_classes)
    order = np.argsort(-scores, kind="stable")[:max_detections]
    return boxes[order], scores[order], classes[order]


def group_norm(x, gamma, beta, groups, epsilon=1e-5):
    """Wu & He's group norm of ``(B, H, W, C)``: per sample, each group of ``C / groups`` channels normalised by its
    mean and (biased) variance over ``H``, ``W`` and those channels, then ``* gamma + beta`` per channel."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + epsilon)
    return g.reshape(x.shape) * gamma + beta
