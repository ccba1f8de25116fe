"""Training targets: matching, balanced sampling, RPN anchor targets and ROI sampling.

Everything here is vectorised ``keras.ops`` over a batch with static shapes and validity masks: no Python loop over
anchors or ROIs, no NumPy, so it runs inside the model's forward pass on every Keras backend, under
``tf.distribute`` and XLA.

Shape shorthand
---------------
- ``B``: images per batch
- ``A``: anchors of the whole feature map (``H * W * k``, order of :mod:`frcnn.anchors`)
- ``G``: ground-truth slots per image (``input.max_gt``), valid ones flagged by ``gt_valid (B, G)``
- ``R``: proposals per image, valid ones flagged by ``proposal_valid (B, R)``
- ``S``: ROIs sampled per image (``roi_heads.num_rois``)
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
Sampling draws uniform keys with ``keras.random.uniform(seed=seed)``: ``seed`` is a ``keras.random.SeedGenerator``
(the model's parts own one, so training is reproducible and works inside JAX's traced steps), an int, or ``None``
(Keras' global generator; eager TensorFlow only).
"""

import keras
from keras import ops

from frcnn import boxes as box_ops
from frcnn.ops import gather_rows

# The background class id: targets, losses, decoders and evaluation all use this one constant.
BACKGROUND = 0

# Labels of a match / sample.
POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


# ------------------------------------------------------------------------------------------------------ matching


def _match(iou, gt_valid, fg_thresh, bg_thresh, allow_low_quality_matches):
    """:func:`match`, also returning ``matched_iou (B, N)``: the best IoU with a valid gt (0 when there is none)."""
    iou = ops.cast(iou, "float32")
    gt_valid = ops.cast(gt_valid, "bool")
    # Padded gt columns get IoU -1: below any real IoU, so argmax never picks them while a valid gt exists.
    masked = ops.where(gt_valid[:, None, :], iou, -1.0)  # (B, N, M)
    matched_idx = ops.cast(ops.argmax(masked, axis=-1), "int32")  # (B, N)
    # An image with no valid gt gives -1 here; clamp so "no gt" reads as IoU 0 (background).
    matched_iou = ops.maximum(ops.max(masked, axis=-1), 0.0)  # (B, N)

    labels = ops.where(
        matched_iou >= fg_thresh,
        POSITIVE,
        ops.where(matched_iou < bg_thresh, NEGATIVE, IGNORE),
    )
    if allow_low_quality_matches:
        # Faster R-CNN's RPN rule: for each gt, the candidate(s) with the highest IoU are positive even below
        # fg_thresh, so every gt gets at least one positive. Ties count (all candidates reaching the max), a gt
        # whose best IoU is 0 gets none. As in torchvision's Matcher, only the label changes: matched_idx stays
        # the candidate's own best gt.
        gt_best = ops.max(masked, axis=1)  # (B, M); -1 for padded columns
        is_best = ops.logical_and(ops.equal(masked, gt_best[:, None, :]), gt_best[:, None, :] > 0.0)  # (B, N, M)
        labels = ops.where(ops.any(is_best, axis=-1), POSITIVE, labels)
    return matched_idx, ops.cast(labels, "int32"), matched_iou


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
    """The random keys that rank candidates for sampling: uniform in ``[0, 1)``, one per candidate."""
    return keras.random.uniform(shape, seed=seed)


def _take_random(mask, count, keys, max_count):
    """Pick ``count[b]`` members of ``mask[b]`` with the largest random ``keys``: a ``(B, N)`` bool mask.

    ``count <= min(max_count, mask.sum(-1))`` per image. Ranking by random keys with ``top_k`` gives a uniformly
    random subset of exactly ``count`` elements (top_k breaks ties by index, so the count is exact).
    """
    n = ops.shape(mask)[-1]
    k = min(max_count, n) if isinstance(n, int) else ops.minimum(max_count, n)
    if isinstance(k, int) and k == 0:
        return ops.zeros_like(mask)
    scores = ops.where(mask, keys, -1.0)  # keys are in [0, 1): non-members rank last
    _, idx = ops.top_k(scores, k=k)  # (B, k)
    take = ops.arange(ops.shape(idx)[1])[None, :] < count[:, None]  # (B, k)
    batch_idx = ops.broadcast_to(ops.arange(ops.shape(idx)[0])[:, None], ops.shape(idx))
    positions = ops.reshape(ops.stack([batch_idx, ops.cast(idx, batch_idx.dtype)], axis=-1), (-1, 2))
    chosen = ops.scatter(positions, ops.reshape(ops.cast(take, "int32"), (-1,)), ops.shape(mask))
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
      seed: a ``keras.random.SeedGenerator``, an int or ``None`` (see the module docstring).

    Returns:
      ``pos_mask, neg_mask``: ``(B, N)`` bool, disjoint.
    """
    labels = ops.cast(labels, "int32")
    candidate_mask = ops.cast(candidate_mask, "bool")
    positive = ops.logical_and(ops.equal(labels, POSITIVE), candidate_mask)
    negative = ops.logical_and(ops.equal(labels, NEGATIVE), candidate_mask)
    max_positive = int(num_samples * positive_fraction)
    num_pos = ops.minimum(ops.sum(ops.cast(positive, "int32"), axis=-1), max_positive)  # (B,)
    num_neg = ops.minimum(ops.sum(ops.cast(negative, "int32"), axis=-1), num_samples - num_pos)  # (B,)
    # One set of keys serves both draws: positives and negatives are disjoint, so each draw is still uniform.
    keys = _uniform_keys(ops.shape(labels), seed)
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
    box_coder=None,
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
      box_coder: the RPN's :class:`frcnn.boxes.BoxCoder` (default: weights ``(1, 1, 1, 1)``).
      seed: see :func:`sample_balanced`.

    Returns:
      ``labels (B, A) int32`` in ``{POSITIVE, NEGATIVE, IGNORE}`` after sampling (unsampled anchors are
      ``IGNORE``), and ``box_targets (B, A, 4)`` float32: encoded matched gt for positives, zeros elsewhere. Both
      are stop-gradient'ed.
    """
    anchors = ops.cast(anchors, "float32")
    gt_boxes = ops.cast(gt_boxes, "float32")
    gt_valid = ops.cast(gt_valid, "bool")
    image_sizes = ops.cast(image_sizes, "float32")

    cx = 0.5 * (anchors[:, 0] + anchors[:, 2])  # (A,)
    cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
    height = image_sizes[:, 0:1]  # (B, 1)
    width = image_sizes[:, 1:2]
    inside = ops.logical_and(ops.logical_and(cx >= 0.0, cx < width), ops.logical_and(cy >= 0.0, cy < height))

    iou = box_ops.pairwise_iou(anchors[None], gt_boxes)  # (B, A, G)
    # Anchors in the padding get IoU -1 so they cannot be anyone's best anchor; they are ignored below.
    iou = ops.where(inside[:, :, None], iou, -1.0)
    matched_idx, labels = match(iou, gt_valid, fg_iou, bg_iou, allow_low_quality_matches=True)
    labels = ops.where(inside, labels, IGNORE)

    pos_mask, neg_mask = sample_balanced(labels, inside, batch_size_per_image, positive_fraction, seed=seed)
    labels = ops.where(pos_mask, POSITIVE, ops.where(neg_mask, NEGATIVE, IGNORE))

    matched_gt = gather_rows(gt_boxes, matched_idx)  # (B, A, 4)
    anchors_b = ops.broadcast_to(anchors[None], ops.shape(matched_gt))  # (B, A, 4)
    # Non-positive anchors "match" themselves: their deltas are exactly 0 and no log(0) of a padded gt appears.
    matched_gt = ops.where(pos_mask[:, :, None], matched_gt, anchors_b)
    box_targets = (box_coder or box_ops.BoxCoder()).encode(anchors_b, matched_gt)
    return ops.stop_gradient(ops.cast(labels, "int32")), ops.stop_gradient(box_targets)


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
    box_coder=None,
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
      box_coder: the ROI heads' :class:`frcnn.boxes.BoxCoder` (default: weights ``(10, 10, 5, 5)``).
      seed: see :func:`sample_balanced`.

    Returns:
      ``rois (B, S, 4)``, ``roi_classes (B, S) int32`` (``BACKGROUND`` for background and padding),
      ``roi_box_targets (B, S, 4)`` (encode(roi, matched gt) for foreground, zeros otherwise), ``roi_valid (B, S)``
      bool; all stop-gradient'ed (the ROI head must not push gradients into the proposal boxes).
    """
    proposals = ops.cast(proposals, "float32")
    gt_boxes = ops.cast(gt_boxes, "float32")
    gt_classes = ops.cast(gt_classes, "int32")
    gt_valid = ops.cast(gt_valid, "bool")

    # Append the ground truth to the proposals: early in training the RPN proposes almost nothing with IoU >= 0.5,
    # and the gt boxes guarantee the box head sees foreground examples (with perfect boxes) from the first step.
    candidates = ops.concatenate([proposals, gt_boxes], axis=1)  # (B, R + G, 4)
    candidate_valid = ops.concatenate([ops.cast(proposal_valid, "bool"), gt_valid], axis=1)  # (B, R + G)

    iou = box_ops.pairwise_iou(candidates, gt_boxes)  # (B, R + G, G)
    matched_idx, labels, matched_iou = _match(iou, gt_valid, fg_iou, fg_iou, allow_low_quality_matches=False)
    has_gt = ops.any(gt_valid, axis=-1, keepdims=True)  # (B, 1)
    too_low = ops.logical_and(ops.logical_and(ops.equal(labels, NEGATIVE), matched_iou < bg_iou_low), has_gt)
    labels = ops.where(too_low, IGNORE, labels)

    pos_mask, neg_mask = sample_balanced(labels, candidate_valid, num_rois, positive_fraction, seed=seed)

    # Gather the sampled candidates into S slots: top_k on (2 = fg, 1 = bg, 0 = not sampled) puts foreground first;
    # at most S are sampled, so all of them fit. R + G is static (the proposal count and input.max_gt).
    rank_key = ops.cast(pos_mask, "float32") * 2.0 + ops.cast(neg_mask, "float32")  # (B, R + G)
    total = candidates.shape[1]
    k = min(num_rois, total)
    key, order = ops.top_k(rank_key, k=k)  # (B, k)
    if k < num_rois:
        order = ops.pad(order, ((0, 0), (0, num_rois - k)))
        key = ops.pad(key, ((0, 0), (0, num_rois - k)))
    roi_valid = key > 0.0  # (B, S)
    roi_fg = key > 1.5

    rois = gather_rows(candidates, order)  # (B, S, 4)
    rois = ops.where(roi_valid[:, :, None], rois, 0.0)
    roi_gt_idx = gather_rows(matched_idx, order)  # (B, S)
    roi_classes = ops.where(roi_fg, gather_rows(gt_classes, roi_gt_idx), BACKGROUND)
    roi_gt_boxes = gather_rows(gt_boxes, roi_gt_idx)  # (B, S, 4)
    # Non-foreground ROIs "match" a unit box with themselves as reference: zero deltas, no division by a zero box.
    unit = ops.convert_to_tensor([0.0, 0.0, 1.0, 1.0])
    reference = ops.where(roi_fg[:, :, None], rois, unit)
    target = ops.where(roi_fg[:, :, None], roi_gt_boxes, unit)
    roi_box_targets = (box_coder or box_ops.BoxCoder((10.0, 10.0, 5.0, 5.0))).encode(reference, target)
    return (
        ops.stop_gradient(rois),
        ops.stop_gradient(ops.cast(roi_classes, "int32")),
        ops.stop_gradient(roi_box_targets),
        ops.stop_gradient(roi_valid),
    )
