"""Targets and decoders agree: feeding the training targets back as predictions recovers the ground truth.

This ties frcnn.targets (what the losses teach) to frcnn.layers (how predictions are read at test time): the same
anchor order, delta layout, box weights and class columns on both sides.
"""

import numpy as np
import tensorflow as tf

from frcnn import anchors as anchor_lib
from frcnn import layers, targets

GT = tf.constant([[[11.0, 17.0, 30.0, 36.0], [44.0, 42.0, 87.0, 85.0], [0.0, 0.0, 0.0, 0.0]],
                  [[60.0, 5.0, 120.0, 50.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
GT_VALID = tf.constant([[True, True, False], [True, False, False]])
GT_CLASSES = tf.constant([[2, 1, 0], [3, 0, 0]])
SIZES = tf.constant([[128, 128], [96, 128]])


def test_perfect_rpn_predictions_propose_the_ground_truth():
    anchors = anchor_lib.grid_anchors(8, 8, 16, (16.0, 32.0, 64.0), (0.5, 1.0, 2.0))
    labels, box_targets = targets.rpn_targets(anchors, GT, GT_VALID, SIZES, batch_size_per_image=100000,
                                              positive_fraction=1.0)
    logits = tf.where(labels == targets.POSITIVE, 10.0, -10.0)
    proposals, valid = layers.ProposalLayer(300, 64, 200, 32, nms_thresh=0.7)(
        [logits, box_targets, anchors, SIZES], training=False)
    for b in range(2):
        kept = proposals.numpy()[b][valid.numpy()[b]]
        for g in GT.numpy()[b][GT_VALID.numpy()[b]]:
            assert np.abs(kept - g).max(axis=1).min() < 1e-3, (b, g)


def test_perfect_roi_predictions_detect_the_ground_truth():
    num_classes, rois_per_image = 4, 8
    jitter = tf.constant([[1.0, -2.0, 3.0, 2.0]])
    proposals = tf.concat([GT + jitter, tf.zeros((2, 5, 4))], axis=1)
    proposal_valid = tf.concat([GT_VALID, tf.zeros((2, 5), tf.bool)], axis=1)
    rois, roi_classes, roi_targets, roi_valid = targets.sample_rois(
        proposals, proposal_valid, GT, GT_CLASSES, GT_VALID, rois_per_image, positive_fraction=1.0)
    probs = tf.one_hot(roi_classes, num_classes)
    # Put each ROI's target deltas in the columns of its class, as the ROI head is trained to.
    deltas = np.zeros((2, rois_per_image, num_classes - 1, 4), np.float32)
    for b in range(2):
        for i in range(rois_per_image):
            c = int(roi_classes[b, i])
            if c > 0:
                deltas[b, i, c - 1] = roi_targets[b, i]
    out = layers.DetectionLayer(num_classes, score_thresh=0.5, nms_thresh=0.5, max_detections=10)(
        [probs, deltas.reshape(2, rois_per_image, -1), rois, roi_valid & (roi_classes > 0), SIZES])
    for b in range(2):
        n = int(out["num_detections"][b])
        want = GT.numpy()[b][GT_VALID.numpy()[b]]
        assert n == len(want)
        got = out["boxes"].numpy()[b, :n]
        order = np.lexsort(got.T[::-1])
        np.testing.assert_allclose(got[order], want[np.lexsort(want.T[::-1])], atol=1e-3)
        assert sorted(out["classes"].numpy()[b, :n]) == sorted(GT_CLASSES.numpy()[b][GT_VALID.numpy()[b]])
