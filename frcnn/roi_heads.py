"""The ROI part: ROI sampling, ``RoiPoolingConv``, the per-ROI ``TimeDistributed`` head, detection decoding and the
ROI losses.

Shape shorthand: ``B`` images, ``R`` proposals per image, ``S`` sampled ROIs per image (training), ``P`` pooled size,
``C`` classes including background, ``D`` detections per image.
"""

import keras

from frcnn.heads import ROIHead
from frcnn.layers import DetectionLayer, RoiPoolingConv
from frcnn.losses import roi_losses
from frcnn.targets import sample_rois


@keras.saving.register_keras_serializable(package="frcnn")
class ROIHeads(keras.layers.Layer):
    """Features and proposals -> detections, or in training the ROI losses.

    ``call(features, proposals, proposal_valid, image_sizes, gt=None, training=None)``:

    - without ``gt``: every proposal is pooled (``(B, R, P, P, 1024)``), classified and refined, and
      :class:`DetectionLayer` returns the detections dict (boxes in input pixels);
    - with ``gt`` (``gt_boxes``, ``gt_classes``, ``gt_valid``): ``S`` ROIs are sampled from the proposals plus the
      ground truth (stop-gradient: approximate joint training), pooled and classified, and the result is
      ``{"roi_cls", "roi_box"}``.

    Build it from a config with :meth:`from_cfg`.
    """

    def __init__(self, num_classes, norm="frozen", pool_size=14, stride=16, sampling_ratio=2, num_rois=128,
                 positive_fraction=0.25, fg_iou=0.5, bg_iou_low=0.0, box_weights=(10.0, 10.0, 5.0, 5.0),
                 smooth_l1_beta=1.0, detections=None, seed=None, head_pooling="avg", **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.num_classes = int(num_classes)
        self.norm = norm
        self.num_rois = int(num_rois)
        self.positive_fraction = float(positive_fraction)
        self.fg_iou, self.bg_iou_low = float(fg_iou), float(bg_iou_low)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.seed = seed
        self.pooler = RoiPoolingConv(pool_size, stride, sampling_ratio, name="roi_pooling")
        self.head = ROIHead(self.num_classes, norm, pooling=head_pooling, name="roi_head")
        detections = dict(detections or {})
        detections.setdefault("box_weights", self.box_weights)
        self.decoder = DetectionLayer(self.num_classes, **detections, name="detections")
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def from_cfg(cls, cfg):
        m = cfg.model
        return cls(
            cfg.num_classes, m.norm, m.pool_size, m.feature_stride, m.sampling_ratio, m.num_rois,
            positive_fraction=m.roi_positive_fraction, fg_iou=m.roi_fg_iou, bg_iou_low=m.roi_bg_iou_low,
            box_weights=m.roi_box_weights, smooth_l1_beta=m.roi_smooth_l1_beta,
            detections=dict(score_thresh=m.score_thresh, nms_thresh=m.nms_thresh, max_detections=m.max_detections),
            seed=cfg.train.seed + 1, head_pooling=m.head_pooling, name="roi_heads",
        )

    def call(self, features, proposals, proposal_valid, image_sizes, gt=None, training=None):
        if gt is None:
            pooled = self.pooler([features, proposals])  # (B, R, P, P, 1024)
            class_logits, box_deltas = self.head(pooled, training=training)
            class_probs = keras.ops.softmax(keras.ops.cast(class_logits, "float32"), axis=-1)
            return self.decoder([class_probs, box_deltas, proposals, proposal_valid, image_sizes])
        rois, roi_classes, roi_box_targets, roi_valid = sample_rois(
            proposals, proposal_valid, gt["gt_boxes"], gt["gt_classes"], gt["gt_valid"], self.num_rois,
            positive_fraction=self.positive_fraction, fg_iou=self.fg_iou, bg_iou_low=self.bg_iou_low,
            box_weights=self.box_weights, seed=self.seed_generator,
        )
        pooled = self.pooler([features, rois])  # (B, S, P, P, 1024)
        class_logits, box_deltas = self.head(pooled, training=training)
        return roi_losses(class_logits, box_deltas, roi_classes, roi_box_targets, roi_valid, beta=self.smooth_l1_beta)

    def get_config(self):
        return {
            **super().get_config(), "num_classes": self.num_classes, "norm": self.norm,
            "pool_size": self.pooler.pool_size, "stride": self.pooler.stride,
            "sampling_ratio": self.pooler.sampling_ratio, "num_rois": self.num_rois,
            "positive_fraction": self.positive_fraction, "fg_iou": self.fg_iou, "bg_iou_low": self.bg_iou_low,
            "box_weights": list(self.box_weights), "smooth_l1_beta": self.smooth_l1_beta,
            "detections": {k: self.decoder.get_config()[k] for k in ("score_thresh", "nms_thresh", "max_detections")},
            "seed": self.seed, "head_pooling": self.head.pooling,
        }
