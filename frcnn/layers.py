"""Keras layers of the detector: RoIAlign pooling, the RPN proposal decoder and the detection decoder.

Shape shorthand
---------------
``B`` images per batch; ``H, W, C`` height, width and channels of the feature map (stride ``stride`` in input
pixels); ``N`` ROIs per image given to the pooling layer; ``P`` the pooled size; ``A`` anchors (all locations, the
order of :mod:`frcnn.anchors`); ``R`` proposals per image (``post_nms_topk`` of the mode); ``K = C - 1`` foreground
classes of the ROI head (here ``C`` = ``num_classes`` INCLUDING the background, index 0); ``D`` ``max_detections``.

Naming: ``*_logits`` raw scores, ``*_deltas`` box deltas (R-CNN parametrisation of :mod:`frcnn.boxes`),
``*_boxes`` / ``proposals`` / ``rois`` boxes ``(x1, y1, x2, y2)`` float32 in input-image pixels,
``*_valid`` bool masks that go with padded tensors, ``image_sizes`` ``(B, 2)`` int32 true ``(height, width)``.

All three layers are serialisable (``get_config`` carries every constructor argument) and never autocast their
inputs: under a mixed-precision policy the feature map stays float16 while boxes stay float32 (a float16 pixel
coordinate near 1000 is only good to 0.5 px). Box maths is done in float32. Written with ``keras.ops`` and
:mod:`frcnn.ops`: they run on every Keras backend and under XLA.
"""

import keras
import numpy as np
from keras import ops

from frcnn import boxes as box_ops
from frcnn.boxes import BoxCoder
from frcnn.ops import gather_rows, non_max_suppression, roi_align


class NoAutocastLayer(keras.layers.Layer):
    """A layer that never casts its inputs to its compute dtype (``autocast=False``): under mixed precision the
    feature map stays in the compute dtype while boxes, logits and masks keep their own dtypes. A saved
    ``autocast`` entry is accepted and ignored."""

    def __init__(self, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)


@keras.saving.register_keras_serializable(package="frcnn")
class RoiPoolingConv(NoAutocastLayer):
    """RoIAlign: pool every ROI of every image to a ``P x P`` grid of the feature map.

    Inputs ``[features (B, H, W, C), rois (B, N, 4)]``, ``rois`` in input-image pixels ``(x1, y1, x2, y2)``.
    Output ``(B, N, P, P, C)`` in the dtype of ``features``.

    Alignment convention (Detectron2 ``ROIAlign(aligned=True)``, a.k.a. ROIAlignV2): the centre of feature cell
    ``(i, j)`` sits at input pixel ``((j + 0.5) * stride, (i + 0.5) * stride)`` (as in :mod:`frcnn.anchors`), so a
    pixel coordinate ``u`` maps to the feature coordinate ``u / stride - 0.5``, integer feature coordinates being
    cell centres. The ROI in feature coordinates is split into ``P x P`` equal bins (no rounding, no minimum size);
    each bin is sampled at ``sampling_ratio x sampling_ratio`` points at the centres of a regular sub-bin grid; each
    sample is a bilinear interpolation of the feature map and a bin is the plain mean of its samples. Border rule
    (Detectron2's): a sample with ``y < -1`` or ``y > H`` (or ``x < -1`` or ``x > W``) contributes 0 (it still
    counts in the mean); any other sample has its coordinates clamped to ``[0, H - 1] x [0, W - 1]`` first.
    Why ``aligned=True``: without the half-pixel shift the pooled grid is offset by half a cell from the anchors
    and the boxes, which costs accuracy for small objects.

    ``sampling_ratio = 0`` samples adaptively, as Detectron2's ``POOLER_SAMPLING_RATIO: 0``: ``ceil(roi height / P)``
    rows and ``ceil(roi width / P)`` columns of samples per bin, per ROI.

    Implementation: :func:`frcnn.ops.roi_align`, two interpolation-matrix products over every ROI of the batch.

    ROIs are wrapped in ``stop_gradient``: no gradient flows to the boxes (they come from the proposal
    decoder / the ROI sampler, which are detached by design); gradients flow to the feature map.
    """

    def __init__(self, pool_size=14, stride=16, sampling_ratio=2, **kwargs):
        super().__init__(**kwargs)
        if int(pool_size) < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if int(sampling_ratio) < 0:
            raise ValueError(f"sampling_ratio must be >= 0 (0: adaptive), got {sampling_ratio}")
        if float(stride) <= 0:
            raise ValueError(f"stride must be > 0, got {stride}")
        self.pool_size = int(pool_size)
        self.stride = stride
        self.sampling_ratio = int(sampling_ratio)

    def call(self, inputs):
        features, rois = inputs
        return roi_align(features, rois, self.pool_size, self.stride, self.sampling_ratio)

    def compute_output_shape(self, input_shape):
        feature_shape, roi_shape = input_shape
        return (roi_shape[0], roi_shape[1], self.pool_size, self.pool_size, feature_shape[-1])

    def compute_output_spec(self, inputs):
        features, rois = inputs
        shape = self.compute_output_shape((tuple(features.shape), tuple(rois.shape)))
        return keras.KerasTensor(shape, dtype=features.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"pool_size": self.pool_size, "stride": self.stride, "sampling_ratio": self.sampling_ratio})
        return config


@keras.saving.register_keras_serializable(package="frcnn")
class ProposalLayer(NoAutocastLayer):
    """RPN outputs -> a fixed number ``R`` of proposals per image (static shape, validity mask).

    Inputs ``[rpn_logits (B, A), rpn_deltas (B, A, 4), anchors (A, 4), image_sizes (B, 2) int32 (height, width)]``.
    Returns ``(proposals (B, R, 4) float32, proposal_valid (B, R) bool)`` with ``R = post_nms_topk`` of the mode
    (``training=True`` uses the ``*_train`` values, anything else the ``*_test`` values).

    Per image: the ``min(pre_nms_topk, A)`` anchors of highest objectness logit; decode their deltas
    (the RPN's ``box_coder``, a :class:`frcnn.boxes.BoxCoder`); clip to that image's true size; drop empty boxes and
    boxes whose shorter side is below ``min_size``; greedy NMS at ``nms_thresh`` (a box is suppressed by a
    higher-scored kept box when IoU > ``nms_thresh``); keep the first ``post_nms_topk``, sorted by logit descending;
    pad with zero boxes and ``valid=False``. The outputs are detached (``stop_gradient``): proposals are treated as fixed
    inputs of the second stage, as in Faster R-CNN's approximate joint training.
    """

    def __init__(
        self,
        pre_nms_topk_train,
        post_nms_topk_train,
        pre_nms_topk_test,
        post_nms_topk_test,
        nms_thresh=0.7,
        min_size=0.0,
        box_coder=None,
        **kwargs,
    ):
        legacy_weights = kwargs.pop("box_weights", None)  # the config of layers saved by frcnn 0.1
        super().__init__(**kwargs)
        for name, value in (
            ("pre_nms_topk_train", pre_nms_topk_train),
            ("post_nms_topk_train", post_nms_topk_train),
            ("pre_nms_topk_test", pre_nms_topk_test),
            ("post_nms_topk_test", post_nms_topk_test),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.pre_nms_topk_train = int(pre_nms_topk_train)
        self.post_nms_topk_train = int(post_nms_topk_train)
        self.pre_nms_topk_test = int(pre_nms_topk_test)
        self.post_nms_topk_test = int(post_nms_topk_test)
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.box_coder = BoxCoder.of(box_coder if box_coder is not None else legacy_weights or (1.0, 1.0, 1.0, 1.0))

    def _topk(self, training):
        if training:
            return self.pre_nms_topk_train, self.post_nms_topk_train
        return self.pre_nms_topk_test, self.post_nms_topk_test

    def call(self, inputs, training=None):
        rpn_logits, rpn_deltas, anchors, image_sizes = inputs
        pre_nms_topk, post_nms_topk = self._topk(training)
        rpn_logits = ops.stop_gradient(ops.cast(rpn_logits, "float32"))  # (B, A)
        rpn_deltas = ops.stop_gradient(ops.cast(rpn_deltas, "float32"))  # (B, A, 4)
        anchors = ops.cast(anchors, "float32")  # (A, 4)
        image_sizes = ops.cast(image_sizes, "float32")  # (B, 2)

        num_anchors = ops.shape(rpn_logits)[1]
        k = min(pre_nms_topk, num_anchors) if isinstance(num_anchors, int) else ops.minimum(pre_nms_topk, num_anchors)
        top_logits, top_index = ops.top_k(rpn_logits, k=k)  # (B, k), sorted
        top_deltas = gather_rows(rpn_deltas, top_index)  # (B, k, 4)
        top_anchors = ops.take(anchors, top_index, axis=0)  # (B, k, 4)

        proposal_boxes = self.box_coder.decode(top_deltas, top_anchors)
        proposal_boxes = box_ops.clip(proposal_boxes, image_sizes[:, None, :])  # (B, k, 4)
        side = box_ops.min_side(proposal_boxes)  # (B, k)
        keep = ops.logical_and(side >= self.min_size, side > 0.0)
        index, proposal_valid = non_max_suppression(
            proposal_boxes, top_logits, keep, post_nms_topk, self.nms_thresh
        )  # (B, R)
        proposals = gather_rows(proposal_boxes, index)  # (B, R, 4)
        proposals = ops.where(proposal_valid[:, :, None], proposals, 0.0)
        return ops.stop_gradient(proposals), ops.stop_gradient(proposal_valid)

    def compute_output_spec(self, inputs, training=None):
        rpn_logits = inputs[0]
        _, post_nms_topk = self._topk(training)
        batch = rpn_logits.shape[0]
        return (
            keras.KerasTensor((batch, post_nms_topk, 4), dtype="float32"),
            keras.KerasTensor((batch, post_nms_topk), dtype="bool"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pre_nms_topk_train": self.pre_nms_topk_train,
                "post_nms_topk_train": self.post_nms_topk_train,
                "pre_nms_topk_test": self.pre_nms_topk_test,
                "post_nms_topk_test": self.post_nms_topk_test,
                "nms_thresh": self.nms_thresh,
                "min_size": self.min_size,
                "box_coder": self.box_coder.get_config(),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="frcnn")
class DetectionLayer(NoAutocastLayer):
    """ROI-head outputs -> at most ``D`` detections per image, padded (static shapes).

    Inputs ``[class_probs (B, R, C), box_deltas (B, R, 4 * (C - 1)), proposals (B, R, 4), proposal_valid (B, R),
    image_sizes (B, 2)]``: softmax probabilities over ``C`` classes (0 = background), class-specific deltas for
    classes ``1..C-1`` in order (4 per class), the proposals they refine, their validity mask and the true
    ``(height, width)`` of each image.

    Returns a dict: ``boxes (B, D, 4)`` float32 ``(x1, y1, x2, y2)`` in input-image pixels (the caller rescales to
    the original image), ``scores (B, D)`` float32, ``classes (B, D)`` int32 in ``1..C-1``, ``num_detections (B,)``
    int32. Entries ``>= num_detections`` are zero (class 0 included).

    Per image and per foreground class (as Detectron2's ``fast_rcnn_inference``): decode the class's deltas on
    the proposal (the ROI heads' ``box_coder``), clip to the image, keep ``score > score_thresh``, greedy NMS within
    the class (suppress IoU > ``nms_thresh``); then the ``D`` best across classes, sorted by score descending. Invalid
    (padded) proposals never produce detections: their scores are set to -inf before thresholding.
    """

    def __init__(self, num_classes, score_thresh=0.05, nms_thresh=0.5, max_detections=100, box_coder=None,
                 **kwargs):
        legacy_weights = kwargs.pop("box_weights", None)  # the config of layers saved by frcnn 0.1
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes includes the background and must be >= 2, got {num_classes}")
        if int(max_detections) < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        self.num_classes = int(num_classes)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.max_detections = int(max_detections)
        self.box_coder = BoxCoder.of(box_coder if box_coder is not None else legacy_weights or (10.0, 10.0, 5.0, 5.0))

    def call(self, inputs):
        class_probs, box_deltas, proposals, proposal_valid, image_sizes = inputs
        num_fg = self.num_classes - 1
        d = self.max_detections
        class_probs = ops.cast(class_probs, "float32")  # (B, R, C)
        box_deltas = ops.cast(box_deltas, "float32")  # (B, R, 4 * K)
        proposals = ops.cast(proposals, "float32")  # (B, R, 4)
        proposal_valid = ops.cast(proposal_valid, "bool")  # (B, R)
        image_sizes = ops.cast(image_sizes, "float32")  # (B, 2)
        if class_probs.shape[-1] is not None and class_probs.shape[-1] != self.num_classes:
            raise ValueError(f"class_probs has {class_probs.shape[-1]} classes, expected {self.num_classes}")
        if box_deltas.shape[-1] is not None and box_deltas.shape[-1] != 4 * num_fg:
            raise ValueError(f"box_deltas has {box_deltas.shape[-1]} values per ROI, expected {4 * num_fg}")

        num_proposals = ops.shape(proposals)[1]
        pred_deltas = ops.reshape(box_deltas, (-1, num_proposals, num_fg, 4))  # (B, R, K, 4)
        pred_boxes = self.box_coder.decode(pred_deltas, proposals[:, :, None, :])  # (B, R, K, 4)
        pred_boxes = box_ops.clip(pred_boxes, image_sizes[:, None, None, :])
        pred_scores = class_probs[:, :, 1:]  # (B, R, K): foreground classes only
        # Candidates: valid proposals with score > score_thresh (strict, as Detectron2) and finite numbers.
        candidate = ops.logical_and(proposal_valid[:, :, None], pred_scores > self.score_thresh)
        finite = ops.logical_and(ops.all(ops.isfinite(pred_boxes), axis=-1), ops.isfinite(pred_scores))
        candidate = ops.logical_and(candidate, finite)

        # Per-class NMS (Detectron2's fast_rcnn_inference), all classes at once: classes are folded into the
        # batch, (B, R, K) -> (B * K, R). No class can contribute more than D to the final D, so D per class.
        by_class_boxes = ops.reshape(ops.transpose(pred_boxes, (0, 2, 1, 3)), (-1, num_proposals, 4))
        by_class_scores = ops.reshape(ops.transpose(pred_scores, (0, 2, 1)), (-1, num_proposals))
        by_class_valid = ops.reshape(ops.transpose(candidate, (0, 2, 1)), (-1, num_proposals))
        index, kept = non_max_suppression(by_class_boxes, by_class_scores, by_class_valid, d, self.nms_thresh)
        kept_boxes = ops.reshape(gather_rows(by_class_boxes, index), (-1, num_fg * d, 4))  # (B, K * D, 4)
        kept_scores = ops.where(kept, gather_rows(by_class_scores[:, :, None], index)[:, :, 0], float("-inf"))
        kept_scores = ops.reshape(kept_scores, (-1, num_fg * d))  # (B, K * D)
        # (K * D,): column k is class k + 1. A constant made in NumPy: torch.onnx writes ops.repeat on torch
        # (repeat_interleave) as an ONNX Range of mixed int32 / int64, which onnxruntime refuses.
        kept_classes = ops.convert_to_tensor(np.repeat(np.arange(1, num_fg + 1, dtype=np.int32), d))

        # The D best across classes, by score.
        det_scores, slot = ops.top_k(kept_scores, k=d)  # (B, D)
        det_valid = det_scores > float("-inf")
        det_boxes = ops.where(det_valid[:, :, None], gather_rows(kept_boxes, slot), 0.0)
        det_classes = ops.where(det_valid, ops.take(kept_classes, slot, axis=0), 0)
        det_scores = ops.where(det_valid, det_scores, 0.0)
        return {
            "boxes": det_boxes,
            "scores": det_scores,
            "classes": ops.cast(det_classes, "int32"),
            "num_detections": ops.sum(ops.cast(det_valid, "int32"), axis=1),
        }

    def compute_output_spec(self, inputs):
        batch = inputs[0].shape[0]
        d = self.max_detections
        return {
            "boxes": keras.KerasTensor((batch, d, 4), dtype="float32"),
            "scores": keras.KerasTensor((batch, d), dtype="float32"),
            "classes": keras.KerasTensor((batch, d), dtype="int32"),
            "num_detections": keras.KerasTensor((batch,), dtype="int32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "score_thresh": self.score_thresh,
                "nms_thresh": self.nms_thresh,
                "max_detections": self.max_detections,
                "box_coder": self.box_coder.get_config(),
            }
        )
        return config
