"""The RPN and ROI parts (frcnn.rpn, frcnn.roi_heads) through the shared layer test (tests/layer_testing.py).

Inference calls go through the checks; the training step calls them with ground truth, so that the loss is their
own losses and every trainable weight of the part must receive a gradient from it.
"""

import numpy as np

from frcnn.roi_heads import ROIHeads
from frcnn.rpn import RPN
from layer_testing import run_layer_test

IMAGE_SIZES = np.array([[64, 80], [60, 70]], np.int32)


def _gt(with_classes):
    gt = {
        "gt_boxes": np.array([[[4, 6, 40, 50], [30, 20, 70, 60], [0, 0, 0, 0]],
                              [[10, 10, 30, 40], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32),
        "gt_valid": np.array([[True, True, False], [True, False, False]]),
    }
    if with_classes:
        gt["gt_classes"] = np.array([[1, 2, 0], [2, 0, 0]], np.int32)
    return gt


def test_rpn_part_layer_contract(tmp_path):
    """Proposals are float32 by design (boxes in pixels); the losses dict is empty without ground truth."""
    features = np.random.default_rng(0).normal(size=(2, 4, 5, 8)).astype(np.float32)
    init = dict(anchor_sizes=(32.0, 64.0), anchor_ratios=(0.5, 1.0), stride=16, channels=8,
                proposals=dict(pre_nms_topk_train=60, post_nms_topk_train=12, pre_nms_topk_test=40,
                               post_nms_topk_test=10, nms_thresh=0.7, min_size=0.0),
                batch_size_per_image=16, seed=1)
    layer = run_layer_test(RPN, init, [features, IMAGE_SIZES], [(2, 10, 4), (2, 10)], tmp_path,
                           train_kwargs={"gt": _gt(False)}, float32_outputs=(0,), expect_weights=True)
    _, _, losses = layer(features, IMAGE_SIZES, _gt(False), training=True)
    assert sorted(losses) == ["rpn_box", "rpn_cls"] and all(np.isfinite(float(v)) for v in losses.values())


def test_roi_heads_part_layer_contract(tmp_path):
    """Detections (boxes and scores float32 by design, classes and counts int32); with ground truth, the losses."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 4, 5, 1024)).astype(np.float32)
    corners = np.sort(rng.uniform(0, 60, size=(2, 6, 2, 2)), axis=2)  # (B, R, [min, max], [x, y])
    proposals = np.concatenate([corners[:, :, 0], corners[:, :, 1] + 4], axis=-1).astype(np.float32)
    valid = np.ones((2, 6), bool)
    valid[1, 4:] = False
    init = dict(num_classes=3, norm="frozen", pool_size=4, stride=16, sampling_ratio=2, num_rois=8,
                detections=dict(score_thresh=0.0, nms_thresh=0.5, max_detections=5), seed=2)
    # Flat outputs in key order: boxes, classes, num_detections, scores.
    layer = run_layer_test(ROIHeads, init, [features, proposals, valid, IMAGE_SIZES],
                           [(2, 5, 4), (2, 5), (2,), (2, 5)], tmp_path, train_kwargs={"gt": _gt(True)},
                           float32_outputs=(0, 3), expect_weights=True, atol=1e-5)
    losses = layer(features, proposals, valid, IMAGE_SIZES, _gt(True), training=True)
    assert sorted(losses) == ["roi_box", "roi_cls"] and all(np.isfinite(float(v)) for v in losses.values())
