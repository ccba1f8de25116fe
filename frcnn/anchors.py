"""Anchors: the one definition of anchor shapes, positions and order.

Shape shorthand: ``H, W`` feature-map height and width, ``A`` anchors per location (``len(sizes) *
len(aspect_ratios)``), ``stride`` the feature stride in input pixels (16 for ResNet-50 res4).

Order: anchors are laid out ``(H, W, A)`` and flattened row-major, so anchor ``(y * W + x) * A + a`` sits at feature
cell ``(y, x)``; within a cell, ``a = size_index * len(aspect_ratios) + ratio_index``. The RPN head's outputs
``(B, H, W, A)`` and ``(B, H, W, A * 4)`` reshape to ``(B, H * W * A)`` and ``(B, H * W * A, 4)`` in that same order.

Centres: feature cell ``(y, x)`` covers input pixels ``[x * stride, (x + 1) * stride)``; its anchors are centred at
``((x + offset) * stride, (y + offset) * stride)`` in the continuous pixel coordinates of :mod:`frcnn.boxes`. The
default ``offset = 0.5`` puts them at the cell centres, where RoIAlign's aligned convention puts the feature values;
Detectron2 uses ``offset = 0`` (``model.anchor_offset``), and its trained RPNs expect it.

Aspect ratio is ``height / width``; an anchor of size ``s`` and ratio ``r`` has area ``s**2``:
``w = s / sqrt(r)``, ``h = s * sqrt(r)``.
"""

import numpy as np
from keras import ops


def cell_anchors(sizes, aspect_ratios):
    """The ``(A, 4)`` anchors of one cell, centred at the origin, as a NumPy float32 array."""
    out = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = size / np.sqrt(ratio)
            h = size * np.sqrt(ratio)
            out.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
    return np.asarray(out, dtype=np.float32)


def num_anchors_per_location(sizes, aspect_ratios):
    return len(sizes) * len(aspect_ratios)


def grid_anchors(feature_height, feature_width, stride, sizes, aspect_ratios, offset=0.5):
    """All anchors of an ``H x W`` feature map: ``(H * W * A, 4)`` float32, in the order of the module docstring.

    ``feature_height`` and ``feature_width`` may be Python ints or scalar tensors (dynamic feature sizes).
    """
    base = ops.convert_to_tensor(cell_anchors(sizes, aspect_ratios))  # (A, 4)
    xs = (ops.cast(ops.arange(feature_width), "float32") + offset) * float(stride)
    ys = (ops.cast(ops.arange(feature_height), "float32") + offset) * float(stride)
    cy, cx = ops.meshgrid(ys, xs, indexing="ij")  # (H, W)
    centres = ops.stack([cx, cy, cx, cy], axis=-1)  # (H, W, 4)
    anchors = centres[:, :, None, :] + base[None, None, :, :]  # (H, W, A, 4)
    return ops.reshape(anchors, (-1, 4))
