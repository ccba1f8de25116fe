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
``dh = wh * log(gh / ah)`` with centres ``(gx, gy)``, ``(ax, ay)``. The weights ``(wx, wy, ww, wh)`` are config values
(``rpn.box_weights``, ``roi_heads.box_weights``) held by one :class:`BoxCoder` per part.

Also :func:`pairwise_iou_numpy`, the same IoU in NumPy for code that runs outside the model (evaluation, data
generation).

Owns: the box convention and box coding. Imports nothing from ``frcnn``.
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


def pairwise_iou_numpy(boxes_a, boxes_b):
    """:func:`pairwise_iou` in NumPy (float64) for ``(N, 4)`` and ``(M, 4)`` arrays: ``(N, M)``."""
    import numpy as np

    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _centre_size(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


class BoxCoder:
    """The R-CNN box parametrisation with fixed weights ``(wx, wy, ww, wh)``: one object, made once by the part
    that owns the weights (the RPN with ``(1, 1, 1, 1)``, the ROI heads with ``(10, 10, 5, 5)``) and handed to
    whatever encodes or decodes for it (its targets, its proposal or detection decoder), as torchvision's
    ``BoxCoder`` and Detectron2's ``Box2BoxTransform``.

    ``scale_clamp``: the largest ``dw`` / ``dh`` (after dividing by the weights) applied when decoding, so that a
    wild prediction gives a huge box, not ``inf``.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), scale_clamp=BBOX_XFORM_CLIP):
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"box coder weights must be four positive numbers, got {list(weights)}")
        self.weights = weights
        self.scale_clamp = float(scale_clamp)

    @classmethod
    def of(cls, value):
        """A :class:`BoxCoder` from itself, its :meth:`get_config` dict or four weights."""
        if isinstance(value, BoxCoder):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(value)

    def encode(self, reference_boxes, target_boxes):
        """Deltas that turn ``reference_boxes`` (anchors or proposals) into ``target_boxes``; both ``(..., 4)``.

        Reference boxes must have positive width and height; target boxes too (callers only encode matched ground
        truth, and the data readers drop empty boxes).
        """
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = _centre_size(_f32(reference_boxes))
        gx, gy, gw, gh = _centre_size(_f32(target_boxes))
        return ops.stack(
            [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * ops.log(gw / aw), wh * ops.log(gh / ah)],
            axis=-1,
        )

    def decode(self, deltas, reference_boxes):
        """Inverse of :meth:`encode`: apply ``(..., 4)`` deltas to ``(..., 4)`` reference boxes, in float32 whatever
        the dtype of ``deltas`` (mixed precision keeps box maths in float32)."""
        deltas = _f32(deltas)
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = _centre_size(_f32(reference_boxes))
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = ops.minimum(deltas[..., 2] / ww, self.scale_clamp)
        dh = ops.minimum(deltas[..., 3] / wh, self.scale_clamp)
        cx = dx * aw + ax
        cy = dy * ah + ay
        w = ops.exp(dw) * aw
        h = ops.exp(dh) * ah
        return ops.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)

    def get_config(self):
        return {"weights": list(self.weights), "scale_clamp": self.scale_clamp}

    def __eq__(self, other):
        return isinstance(other, BoxCoder) and (self.weights, self.scale_clamp) == (other.weights, other.scale_clamp)

    def __repr__(self):
        return f"BoxCoder(weights={self.weights}, scale_clamp={self.scale_clamp:.4g})"


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
