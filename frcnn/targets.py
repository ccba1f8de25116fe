"""Training targets: matching, balanced sampling, RPN anchor targets and ROI sampling.

Everything here is vectorised TensorFlow over a batch with static shapes and validity masks: no Python loop over
anchors or ROIs, no NumPy, so it runs inside a Keras ``train_step`` graph, under ``tf.distribute`` and XLA.

Shape shorthand
---------------
- ``B``: images per batch
- ``A``: anchors of the whole feature map (``H * W * k``, order of :mod:`frcnn.anchors`)
- ``G``: ground-truth slots per image (``input.max_gt``), valid ones flagged by ``gt_valid (B, G)``
- ``R``: proposals per image, valid ones flagged by ``proposal_valid (B, R)``
- ``S``: ROIs sampled per image (``model.num_rois``)
- ``N``, ``M``: the two sides of a match: ``N`` candidates (anchors, proposals) against ``M`` ground-truth boxes

Naming: ``gt_`` ground truth, ``proposal_`` RPN proposals, ``roi_`` sampled ROIs; ``_boxes`` are
``(x1, y1, x2, y2)`` pixels (:mod:`frcnn.boxes`), ``_box_targets`` are encoded deltas, ``_valid`` bool masks.

Labels
------
A match labels every candidate ``POSITIVE`` (1, foreground), ``NEGATIVE`` (0, background) or ``IGNORE`` (-1, neither
trained nor sampled). Class ids use ``BACKGROUND = 0`` for the background class, the one background index of the
project (ground-truth classes are ``1..C-1``).

Randomness
----------
Sampling draws uniform keys. With ``seed=None`` the global TensorFlow generator is used (``tf.random.uniform``);
with a ``(2,)`` integer seed (e.g. ``keras.random.SeedGenerator().next()``) the stateless op is used, so a seed
that changes every step gives reproducible training. Both work in ``tf.function`` and XLA (where the stateful op
ignores the global seed, so only a stateless seed makes XLA runs repeatable).
"""

import tensorflow as tf

from frcnn import boxes as box_ops

# The background class id: targets, losses, decoders and evaluation all use this one constant.
BACKGROUND = 0

# Labels of a match / sample.
POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


# ------------------------------------------------------------------------------------------------------ matching


def _match(iou, gt_valid, fg_thresh, bg_thresh, allow_low_quality_matches):
    """:func:`match`, also returning ``matched_iou (B, N)``: the best IoU with a valid gt (0 when there is none)."""
    iou = tf.cast(iou, tf.float32)
    gt_valid = tf.cast(gt_valid, tf.bool)
    # Padded gt columns get IoU -1: below any real IoU, so argmax never picks them while a valid gt exists.
    masked = tf.where(gt_valid[:, None, :], iou, -1.0)  # (B, N, M)
    matched_idx = tf.argmax(masked, axis=-1, output_type=tf.int32)  # (B, N)
    # An image with no valid gt gives -1 here; clamp so "no gt" reads as IoU 0 (background).
    matched_iou = tf.maximum(tf.reduce_max(masked, axis=-1), 0.0)  # (B, N)

    labels = tf.where(
        matched_iou >= fg_thresh,
        POSITIVE,
        tf.where(matched_iou < bg_thresh, NEGATIVE, IGNORE),
    )
    if allow_low_quality_matches:
        # Faster R-CNN's RPN rule: for each gt, the candidate(s) with the highest IoU are positive even below
        # fg_thresh, so every gt gets at least one positive. Ties count (all candidates reaching the max), a gt
        # whose best IoU is 0 gets none. As in torchvision's Matcher, only the label changes: matched_idx stays
        # the candidate's own best gt.
        gt_best = tf.reduce_max(masked, axis=1)  # (B, M); -1 for padded columns
        is_best = (masked == gt_best[:, None, :]) & (gt_best[:, None, :] > 0.0)  # (B, N, M)
        labels = tf.where(tf.reduce_any(is_best, axis=-1), POSITIVE, labels)
    return matched_idx, tf.cast(labels, tf.int32), matched_iou


def match(iou, gt_valid, fg_thresh, bg_thresh, allow_low_quality_matches=False):
    """Match ``N`` candidates to ``M`` ground-truth boxes by IoU (the torchvision ``Matcher`` idea).

    Args:
      iou: ``(B, N, M)`` IoU of every candidate with every gt slot.
      gt_valid: ``(B, M)`` bool; padded gt columns never match.
      fg_thresh: IoU ``>= fg_thresh`` -> ``POSITIVE``.
      bg_thresh: IoU ``< bg_thresh`` -> ``NEGATIVE``; in between -> ``IGNORE``. A candidate of an image without
        valid gt has IoU 0.
      allow_low_quality_matches: also make positive every candidate that reaches a gt's highest IoU (ties
        included, highest IoU > 0): the RPN rule "the best anchor of each gt is positive".

    Returns:
      ``matched_idx (B, N) int32``: index of the best valid gt of each candidate (meaningful where the label is
      positive), and ``labels (B, N) int32`` in ``{POSITIVE, NEGATIVE, IGNORE}``.
    """
    matched_idx, labels, _ = _match(iou, gt_valid, fg_thresh, bg_thresh, allow_low_quality_matches)
    return matched_idx, labels


# ------------------------------------------------------------------------------------------------------ sampling


def _uniform_keys(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    if isinstance(seed, int):
        seed = (seed, 0)
    return tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64), dtype=tf.float32)


def _take_random(mask, count, keys, max_count):
    """Pick ``count[b]`` members of ``mask[b]`` with the largest random ``keys``: a ``(B, N)`` bool mask.

    ``count <= min(max_count, mask.sum(-1))`` per image. Ranking by random keys with ``top_k`` gives a uniformly
    random subset of exactly ``count`` elements (top_k breaks ties by index, so the count is exact).
    """
    n = mask.shape[-1]
    k = min(max_count, n) if n is not None else tf.minimum(max_count, tf.shape(mask)[-1])
    if isinstance(k, int) and k == 0:
        return tf.zeros_like(mask)
    scores = tf.where(mask, keys, -1.0)  # keys are in [0, 1): non-members rank last
    _, idx = tf.math.top_k(scores, k=k)  # (B, k)
    take = tf.range(tf.shape(idx)[1])[None, :] < count[:, None]  # (B, k)
    batch_idx = tf.broadcast_to(tf.range(tf.shape(idx)[0])[:, None], tf.shape(idx))
    chosen = tf.scatter_nd(tf.stack([batch_idx, idx], axis=-1), tf.cast(take, tf.int32), tf.shape(mask))
    return chosen > 0


def sample_balanced(labels, candidate_mask, num_samples, positive_fraction, seed=None):
    """Sample positives and negatives per image (the torchvision ``BalancedPositiveNegativeSampler`` rule).

    Per image: ``min(#positives, int(num_samples * positive_fraction))`` positives chosen uniformly at random among
    the positive candidates, then negatives uniformly at random up to ``num_samples`` in total (fewer if there are
    not enough). Only elements with ``candidate_mask`` are ever sampled; ``IGNORE`` labels never are.

    Args:
      labels: ``(B, N)`` int labels in ``{POSITIVE, NEGATIVE, IGNORE}``.
      candidate_mask: ``(B, N)`` bool.
      num_samples, positive_fraction: Python numbers.
      seed: ``None`` (global generator) or a ``(2,)`` int seed for stateless sampling (see module docstring).

    Returns:
      ``pos_mask, neg_mask``: ``(B, N)`` bool, disjoint.
    """
    labels = tf.cast(labels, tf.int32)
    candidate_mask = tf.cast(candidate_mask, tf.bool)
    positive = (labels == POSITIVE) & candidate_mask
    negative = (labels == NEGATIVE) & candidate_mask
    max_positive = int(num_samples * positive_fraction)
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=-1), max_positive)  # (B,)
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=-1), num_samples - num_pos)  # (B,)
    # One set of keys serves both draws: positives and negatives are disjoint, so each draw is still uniform.
    keys = _uniform_keys(tf.shape(labels), seed)
    pos_mask = _take_random(positive, num_pos, keys, max_positive)
    neg_mask = _take_random(negative, num_neg, keys, num_samples)
    return pos_mask, neg_mask


# --------------------------------------------------------------------------------------------------- RPN targets


def rpn_targets(
    anchors,
    gt_boxes,
    gt_valid,
    image_sizes,
    fg_iou=0.7,
    bg_iou=0.3,
    batch_size_per_image=256,
    positive_fraction=0.5,
    box_weights=(1.0, 1.0, 1.0, 1.0),
    seed=None,
):
    """Sampled objectness labels and box-regression targets of every anchor.

    Anchors whose centre lies outside the image's true size (in the zero padding of the batch) are ``IGNORE`` and
    never sampled; they also take no part in the "best anchor per gt" rule. An image without valid gt has all its
    in-image anchors as negative candidates.

    Args:
      anchors: ``(A, 4)`` (shared by the batch).
      gt_boxes: ``(B, G, 4)``; gt_valid: ``(B, G)`` bool.
      image_sizes: ``(B, 2)`` int32 true ``(height, width)``.
      fg_iou, bg_iou: match thresholds (low-quality matches allowed).
      batch_size_per_image, positive_fraction: :func:`sample_balanced` arguments.
      box_weights: :func:`frcnn.boxes.encode` weights.
      seed: see :func:`sample_balanced`.

    Returns:
      ``labels (B, A) int32`` in ``{POSITIVE, NEGATIVE, IGNORE}`` after sampling (unsampled anchors are
      ``IGNORE``), and ``box_targets (B, A, 4)`` float32: encoded matched gt for positives, zeros elsewhere. Both
      are stop-gradient'ed.
    """
    anchors = tf.cast(anchors, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = tf.cast(gt_valid, tf.bool)
    image_sizes = tf.cast(image_sizes, tf.float32)

    cx = 0.5 * (anchors[:, 0] + anchors[:, 2])  # (A,)
    cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
    height = image_sizes[:, 0:1]  # (B, 1)
    width = image_sizes[:, 1:2]
    inside = (cx >= 0.0) & (cx < width) & (cy >= 0.0) & (cy < height)  # (B, A)

    iou = box_ops.pairwise_iou(anchors[None], gt_boxes)  # (B, A, G)
    # Anchors in the padding get IoU -1 so they cannot be anyone's best anchor; they are ignored below.
    iou = tf.where(inside[:, :, None], iou, -1.0)
    matched_idx, labels = match(iou, gt_valid, fg_iou, bg_iou, allow_low_quality_matches=True)
    labels = tf.where(inside, labels, IGNORE)

    pos_mask, neg_mask = sample_balanced(labels, inside, batch_size_per_image, positive_fraction, seed=seed)
    labels = tf.where(pos_mask, POSITIVE, tf.where(neg_mask, NEGATIVE, IGNORE))

    matched_gt = tf.gather(gt_boxes, matched_idx, batch_dims=1)  # (B, A, 4)
    anchors_b = tf.broadcast_to(anchors[None], tf.shape(matched_gt))  # (B, A, 4)
    # Non-positive anchors "match" themselves: their deltas are exactly 0 and no log(0) of a padded gt appears.
    matched_gt = tf.where(pos_mask[:, :, None], matched_gt, anchors_b)
    box_targets = box_ops.encode(anchors_b, matched_gt, box_weights)
    return tf.stop_gradient(tf.cast(labels, tf.int32)), tf.stop_gradient(box_targets)


# -------------------------------------------------------------------------------------------------- ROI sampling


def sample_rois(
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    gt_valid,
    num_rois,
    positive_fraction=0.25,
    fg_iou=0.5,
    bg_iou_low=0.0,
    box_weights=(10.0, 10.0, 5.0, 5.0),
    seed=None,
):
    """Sample ``S = num_rois`` ROIs per image for the box head, with class labels and box targets.

    Foreground: IoU ``>= fg_iou`` with a valid gt; background: ``bg_iou_low <= IoU < fg_iou`` (in an image without
    valid gt every valid proposal is background). At most ``int(S * positive_fraction)`` foreground ROIs, the rest
    background; when there are fewer candidates than ``S`` the remaining slots are padding with
    ``roi_valid = False`` (zero boxes, class 0, zero targets). Foreground ROIs come first in the output.

    Args:
      proposals: ``(B, R, 4)``; proposal_valid: ``(B, R)`` bool.
      gt_boxes: ``(B, G, 4)``; gt_classes: ``(B, G)`` int in ``1..C-1``; gt_valid: ``(B, G)`` bool.
      num_rois: ``S``, a Python int.
      box_weights: :func:`frcnn.boxes.encode` weights.
      seed: see :func:`sample_balanced`.

    Returns:
      ``rois (B, S, 4)``, ``roi_classes (B, S) int32`` (``BACKGROUND`` for background and padding),
      ``roi_box_targets (B, S, 4)`` (encode(roi, matched gt) for foreground, zeros otherwise), ``roi_valid (B, S)``
      bool; all stop-gradient'ed (the ROI head must not push gradients into the proposal boxes).
    """
    proposals = tf.cast(proposals, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    gt_valid = tf.cast(gt_valid, tf.bool)

    # Append the ground truth to the proposals: early in training the RPN proposes almost nothing with IoU >= 0.5,
    # and the gt boxes guarantee the box head sees foreground examples (with perfect boxes) from the first step.
    candidates = tf.concat([proposals, gt_boxes], axis=1)  # (B, R + G, 4)
    candidate_valid = tf.concat([tf.cast(proposal_valid, tf.bool), gt_valid], axis=1)  # (B, R + G)

    iou = box_ops.pairwise_iou(candidates, gt_boxes)  # (B, R + G, G)
    matched_idx, labels, matched_iou = _match(iou, gt_valid, fg_iou, fg_iou, allow_low_quality_matches=False)
    has_gt = tf.reduce_any(gt_valid, axis=-1, keepdims=True)  # (B, 1)
    too_low = (labels == NEGATIVE) & (matched_iou < bg_iou_low) & has_gt
    labels = tf.where(too_low, IGNORE, labels)

    pos_mask, neg_mask = sample_balanced(labels, candidate_valid, num_rois, positive_fraction, seed=seed)

    # Gather the sampled candidates into S slots: top_k on (2 = fg, 1 = bg, 0 = not sampled) puts foreground first;
    # at most S are sampled, so all of them fit.
    rank_key = tf.cast(pos_mask, tf.float32) * 2.0 + tf.cast(neg_mask, tf.float32)  # (B, R + G)
    total = candidates.shape[1]
    k = min(num_rois, total) if total is not None else tf.minimum(num_rois, tf.shape(candidates)[1])
    key, order = tf.math.top_k(rank_key, k=k)  # (B, k)
    pad = num_rois - tf.shape(order)[1]
    order = tf.pad(order, [[0, 0], [0, pad]])
    key = tf.pad(key, [[0, 0], [0, pad]])
    roi_valid = key > 0.0  # (B, S)
    roi_fg = key > 1.5

    rois = tf.gather(candidates, order, batch_dims=1)  # (B, S, 4)
    rois = tf.where(roi_valid[:, :, None], rois, 0.0)
    roi_gt_idx = tf.gather(matched_idx, order, batch_dims=1)  # (B, S)
    roi_classes = tf.where(roi_fg, tf.gather(gt_classes, roi_gt_idx, batch_dims=1), BACKGROUND)
    roi_gt_boxes = tf.gather(gt_boxes, roi_gt_idx, batch_dims=1)  # (B, S, 4)
    # Non-foreground ROIs "match" a unit box with themselves as reference: zero deltas, no division by a zero box.
    unit = tf.constant([0.0, 0.0, 1.0, 1.0])
    reference = tf.where(roi_fg[:, :, None], rois, unit)
    target = tf.where(roi_fg[:, :, None], roi_gt_boxes, unit)
    roi_box_targets = box_ops.encode(reference, target, box_weights)

    rois = tf.ensure_shape(rois, [None, num_rois, 4])
    roi_classes = tf.ensure_shape(tf.cast(roi_classes, tf.int32), [None, num_rois])
    roi_box_targets = tf.ensure_shape(roi_box_targets, [None, num_rois, 4])
    roi_valid = tf.ensure_shape(roi_valid, [None, num_rois])
    return (
        tf.stop_gradient(rois),
        tf.stop_gradient(roi_classes),
        tf.stop_gradient(roi_box_targets),
        tf.stop_gradient(roi_valid),
    )
