"""Losses of the RPN and the ROI head: pure functions returning dicts of named float32 scalars.

Shape shorthand: ``B`` images, ``A`` anchors, ``S`` sampled ROIs per image, ``C`` classes including background
(``frcnn.targets.BACKGROUND = 0``). Labels and targets come from :mod:`frcnn.targets`.

All computations are float32 whatever the dtype of the predictions (mixed precision heads may emit float16).
Every loss is a total over the whole batch divided by a number for the whole batch (not a mean of per-image
means), as Detectron2 computes them (``rpn.py`` ``RPN.losses``, ``fast_rcnn.py`` ``FastRCNNOutputLayers.losses``;
tests/test_detectron2_parity.py checks the four against Detectron2's own numbers): the RPN's by
``batch_size_per_image x B``, the ROI head's by the number of sampled ROIs. Every count is guarded with
``max(count, 1)`` so an empty set gives 0, never NaN.
"""

from keras import ops

from frcnn.targets import BACKGROUND, POSITIVE


def smooth_l1(x, beta):
    """Elementwise smooth-L1 (Huber) loss: ``0.5 * x**2 / beta`` where ``|x| < beta``, else ``|x| - 0.5 * beta``.

    ``beta`` is a Python float; ``beta < 1e-5`` gives plain L1 ``|x|`` (as in Detectron2 / fvcore).
    """
    x = ops.cast(x, "float32")
    abs_x = ops.abs(x)
    if beta < 1e-5:
        return abs_x
    return ops.where(abs_x < beta, 0.5 * ops.square(x) / beta, abs_x - 0.5 * beta)


def _count(mask):
    return ops.maximum(ops.sum(ops.cast(mask, "float32")), 1.0)


def sigmoid_cross_entropy(labels, logits):
    """``-z log(sigmoid(x)) - (1 - z) log(1 - sigmoid(x))`` in the overflow-free form ``max(x, 0) - x z +
    log(1 + exp(-|x|))``."""
    return ops.maximum(logits, 0.0) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))


def rpn_losses(rpn_logits, rpn_deltas, labels, box_targets, beta=1.0 / 9.0, batch_size_per_image=None):
    """RPN objectness and box losses.

    Args:
      rpn_logits: ``(B, A)`` objectness logits.
      rpn_deltas: ``(B, A, 4)`` predicted anchor deltas.
      labels: ``(B, A)`` sampled labels from :func:`frcnn.targets.rpn_targets` (1 fg, 0 bg, -1 ignore).
      box_targets: ``(B, A, 4)``.
      beta: smooth-L1 beta (0 -> L1).
      batch_size_per_image: the sampler's anchors per image. Both losses are divided by
        ``batch_size_per_image * B``, as Detectron2 does, also when an image has fewer candidates than that (a small
        image, few negatives): the loss of each sampled anchor weighs the same whatever the rest of the batch
        sampled. ``None``: divide by the number of anchors actually sampled (``labels >= 0``) instead.

    Returns:
      ``{"rpn_cls", "rpn_box"}``:

      - ``rpn_cls``: sigmoid binary cross-entropy summed over sampled anchors / the normaliser;
      - ``rpn_box``: smooth-L1 summed over the 4 coordinates of positive anchors / the same normaliser.
    """
    logits = ops.cast(rpn_logits, "float32")
    deltas = ops.cast(rpn_deltas, "float32")
    box_targets = ops.cast(box_targets, "float32")
    labels = ops.cast(labels, "int32")
    sampled = labels >= 0
    positive = ops.equal(labels, POSITIVE)
    if batch_size_per_image is None:
        num_sampled = _count(sampled)
    else:
        num_sampled = ops.cast(ops.shape(labels)[0] * int(batch_size_per_image), "float32")

    ce = sigmoid_cross_entropy(ops.cast(positive, "float32"), logits)
    rpn_cls = ops.sum(ops.where(sampled, ce, 0.0)) / num_sampled

    box = ops.sum(smooth_l1(deltas - box_targets, beta), axis=-1)  # (B, A)
    rpn_box = ops.sum(ops.where(positive, box, 0.0)) / num_sampled
    return {"rpn_cls": rpn_cls, "rpn_box": rpn_box}


def roi_losses(class_logits, box_deltas, roi_classes, roi_box_targets, roi_valid, beta=1.0):
    """ROI-head classification and class-specific box losses.

    Args:
      class_logits: ``(B, S, C)`` class logits (the class head has no softmax).
      box_deltas: ``(B, S, 4 * (C - 1))``: class ``c`` in ``1..C-1`` uses columns ``4 * (c - 1) : 4 * c``
        (background has no box).
      roi_classes: ``(B, S)`` int, ``BACKGROUND`` for background ROIs.
      roi_box_targets: ``(B, S, 4)``; roi_valid: ``(B, S)`` bool (padding slots are excluded everywhere).
      beta: smooth-L1 beta (0 -> L1).

    Returns:
      ``{"roi_cls", "roi_box"}``, both normalised by the number of valid ROIs of the whole batch:

      - ``roi_cls``: softmax cross-entropy from the logits, ``-log_softmax(logits)[true class]``, summed over valid
        ROIs / #valid (a mean). Nothing is clipped: a confidently wrong ROI costs its full loss and gets its full
        gradient (``softmax - one_hot``), as in Detectron2 (``F.cross_entropy``);
      - ``roi_box``: smooth-L1 of the true class's deltas, summed over the 4 coordinates of foreground ROIs /
        #valid ROIs (Detectron2's normalisation: background ROIs count in the denominator).
    """
    logits = ops.cast(class_logits, "float32")
    deltas = ops.cast(box_deltas, "float32")
    targets = ops.cast(roi_box_targets, "float32")
    classes = ops.cast(roi_classes, "int32")
    valid = ops.cast(roi_valid, "bool")
    num_classes = logits.shape[-1]
    if num_classes is not None and deltas.shape[-1] is not None and deltas.shape[-1] != 4 * (num_classes - 1):
        raise ValueError(
            f"box_deltas has {deltas.shape[-1]} columns; expected 4 * (C - 1) = {4 * (num_classes - 1)} for "
            f"C = {num_classes} classes including background"
        )
    num_valid = _count(valid)

    log_probs = ops.log_softmax(logits, axis=-1)  # (B, S, C), stable for any logits
    ce = -ops.take_along_axis(log_probs, classes[:, :, None], axis=2)[:, :, 0]  # (B, S)
    roi_cls = ops.sum(ops.where(valid, ce, 0.0)) / num_valid

    foreground = ops.logical_and(valid, ops.not_equal(classes, BACKGROUND))
    shape = ops.shape(deltas)
    per_class = ops.reshape(deltas, (shape[0], shape[1], -1, 4))  # (B, S, C - 1, 4)
    column = ops.maximum(classes - 1, 0)  # background rows pick class 1's deltas, then are masked out
    class_deltas = ops.take_along_axis(per_class, column[:, :, None, None], axis=2)[:, :, 0, :]  # (B, S, 4)
    box = ops.sum(smooth_l1(class_deltas - targets, beta), axis=-1)  # (B, S)
    roi_box = ops.sum(ops.where(foreground, box, 0.0)) / num_valid
    return {"roi_cls": roi_cls, "roi_box": roi_box}
