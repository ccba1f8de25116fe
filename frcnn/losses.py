"""Losses of the RPN and the ROI head: pure functions returning dicts of named float32 scalars.

Shape shorthand: ``B`` images, ``A`` anchors, ``S`` sampled ROIs per image, ``C`` classes including background
(``frcnn.targets.BACKGROUND = 0``). Labels and targets come from :mod:`frcnn.targets`.

All computations are float32 whatever the dtype of the predictions (mixed precision heads may emit float16).
Every loss is a total over the whole batch divided by a count over the whole batch (not a mean of per-image
means), and every count is guarded with ``max(count, 1)`` so an empty set gives 0, never NaN.
"""

import tensorflow as tf

from frcnn.targets import BACKGROUND, POSITIVE

# Probabilities are clipped to [PROB_EPSILON, 1] before the log of the classification loss.
PROB_EPSILON = 1e-7


def smooth_l1(x, beta):
    """Elementwise smooth-L1 (Huber) loss: ``0.5 * x**2 / beta`` where ``|x| < beta``, else ``|x| - 0.5 * beta``.

    ``beta`` is a Python float; ``beta < 1e-5`` gives plain L1 ``|x|`` (as in Detectron2 / fvcore).
    """
    x = tf.cast(x, tf.float32)
    abs_x = tf.abs(x)
    if beta < 1e-5:
        return abs_x
    return tf.where(abs_x < beta, 0.5 * tf.square(x) / beta, abs_x - 0.5 * beta)


def _count(mask):
    return tf.maximum(tf.reduce_sum(tf.cast(mask, tf.float32)), 1.0)


def rpn_losses(rpn_logits, rpn_deltas, labels, box_targets, beta=1.0 / 9.0):
    """RPN objectness and box losses.

    Args:
      rpn_logits: ``(B, A)`` objectness logits.
      rpn_deltas: ``(B, A, 4)`` predicted anchor deltas.
      labels: ``(B, A)`` sampled labels from :func:`frcnn.targets.rpn_targets` (1 fg, 0 bg, -1 ignore).
      box_targets: ``(B, A, 4)``.
      beta: smooth-L1 beta (0 -> L1).

    Returns:
      ``{"rpn_cls", "rpn_box"}``. Both are normalised by the number of sampled anchors of the whole batch
      (``labels >= 0``), the Detectron2 normalisation (which divides by ``batch_size_per_image * B``: the same
      number when every image fills its sample):

      - ``rpn_cls``: sigmoid binary cross-entropy summed over sampled anchors / #sampled (a mean);
      - ``rpn_box``: smooth-L1 summed over the 4 coordinates of positive anchors / #sampled.
    """
    logits = tf.cast(rpn_logits, tf.float32)
    deltas = tf.cast(rpn_deltas, tf.float32)
    box_targets = tf.cast(box_targets, tf.float32)
    labels = tf.cast(labels, tf.int32)
    sampled = labels >= 0
    positive = labels == POSITIVE
    num_sampled = _count(sampled)

    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(positive, tf.float32), logits=logits)
    rpn_cls = tf.reduce_sum(tf.where(sampled, ce, 0.0)) / num_sampled

    box = tf.reduce_sum(smooth_l1(deltas - box_targets, beta), axis=-1)  # (B, A)
    rpn_box = tf.reduce_sum(tf.where(positive, box, 0.0)) / num_sampled
    return {"rpn_cls": rpn_cls, "rpn_box": rpn_box}


def roi_losses(class_probs, box_deltas, roi_classes, roi_box_targets, roi_valid, beta=1.0):
    """ROI-head classification and class-specific box losses.

    Args:
      class_probs: ``(B, S, C)`` softmax probabilities (the class head ends in a softmax).
      box_deltas: ``(B, S, 4 * (C - 1))``: class ``c`` in ``1..C-1`` uses columns ``4 * (c - 1) : 4 * c``
        (background has no box).
      roi_classes: ``(B, S)`` int, ``BACKGROUND`` for background ROIs.
      roi_box_targets: ``(B, S, 4)``; roi_valid: ``(B, S)`` bool (padding slots are excluded everywhere).
      beta: smooth-L1 beta (0 -> L1).

    Returns:
      ``{"roi_cls", "roi_box"}``, both normalised by the number of valid ROIs of the whole batch:

      - ``roi_cls``: ``-log(clip(p[true class], PROB_EPSILON, 1))`` summed over valid ROIs / #valid (a mean);
      - ``roi_box``: smooth-L1 of the true class's deltas, summed over the 4 coordinates of foreground ROIs /
        #valid ROIs (Detectron2's normalisation: background ROIs count in the denominator).
    """
    probs = tf.cast(class_probs, tf.float32)
    deltas = tf.cast(box_deltas, tf.float32)
    targets = tf.cast(roi_box_targets, tf.float32)
    classes = tf.cast(roi_classes, tf.int32)
    valid = tf.cast(roi_valid, tf.bool)
    num_classes = probs.shape[-1]
    if num_classes is not None and deltas.shape[-1] is not None and deltas.shape[-1] != 4 * (num_classes - 1):
        raise ValueError(
            f"box_deltas has {deltas.shape[-1]} columns; expected 4 * (C - 1) = {4 * (num_classes - 1)} for "
            f"C = {num_classes} classes including background"
        )
    num_valid = _count(valid)

    true_prob = tf.gather(probs, classes, batch_dims=2)  # (B, S)
    ce = -tf.math.log(tf.clip_by_value(true_prob, PROB_EPSILON, 1.0))
    roi_cls = tf.reduce_sum(tf.where(valid, ce, 0.0)) / num_valid

    foreground = valid & (classes != BACKGROUND)
    per_class = tf.reshape(deltas, tf.concat([tf.shape(deltas)[:2], [-1, 4]], axis=0))  # (B, S, C - 1, 4)
    column = tf.maximum(classes - 1, 0)  # background rows pick class 1's deltas, then are masked out
    class_deltas = tf.gather(per_class, column, batch_dims=2)  # (B, S, 4)
    box = tf.reduce_sum(smooth_l1(class_deltas - targets, beta), axis=-1)  # (B, S)
    roi_box = tf.reduce_sum(tf.where(foreground, box, 0.0)) / num_valid
    return {"roi_cls": roi_cls, "roi_box": roi_box}
