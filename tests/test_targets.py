"""frcnn.targets against the slow NumPy oracles of tests/reference_targets.py."""

import numpy as np
import pytest
import tensorflow as tf

from frcnn import anchors as anchor_ops
from frcnn import boxes as box_ops
from frcnn import targets
import reference_targets as ref

ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def random_boxes(rng, n, size=128.0, min_side=6.0, max_side=64.0):
    xy = rng.uniform(0.0, size - min_side, (n, 2))
    wh = rng.uniform(min_side, max_side, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def jitter(rng, boxes, scale):
    """Boxes near ``boxes``: every coordinate moved by up to ``scale`` times the box side (sides kept positive)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    noise = rng.uniform(-scale, scale, boxes.shape) * np.stack([w, h, w, h], axis=1)
    out = boxes + noise
    out[:, 2] = np.maximum(out[:, 2], out[:, 0] + 2.0)
    out[:, 3] = np.maximum(out[:, 3], out[:, 1] + 2.0)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- match


def _match_case(seed):
    rng = np.random.default_rng(seed)
    b, m = 3, 5
    gt = np.stack([random_boxes(rng, m) for _ in range(b)])
    gt_valid = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]], bool)
    cands = []
    for i in range(b):
        near = jitter(rng, np.repeat(gt[i], 6, axis=0), 0.25)  # some above 0.7, many in between
        cands.append(np.concatenate([near, random_boxes(rng, 30)]))
    cands = np.stack(cands)
    iou = box_ops.pairwise_iou(cands, gt).numpy()
    return iou, gt_valid


@pytest.mark.parametrize(
    "fg,bg,low_quality", [(0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, False), (0.5, 0.1, True)]
)
def test_match_against_reference(fg, bg, low_quality):
    for seed in range(3):
        iou, gt_valid = _match_case(seed)
        idx, labels = targets.match(iou, gt_valid, fg, bg, allow_low_quality_matches=low_quality)
        assert idx.dtype == tf.int32 and labels.dtype == tf.int32
        for b in range(iou.shape[0]):
            ref_idx, ref_labels = ref.match_one(iou[b], gt_valid[b], fg, bg, low_quality)
            np.testing.assert_array_equal(labels[b].numpy(), ref_labels)
            if gt_valid[b].any():
                np.testing.assert_array_equal(idx[b].numpy(), ref_idx)
                assert gt_valid[b][idx[b].numpy()].all()  # never a padded column
        assert set(np.unique(labels.numpy())) <= {1, 0, -1}


def test_match_low_quality_ties_and_padding():
    iou = np.array(
        [
            [0.40, 0.00, 0.95],
            [0.10, 0.00, 0.95],
            [0.40, 0.00, 0.95],  # ties with row 0 for gt 0's best IoU
            [0.20, 0.00, 0.95],
            [0.75, 0.00, 0.95],
        ],
        np.float32,
    )
    iou[4, 0] = 0.30  # now gt 0's best is 0.4, reached by rows 0 and 2
    gt_valid = np.array([[True, True, False]])  # gt 1 overlaps nothing; column 2 is padding with high IoU
    idx, labels = targets.match(iou[None], gt_valid, 0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(labels[0].numpy(), [1, 0, 1, 0, -1])
    assert (idx[0].numpy() != 2).all()
    _, labels = targets.match(iou[None], gt_valid, 0.7, 0.3, allow_low_quality_matches=False)
    np.testing.assert_array_equal(labels[0].numpy(), [-1, 0, -1, 0, -1])


def test_match_no_gt_is_background():
    iou = np.full((1, 4, 2), 0.9, np.float32)
    _, labels = targets.match(iou, np.zeros((1, 2), bool), 0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(labels.numpy(), np.zeros((1, 4)))


# ------------------------------------------------------------------------------------------------ sample_balanced


def _counts(mask):
    return mask.numpy().sum(axis=-1)


def test_sample_balanced_counts():
    rng = np.random.default_rng(1)
    n = 200
    probs = [(0.4, 0.4, 0.2), (0.02, 0.9, 0.08), (0.6, 0.02, 0.38), (0.0, 0.0, 1.0)]
    labels = np.stack([rng.choice([1, 0, -1], size=n, p=p) for p in probs]).astype(np.int32)
    cand = rng.uniform(size=labels.shape) < 0.8
    for num_samples, fraction in [(32, 0.25), (64, 0.5), (500, 0.5), (7, 1.0)]:
        pos, neg = targets.sample_balanced(labels, cand, num_samples, fraction)
        pos, neg = pos.numpy(), neg.numpy()
        n_pos_cand = ((labels == 1) & cand).sum(-1)
        n_neg_cand = ((labels == 0) & cand).sum(-1)
        expected_pos = np.minimum(n_pos_cand, int(num_samples * fraction))
        np.testing.assert_array_equal(pos.sum(-1), expected_pos)
        np.testing.assert_array_equal(neg.sum(-1), np.minimum(n_neg_cand, num_samples - expected_pos))
        assert not (pos & ~(cand & (labels == 1))).any()
        assert not (neg & ~(cand & (labels == 0))).any()


def test_sample_balanced_covers_all_candidates():
    rng = np.random.default_rng(2)
    n, copies = 24, 300
    labels = rng.choice([1, 0, -1], size=n).astype(np.int32)
    cand = rng.uniform(size=n) < 0.75
    labels_b = np.tile(labels, (copies, 1))
    cand_b = np.tile(cand, (copies, 1))
    pos, neg = targets.sample_balanced(labels_b, cand_b, 6, 0.5)  # 3 of the positives, 3 negatives per row
    ever_pos = pos.numpy().any(axis=0)
    ever_neg = neg.numpy().any(axis=0)
    np.testing.assert_array_equal(ever_pos, cand & (labels == 1))
    np.testing.assert_array_equal(ever_neg, cand & (labels == 0))
    # Roughly uniform: each positive candidate is picked in about 3 / #positives of the rows.
    n_pos = (cand & (labels == 1)).sum()
    if n_pos > 3:
        freq = pos.numpy().mean(axis=0)[cand & (labels == 1)]
        np.testing.assert_allclose(freq, 3.0 / n_pos, atol=0.12)


def test_sample_balanced_stateless_seed_in_tf_function():
    labels = np.tile(np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, -1, 1], np.int32), (2, 1))
    cand = np.ones_like(labels, bool)

    @tf.function
    def run(seed):
        return targets.sample_balanced(labels, cand, 4, 0.5, seed=seed)

    a = run(3)
    b = run(3)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    picks = {tuple(run(s)[0].numpy()[0]) for s in range(20)}
    assert len(picks) > 1
    np.testing.assert_array_equal(_counts(a[0]), [2, 2])
    np.testing.assert_array_equal(_counts(a[1]), [2, 2])


# ---------------------------------------------------------------------------------------------------- rpn_targets


def _rpn_case():
    rng = np.random.default_rng(3)
    anchors = anchor_ops.grid_anchors(8, 8, 16, (32.0, 64.0, 128.0), (0.5, 1.0, 2.0)).numpy()  # (576, 4), 128 px
    image_sizes = np.array([[128, 128], [80, 112], [128, 96]], np.int32)
    g = 4
    gt = np.zeros((3, g, 4), np.float32)
    gt_valid = np.zeros((3, g), bool)
    gt[0, :2] = random_boxes(rng, 2, size=100.0, min_side=20.0, max_side=60.0)
    gt[0, 2] = [4.2, 6.7, 124.9, 121.3]  # a large box: many anchors above 0.7, so the positive cap binds
    gt_valid[0, :3] = True
    gt[1, :2] = [[10.3, 12.7, 50.1, 70.2], [60.5, 8.25, 105.9, 40.6]]
    gt_valid[1, :2] = True
    # Padding slots with real-looking boxes: they must never match.
    gt[0, 3] = [0.0, 0.0, 64.0, 64.0]
    gt[1, 2:] = [[20.0, 20.0, 80.0, 80.0], [0.0, 0.0, 0.0, 0.0]]
    gt[2] = [[0.0, 0.0, 128.0, 128.0]] * g  # image 2 has no valid gt
    return anchors, gt, gt_valid, image_sizes


def test_rpn_targets_against_reference_without_sampling_limits():
    anchors, gt, gt_valid, sizes = _rpn_case()
    a = len(anchors)
    labels, box_targets = targets.rpn_targets(
        anchors, gt, gt_valid, sizes, batch_size_per_image=4 * a, positive_fraction=1.0
    )
    assert labels.shape == (3, a) and labels.dtype == tf.int32
    assert box_targets.shape == (3, a, 4) and box_targets.dtype == tf.float32
    labels, box_targets = labels.numpy(), box_targets.numpy()
    assert np.isfinite(box_targets).all()
    for b in range(3):
        ref_labels, ref_idx, inside = ref.rpn_labels_one(anchors, gt[b], gt_valid[b], sizes[b])
        np.testing.assert_array_equal(labels[b], ref_labels)
        assert (labels[b][~inside] == -1).all()
        for i in range(a):
            if ref_labels[i] == 1:
                expected = ref.encode_one(anchors[i], gt[b, ref_idx[i]], (1, 1, 1, 1))
                np.testing.assert_allclose(box_targets[b, i], expected, rtol=1e-4, atol=1e-4)
            else:
                np.testing.assert_array_equal(box_targets[b, i], 0.0)
    # Every valid gt gets at least one positive anchor (low-quality matches), the no-gt image none.
    assert (labels[0] == 1).sum() >= 3 and (labels[1] == 1).sum() >= 2 and (labels[2] == 1).sum() == 0


def test_rpn_targets_sampling_counts():
    anchors, gt, gt_valid, sizes = _rpn_case()
    for batch_size, fraction in [(256, 0.5), (16, 0.25)]:
        labels, box_targets = targets.rpn_targets(
            anchors, gt, gt_valid, sizes, batch_size_per_image=batch_size, positive_fraction=fraction
        )
        labels, box_targets = labels.numpy(), box_targets.numpy()
        for b in range(3):
            ref_labels, _, inside = ref.rpn_labels_one(anchors, gt[b], gt_valid[b], sizes[b])
            n_pos = min((ref_labels == 1).sum(), int(batch_size * fraction))
            n_neg = min((ref_labels == 0).sum(), batch_size - n_pos)
            assert (labels[b] == 1).sum() == n_pos
            assert (labels[b] == 0).sum() == n_neg
            assert (ref_labels[labels[b] == 1] == 1).all()
            assert (ref_labels[labels[b] == 0] == 0).all()
            assert (labels[b][~inside] == -1).all()
            assert (box_targets[b][labels[b] != 1] == 0).all()
        # The image without gt: only negatives, as many as the sample allows.
        _, _, inside2 = ref.rpn_labels_one(anchors, gt[2], gt_valid[2], sizes[2])
        assert (labels[2] == 1).sum() == 0
        assert (labels[2] == 0).sum() == min(batch_size, inside2.sum())


def test_rpn_targets_xla_static_shapes():
    anchors, gt, gt_valid, sizes = _rpn_case()
    fn = tf.function(targets.rpn_targets, jit_compile=True)
    labels, box_targets = fn(anchors, gt, gt_valid, sizes, seed=5)
    again, _ = fn(anchors, gt, gt_valid, sizes, seed=5)
    np.testing.assert_array_equal(labels.numpy(), again.numpy())
    assert labels.shape == (3, len(anchors))
    assert (labels.numpy() >= 0).sum(-1).max() <= 256


# ---------------------------------------------------------------------------------------------------- sample_rois


def _roi_case(rng, num_proposals=30):
    g = 4
    gt = np.zeros((3, g, 4), np.float32)
    gt_valid = np.zeros((3, g), bool)
    gt_classes = np.zeros((3, g), np.int32)
    gt[0, :3] = random_boxes(rng, 3, size=200.0, min_side=30.0, max_side=80.0)
    gt_valid[0, :3] = True
    gt_classes[0, :3] = [2, 5, 1]
    gt[1, :1] = [[40.5, 30.25, 120.75, 140.5]]
    gt_valid[1, :1] = True
    gt_classes[1, :1] = [3]
    gt[0, 3] = [10.0, 10.0, 90.0, 90.0]  # padding with a real-looking box and class
    gt_classes[0, 3] = 7

    proposals = np.zeros((3, num_proposals, 4), np.float32)
    proposal_valid = np.ones((3, num_proposals), bool)
    near = jitter(rng, np.repeat(gt[0, :3], 4, axis=0), 0.3)[: num_proposals // 2]
    proposals[0] = np.concatenate([near, random_boxes(rng, num_proposals - len(near), size=250.0)])
    num_invalid = min(5, num_proposals // 3)
    proposal_valid[0, -num_invalid:] = False
    proposals[0, -num_invalid:] = [1000.0, 1000.0, 1010.0, 1010.0]  # recognisable if ever (wrongly) sampled
    # Image 1: only three valid proposals, so fewer candidates than S.
    proposals[1, :3] = jitter(rng, np.repeat(gt[1, :1], 3, axis=0), 0.4)
    proposal_valid[1, 3:] = False
    proposals[2] = random_boxes(rng, num_proposals, size=250.0)  # image 2: no gt
    return proposals, proposal_valid, gt, gt_classes, gt_valid


def _check_rois(out, proposals, proposal_valid, gt, gt_classes, gt_valid, num_rois, fraction, bg_low):
    rois, classes, box_targets, valid = (x.numpy() for x in out)
    assert rois.shape == (3, num_rois, 4) and box_targets.shape == (3, num_rois, 4)
    assert classes.shape == valid.shape == (3, num_rois) and classes.dtype == np.int32 and valid.dtype == bool
    assert np.isfinite(box_targets).all()
    for b in range(3):
        cands = np.concatenate([proposals[b], gt[b]])
        cand_valid = np.concatenate([proposal_valid[b], gt_valid[b]])
        info = ref.roi_labels_one(cands, cand_valid, gt[b], gt_classes[b], gt_valid[b], 0.5, bg_low)
        n_fg_cand = sum(c == "fg" for c, *_ in info)
        n_bg_cand = sum(c == "bg" for c, *_ in info)
        n_fg = min(n_fg_cand, int(num_rois * fraction))
        n_bg = min(n_bg_cand, num_rois - n_fg)
        fg = valid[b] & (classes[b] > 0)
        assert fg.sum() == n_fg and (valid[b] & (classes[b] == 0)).sum() == n_bg
        # Foreground first, then background, then padding.
        assert fg[:n_fg].all() and valid[b][: n_fg + n_bg].all() and not valid[b][n_fg + n_bg :].any()
        # Padding slots are zeros.
        assert (rois[b][~valid[b]] == 0).all() and (classes[b][~valid[b]] == 0).all()
        assert (box_targets[b][~valid[b]] == 0).all()
        # No candidate is sampled twice, and every sampled ROI is a valid candidate.
        sampled = rois[b][valid[b]]
        assert len({tuple(r) for r in sampled}) == len(sampled)
        valid_cands = {tuple(c) for c, v in zip(cands, cand_valid) if v}
        assert all(tuple(r) in valid_cands for r in sampled)
        for s in np.nonzero(valid[b])[0]:
            (category, best, cls, j), = ref.roi_labels_one(
                rois[b, s : s + 1], [True], gt[b], gt_classes[b], gt_valid[b], 0.5, bg_low
            )
            if classes[b, s] > 0:
                assert category == "fg" and best >= 0.5
                assert classes[b, s] == cls == gt_classes[b, j]
                expected = ref.encode_one(rois[b, s], gt[b, j], ROI_WEIGHTS)
                np.testing.assert_allclose(box_targets[b, s], expected, rtol=1e-4, atol=1e-4)
            else:
                assert category == "bg"
                if gt_valid[b].any():
                    assert bg_low <= best < 0.5
                np.testing.assert_array_equal(box_targets[b, s], 0.0)
    return rois, classes, box_targets, valid


@pytest.mark.parametrize("num_rois,fraction,bg_low", [(16, 0.25, 0.0), (8, 0.5, 0.1), (64, 0.25, 0.0)])
def test_sample_rois_against_reference(num_rois, fraction, bg_low):
    rng = np.random.default_rng(4)
    case = _roi_case(rng)
    for _ in range(3):  # several random draws
        out = targets.sample_rois(
            *case, num_rois=num_rois, positive_fraction=fraction, fg_iou=0.5, bg_iou_low=bg_low
        )
        _check_rois(out, *case, num_rois, fraction, bg_low)


def test_sample_rois_appends_ground_truth():
    rng = np.random.default_rng(5)
    proposals, proposal_valid, gt, gt_classes, gt_valid = _roi_case(rng)
    far = random_boxes(rng, proposals.shape[1], size=30.0, min_side=2.0, max_side=5.0) + 400.0
    proposals = np.stack([far, far, far])  # nothing near any gt: the only foreground can be the gt itself
    rois, classes, box_targets, valid = (
        x.numpy()
        for x in targets.sample_rois(proposals, proposal_valid, gt, gt_classes, gt_valid, num_rois=16)
    )
    for b in range(3):
        fg_rois = {tuple(r): c for r, c, v in zip(rois[b], classes[b], valid[b]) if v and c > 0}
        expected = {tuple(g): c for g, c, v in zip(gt[b], gt_classes[b], gt_valid[b]) if v}
        assert fg_rois == expected
        np.testing.assert_array_equal(box_targets[b][classes[b] > 0], 0.0)  # encode(gt, gt) = 0


def test_sample_rois_padding_and_no_gt():
    rng = np.random.default_rng(6)
    proposals, proposal_valid, gt, gt_classes, gt_valid = _roi_case(rng)
    rois, classes, box_targets, valid = (
        x.numpy()
        for x in targets.sample_rois(proposals, proposal_valid, gt, gt_classes, gt_valid, num_rois=16)
    )
    # Image 1: three valid proposals plus its one gt = four candidates; 12 padding slots.
    assert valid[1].sum() == 4 and not valid[1, 4:].any()
    assert (classes[1] > 0).sum() >= 1  # at least the appended gt
    # Image 2 (no gt): everything sampled is background, up to S.
    assert valid[2].sum() == 16 and (classes[2] == 0).all() and (box_targets[2] == 0).all()
    # With bg_iou_low > 0, an image without gt is still all background.
    _, classes, _, valid = targets.sample_rois(
        proposals, proposal_valid, gt, gt_classes, gt_valid, num_rois=16, bg_iou_low=0.3
    )
    assert valid.numpy()[2].sum() == 16 and (classes.numpy()[2] == 0).all()


def test_sample_rois_more_slots_than_candidates_and_xla():
    rng = np.random.default_rng(7)
    case = _roi_case(rng, num_proposals=6)
    fn = tf.function(targets.sample_rois, jit_compile=True)
    out = fn(*case, num_rois=16, seed=1)  # 6 + 4 candidates < 16 slots
    _check_rois(out, *case, 16, 0.25, 0.0)
    again = fn(*case, num_rois=16, seed=1)
    np.testing.assert_array_equal(out[0].numpy(), again[0].numpy())


def test_sample_rois_stops_gradients():
    rng = np.random.default_rng(8)
    proposals, proposal_valid, gt, gt_classes, gt_valid = _roi_case(rng)
    proposals = tf.Variable(proposals)
    with tf.GradientTape() as tape:
        rois, _, box_targets, _ = targets.sample_rois(proposals, proposal_valid, gt, gt_classes, gt_valid, 16)
        total = tf.reduce_sum(rois) + tf.reduce_sum(box_targets)
    assert tape.gradient(total, proposals) is None
