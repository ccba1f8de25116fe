"""Box maths: the one box convention of the project, as small pure tensor functions.

Convention
----------
A box is ``(x1, y1, x2, y2)`` float32 in *input-image pixels*, continuous coordinates: pixel ``i`` covers
``[i, i + 1)``, so a box covering pixels 0..9 inclusive is ``(0, 0, 10, 10)`` and its width is ``x2 - x1`` (no
``+ 1``). Pascal VOC's 1-based inclusive ``(xmin, ymin, xmax, ymax)`` becomes ``(xmin - 1, ymin - 1, xmax, ymax)``
when read. Written with ``keras.ops``: runs on every Keras backend.

Shape shorthand: ``N``, ``M`` box counts; ``...`` any leading batch dimensions. Every function accepts ``(..., 4)``
tensors and broadcasts over the leading dimensions.

Box deltas follow R-CNN: ``dx = wx * (gx - ax) / aw``, ``dy = wy * (gy - ay) / ah``, ``dw = ww * log(gw / aw)``,
``dh = wh * log(gh / ah)`` with centres ``(gx, gy)``, ``(ax, ay)``. The weights ``(wx, wy, ww, wh)`` are config values:
``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for the ROI head.
"""

import math

from keras import ops

# Largest allowed dw / dh when decoding, so that exp() cannot overflow on a bad prediction (Detectron's value).
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def _f32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def area(boxes):
    """Area of ``(..., 4)`` boxes; empty or inverted boxes have area 0. Returns ``(...)``."""
    boxes = _f32(boxes)
    w = ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    h = ops.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return w * h


def pairwise_iou(boxes_a, boxes_b):
    """IoU between every box of ``(..., N, 4)`` and every box of ``(..., M, 4)``: ``(..., N, M)``.

    A pair whose union is empty (two empty boxes, e.g. padding) has IoU 0, never NaN.
    """
    boxes_a = _f32(boxes_a)
    boxes_b = _f32(boxes_b)
    a = boxes_a[..., :, None, :]
    b = boxes_b[..., None, :, :]
    iw = ops.maximum(ops.minimum(a[..., 2], b[..., 2]) - ops.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = ops.maximum(ops.minimum(a[..., 3], b[..., 3]) - ops.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    union = area(boxes_a)[..., :, None] + area(boxes_b)[..., None, :] - inter
    return ops.divide_no_nan(inter, union)


def _centre_size(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(reference_boxes, target_boxes, weights=(1.0, 1.0, 1.0, 1.0)):
    """Deltas that turn ``reference_boxes`` (anchors or proposals) into ``target_boxes``; both ``(..., 4)``.

    Reference boxes must have positive width and height; target boxes too (callers only encode matched ground
    truth, and the data readers drop empty boxes).
    """
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centre_size(_f32(reference_boxes))
    gx, gy, gw, gh = _centre_size(_f32(target_boxes))
    return ops.stack(
        [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * ops.log(gw / aw), wh * ops.log(gh / ah)],
        axis=-1,
    )


def decode(deltas, reference_boxes, weights=(1.0, 1.0, 1.0, 1.0)):
    """Inverse of :func:`encode`: apply ``(..., 4)`` deltas to ``(..., 4)`` reference boxes.

    ``dw`` and ``dh`` are clipped at ``BBOX_XFORM_CLIP`` so a wild prediction gives a huge box, not ``inf``.
    Computed in float32 whatever the dtype of ``deltas`` (mixed precision keeps box maths in float32).
    """
    deltas = _f32(deltas)
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centre_size(_f32(reference_boxes))
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = ops.minimum(deltas[..., 2] / ww, BBOX_XFORM_CLIP)
    dh = ops.minimum(deltas[..., 3] / wh, BBOX_XFORM_CLIP)
    cx = dx * aw + ax
    cy = dy * ah + ay
    w = ops.exp(dw) * aw
    h = ops.exp(dh) * ah
    return ops.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def clip(boxes, image_size):
    """Clip ``(..., 4)`` boxes to an image of ``image_size = (height, width)``.

    ``image_size`` may be a ``(2,)`` tensor or broadcastable ``(..., 2)`` (one size per image of a batch: pass
    ``(B, 1, 2)`` for ``(B, N, 4)`` boxes).
    """
    boxes = _f32(boxes)
    image_size = _f32(image_size)
    h = image_size[..., 0:1]
    w = image_size[..., 1:2]
    x1 = ops.minimum(ops.maximum(boxes[..., 0:1], 0.0), w)
    y1 = ops.minimum(ops.maximum(boxes[..., 1:2], 0.0), h)
    x2 = ops.minimum(ops.maximum(boxes[..., 2:3], 0.0), w)
    y2 = ops.minimum(ops.maximum(boxes[..., 3:4], 0.0), h)
    return ops.concatenate([x1, y1, x2, y2], axis=-1)


def min_side(boxes):
    """The shorter side of each ``(..., 4)`` box: ``(...)``."""
    boxes = _f32(boxes)
    return ops.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
