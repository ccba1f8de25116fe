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
coordinate near 1000 is only good to 0.5 px). Box maths is done in float32.
"""

import keras
import tensorflow as tf

from frcnn import boxes as box_ops


def _dim(x, axis):
    """The static size of ``x.shape[axis]`` if known, else the dynamic one."""
    static = x.shape[axis]
    return static if static is not None else tf.shape(x)[axis]


@keras.saving.register_keras_serializable(package="frcnn")
class RoiPoolingConv(keras.layers.Layer):
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

    Implementation: one ``tf.image.crop_and_resize`` per sub-sample offset (``sampling_ratio ** 2`` calls, each over
    all ROIs of all images at once) on the feature map padded with one replicated edge row / column on each side.
    The padding reproduces the clamping of samples in ``[-1, 0)`` and ``(H - 1, H]``, and crop_and_resize's
    extrapolation value 0 beyond the padded map gives exactly the zero rule. Summing ``S * S`` crops of size
    ``P`` instead of one crop of size ``P * S`` followed by average pooling keeps the peak memory near the size of
    the output (the ROI head of a C4 model pools hundreds of ROIs at 14 x 14 x 1024).

    ROIs are wrapped in ``stop_gradient``: no gradient flows to the boxes (they come from the proposal
    decoder / the ROI sampler, which are detached by design); gradients flow to the feature map.
    """

    def __init__(self, pool_size=14, stride=16, sampling_ratio=2, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        if int(pool_size) < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if int(sampling_ratio) < 1:
            raise ValueError(f"sampling_ratio must be >= 1 (adaptive sampling is not supported), got {sampling_ratio}")
        if float(stride) <= 0:
            raise ValueError(f"stride must be > 0, got {stride}")
        self.pool_size = int(pool_size)
        self.stride = stride
        self.sampling_ratio = int(sampling_ratio)
        # CropAndResize has no XLA kernel: tell Keras, so that compile(jit_compile="auto") on a GPU does not pick XLA.
        self.supports_jit = False

    def call(self, inputs):
        features, rois = inputs
        features = tf.convert_to_tensor(features)
        # Boxes are inputs of the pooling, not something to learn through it.
        rois = tf.stop_gradient(tf.cast(rois, tf.float32))  # (B, N, 4)

        batch = _dim(rois, 0)
        num_rois = _dim(rois, 1)
        channels = _dim(features, 3)
        pool = self.pool_size
        ratio = self.sampling_ratio

        # One replicated edge row / column on each side: (B, H + 2, W + 2, C).
        padded = tf.pad(features, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        if padded.dtype == tf.bfloat16:
            padded = tf.cast(padded, tf.float32)  # CropAndResize has no bfloat16 kernel (mixed_bfloat16)
        height = tf.cast(tf.shape(features)[1], tf.float32)
        width = tf.cast(tf.shape(features)[2], tf.float32)

        flat = tf.reshape(rois, [-1, 4])  # (B * N, 4)
        box_indices = tf.repeat(tf.range(batch, dtype=tf.int32), num_rois)  # (B * N,)

        # ROI in feature coordinates (aligned: half-pixel shift), then in padded coordinates (+1).
        inv_stride = 1.0 / float(self.stride)
        x1 = flat[:, 0] * inv_stride - 0.5 + 1.0
        y1 = flat[:, 1] * inv_stride - 0.5 + 1.0
        x2 = flat[:, 2] * inv_stride - 0.5 + 1.0
        y2 = flat[:, 3] * inv_stride - 0.5 + 1.0
        # Distance between neighbouring samples: bin size / sampling_ratio.
        step_x = (x2 - x1) / float(pool * ratio)
        step_y = (y2 - y1) / float(pool * ratio)

        # crop_and_resize puts crop row i at y = y1n * (H' - 1) + i * (y2n - y1n) * (H' - 1) / (P - 1), with
        # H' = H + 2 the padded height (and at the mid point for P == 1). For sub-sample offset iy, the sample of
        # bin ph is at y1 + (ph * S + iy + 0.5) * step_y: first row at y1 + (iy + 0.5) * step_y, last row
        # (P - 1) * S * step_y further; dividing by H' - 1 = H + 1 gives the normalised coordinates.
        norm_y = 1.0 / (height + 1.0)
        norm_x = 1.0 / (width + 1.0)
        span_y = float((pool - 1) * ratio) * step_y
        span_x = float((pool - 1) * ratio) * step_x

        total = None
        for iy in range(ratio):
            first_y = y1 + (iy + 0.5) * step_y
            for ix in range(ratio):
                first_x = x1 + (ix + 0.5) * step_x
                crop_boxes = tf.stack(
                    [first_y * norm_y, first_x * norm_x, (first_y + span_y) * norm_y, (first_x + span_x) * norm_x],
                    axis=-1,
                )
                crop = tf.image.crop_and_resize(
                    padded, crop_boxes, box_indices, [pool, pool], method="bilinear", extrapolation_value=0.0
                )  # (B * N, P, P, C) float32
                total = crop if total is None else total + crop
        pooled = total * (1.0 / float(ratio * ratio))
        pooled = tf.cast(pooled, features.dtype)
        return tf.reshape(pooled, [batch, num_rois, pool, pool, channels])

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
class ProposalLayer(keras.layers.Layer):
    """RPN outputs -> a fixed number ``R`` of proposals per image (static shape, validity mask).

    Inputs ``[rpn_logits (B, A), rpn_deltas (B, A, 4), anchors (A, 4), image_sizes (B, 2) int32 (height, width)]``.
    Returns ``(proposals (B, R, 4) float32, proposal_valid (B, R) bool)`` with ``R = post_nms_topk`` of the mode
    (``training=True`` uses the ``*_train`` values, anything else the ``*_test`` values).

    Per image: the ``min(pre_nms_topk, A)`` anchors of highest objectness logit; decode their deltas
    (:func:`frcnn.boxes.decode` with ``box_weights``); clip to that image's true size; drop empty boxes and boxes
    whose shorter side is below ``min_size``; greedy NMS at ``nms_thresh`` (a box is suppressed by a higher-scored
    kept box when IoU > ``nms_thresh``); keep the first ``post_nms_topk``, sorted by logit descending; pad with
    zero boxes and ``valid=False``. The outputs are detached (``stop_gradient``): proposals are treated as fixed
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
        box_weights=(1.0, 1.0, 1.0, 1.0),
        **kwargs,
    ):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
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
        self.box_weights = tuple(float(w) for w in box_weights)

    def _topk(self, training):
        if training:
            return self.pre_nms_topk_train, self.post_nms_topk_train
        return self.pre_nms_topk_test, self.post_nms_topk_test

    def call(self, inputs, training=None):
        rpn_logits, rpn_deltas, anchors, image_sizes = inputs
        pre_nms_topk, post_nms_topk = self._topk(training)
        rpn_logits = tf.stop_gradient(tf.cast(rpn_logits, tf.float32))  # (B, A)
        rpn_deltas = tf.stop_gradient(tf.cast(rpn_deltas, tf.float32))  # (B, A, 4)
        anchors = tf.cast(anchors, tf.float32)  # (A, 4)
        image_sizes = tf.cast(image_sizes, tf.float32)  # (B, 2)

        num_anchors = rpn_logits.shape[1]
        if num_anchors is not None:
            k = min(pre_nms_topk, num_anchors)
        else:
            k = tf.minimum(pre_nms_topk, tf.shape(rpn_logits)[1])
        top_logits, top_index = tf.math.top_k(rpn_logits, k=k, sorted=True)  # (B, k)
        top_deltas = tf.gather(rpn_deltas, top_index, batch_dims=1)  # (B, k, 4)
        top_anchors = tf.gather(anchors, top_index)  # (B, k, 4)

        proposal_boxes = box_ops.decode(top_deltas, top_anchors, self.box_weights)
        proposal_boxes = box_ops.clip(proposal_boxes, image_sizes[:, None, :])  # (B, k, 4)
        side = box_ops.min_side(proposal_boxes)  # (B, k)
        keep = tf.logical_and(side >= self.min_size, side > 0.0)
        # Dropped boxes get score -inf, which the NMS score threshold (the lowest finite float) rejects.
        neg_inf = tf.constant(float("-inf"), tf.float32)
        nms_scores = tf.where(keep, top_logits, neg_inf)

        def nms_one_image(args):
            image_boxes, image_scores = args
            # NonMaxSuppressionV4 pads to a static size and suppresses IoU > threshold, like torchvision and
            # Detectron2. (TF2's tf.image.non_max_suppression_padded runs a tiled algorithm that suppresses at
            # IoU >= threshold and lets -inf scores through a -inf threshold, hence the raw op.)
            selected, num_valid = tf.raw_ops.NonMaxSuppressionV4(
                boxes=box_ops.to_yxyx(image_boxes),
                scores=image_scores,
                max_output_size=post_nms_topk,
                iou_threshold=self.nms_thresh,
                score_threshold=tf.float32.min,
                pad_to_max_output_size=True,
            )
            return selected, num_valid

        selected, num_valid = tf.map_fn(
            nms_one_image,
            (proposal_boxes, nms_scores),
            fn_output_signature=(
                tf.TensorSpec([post_nms_topk], tf.int32),
                tf.TensorSpec([], tf.int32),
            ),
        )  # (B, R), (B,)
        proposal_valid = tf.range(post_nms_topk)[None, :] < num_valid[:, None]  # (B, R)
        proposals = tf.gather(proposal_boxes, selected, batch_dims=1)  # (B, R, 4)
        proposals = tf.where(proposal_valid[:, :, None], proposals, tf.zeros_like(proposals))
        return tf.stop_gradient(proposals), tf.stop_gradient(proposal_valid)

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
                "box_weights": list(self.box_weights),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="frcnn")
class DetectionLayer(keras.layers.Layer):
    """ROI-head outputs -> at most ``D`` detections per image, padded (static shapes).

    Inputs ``[class_probs (B, R, C), box_deltas (B, R, 4 * (C - 1)), proposals (B, R, 4), proposal_valid (B, R),
    image_sizes (B, 2)]``: softmax probabilities over ``C`` classes (0 = background), class-specific deltas for
    classes ``1..C-1`` in order (4 per class), the proposals they refine, their validity mask and the true
    ``(height, width)`` of each image.

    Returns a dict: ``boxes (B, D, 4)`` float32 ``(x1, y1, x2, y2)`` in input-image pixels (the caller rescales to
    the original image), ``scores (B, D)`` float32, ``classes (B, D)`` int32 in ``1..C-1``, ``num_detections (B,)``
    int32. Entries ``>= num_detections`` are zero (class 0 included).

    Per image and per foreground class (as Detectron2's ``fast_rcnn_inference``): decode the class's deltas on
    the proposal (``box_weights``), clip to the image, keep ``score > score_thresh``, greedy NMS within the class
    (suppress IoU > ``nms_thresh``); then the ``D`` best across classes, sorted by score descending. Invalid
    (padded) proposals never produce detections: their scores are set to -inf before thresholding.
    """

    def __init__(self, num_classes, score_thresh=0.05, nms_thresh=0.5, max_detections=100,
                 box_weights=(10.0, 10.0, 5.0, 5.0), **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes includes the background and must be >= 2, got {num_classes}")
        if int(max_detections) < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        self.num_classes = int(num_classes)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.max_detections = int(max_detections)
        self.box_weights = tuple(float(w) for w in box_weights)
        # CombinedNonMaxSuppression has no XLA kernel (see RoiPoolingConv).
        self.supports_jit = False

    def call(self, inputs):
        class_probs, box_deltas, proposals, proposal_valid, image_sizes = inputs
        num_fg = self.num_classes - 1
        class_probs = tf.cast(class_probs, tf.float32)  # (B, R, C)
        box_deltas = tf.cast(box_deltas, tf.float32)  # (B, R, 4 * K)
        proposals = tf.cast(proposals, tf.float32)  # (B, R, 4)
        proposal_valid = tf.cast(proposal_valid, tf.bool)  # (B, R)
        image_sizes = tf.cast(image_sizes, tf.float32)  # (B, 2)
        if class_probs.shape[-1] is not None and class_probs.shape[-1] != self.num_classes:
            raise ValueError(f"class_probs has {class_probs.shape[-1]} classes, expected {self.num_classes}")
        if box_deltas.shape[-1] is not None and box_deltas.shape[-1] != 4 * num_fg:
            raise ValueError(f"box_deltas has {box_deltas.shape[-1]} values per ROI, expected {4 * num_fg}")

        batch = _dim(proposals, 0)
        num_proposals = _dim(proposals, 1)
        pred_deltas = tf.reshape(box_deltas, [batch, num_proposals, num_fg, 4])  # (B, R, K, 4)
        pred_boxes = box_ops.decode(pred_deltas, proposals[:, :, None, :], self.box_weights)  # (B, R, K, 4)
        pred_boxes = box_ops.clip(pred_boxes, image_sizes[:, None, None, :])
        pred_scores = class_probs[:, :, 1:]  # (B, R, K): foreground classes only
        neg_inf = tf.constant(float("-inf"), tf.float32)
        pred_scores = tf.where(proposal_valid[:, :, None], pred_scores, neg_inf)

        # combined_non_max_suppression: per-class NMS (suppress IoU > iou_threshold), candidates score >
        # score_threshold (strict, as Detectron2), then the max_total_size best across classes sorted by score.
        # With max_total_size = D no class can contribute more than D, so max_output_size_per_class = D loses
        # nothing. clip_boxes=False: the boxes are pixels, not normalised; IoU does not care that they are yxyx.
        nmsed = tf.image.combined_non_max_suppression(
            box_ops.to_yxyx(pred_boxes),
            pred_scores,
            max_output_size_per_class=self.max_detections,
            max_total_size=self.max_detections,
            iou_threshold=self.nms_thresh,
            score_threshold=self.score_thresh,
            pad_per_class=False,
            clip_boxes=False,
        )
        num_detections = tf.cast(nmsed.valid_detections, tf.int32)  # (B,)
        det_valid = tf.range(self.max_detections)[None, :] < num_detections[:, None]  # (B, D)
        det_boxes = box_ops.to_yxyx(nmsed.nmsed_boxes)  # the same swap converts yxyx back to xyxy
        det_boxes = tf.where(det_valid[:, :, None], det_boxes, tf.zeros_like(det_boxes))
        det_scores = tf.where(det_valid, nmsed.nmsed_scores, tf.zeros_like(nmsed.nmsed_scores))
        # nmsed_classes index the K foreground columns: column k is class k + 1.
        det_classes = tf.where(det_valid, tf.cast(nmsed.nmsed_classes, tf.int32) + 1, 0)
        return {
            "boxes": det_boxes,
            "scores": det_scores,
            "classes": det_classes,
            "num_detections": num_detections,
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
                "box_weights": list(self.box_weights),
            }
        )
        return config
