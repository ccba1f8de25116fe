"""The ROI part: ROI sampling, ``RoiPoolingConv``, the per-ROI ``TimeDistributed`` head, detection decoding and the
ROI losses.

Shape shorthand: ``B`` images, ``R`` proposals per image, ``S`` sampled ROIs per image (training), ``P`` pooled size,
``C`` classes including background, ``D`` detections per image.
"""

import keras

from frcnn.boxes import BoxCoder
from frcnn.heads import ROIHead
from frcnn.layers import DetectionLayer, NoAutocastLayer, RoiPoolingConv
from frcnn.losses import roi_losses
from frcnn.precision import speed_paths_on
from frcnn.targets import sample_rois


@keras.saving.register_keras_serializable(package="frcnn")
class ROIHeads(NoAutocastLayer):
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
                 smooth_l1_beta=1.0, detections=None, seed=None, head_pooling="avg", speed_paths=True, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.norm = norm
        self.num_rois = int(num_rois)
        self.positive_fraction = float(positive_fraction)
        self.fg_iou, self.bg_iou_low = float(fg_iou), float(bg_iou_low)
        self.box_coder = BoxCoder(box_weights)  # the ROI heads' one coder: their targets and their detections
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.seed = seed
        self.pooler = RoiPoolingConv(pool_size, stride, sampling_ratio, name="roi_pooling")
        self.head = ROIHead(self.num_classes, norm, pooling=head_pooling, speed_paths=speed_paths, name="roi_head")
        self.decoder = DetectionLayer(self.num_classes, **dict(detections or {}), box_coder=self.box_coder,
                                      name="detections")
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def from_cfg(cls, cfg):
        """The ROI heads a config describes: ``roi_heads``, ``model.norm``, ``model.feature_stride``, the class
        count of ``data.classes`` and ``train.seed``."""
        r = cfg.roi_heads
        return cls(
            cfg.num_classes, cfg.model.norm, r.pool_size, cfg.model.feature_stride, r.sampling_ratio, r.num_rois,
            positive_fraction=r.positive_fraction, fg_iou=r.fg_iou, bg_iou_low=r.bg_iou_low,
            box_weights=r.box_weights, smooth_l1_beta=r.smooth_l1_beta,
            detections=dict(score_thresh=r.score_thresh, nms_thresh=r.nms_thresh, max_detections=r.max_detections),
            seed=cfg.train.seed + 1, head_pooling=r.head_pooling,
            speed_paths=speed_paths_on(cfg.train.speed_paths), name="roi_heads",
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
            box_coder=self.box_coder, seed=self.seed_generator,
        )
        pooled = self.pooler([features, rois])  # (B, S, P, P, 1024)
        class_logits, box_deltas = self.head(pooled, training=training)
        return roi_losses(class_logits, box_deltas, roi_classes, roi_box_targets, roi_valid, beta=self.smooth_l1_beta)

    def get_build_config(self):
        return None  # built by the detector's first forward pass (FasterRCNN.build_for_inference), not alone

    def get_config(self):
        return {
            **super().get_config(), "num_classes": self.num_classes, "norm": self.norm,
            "pool_size": self.pooler.pool_size, "stride": self.pooler.stride,
            "sampling_ratio": self.pooler.sampling_ratio, "num_rois": self.num_rois,
            "positive_fraction": self.positive_fraction, "fg_iou": self.fg_iou, "bg_iou_low": self.bg_iou_low,
            "box_weights": list(self.box_coder.weights), "smooth_l1_beta": self.smooth_l1_beta,
            "detections": {k: self.decoder.get_config()[k] for k in ("score_thresh", "nms_thresh", "max_detections")},
            "seed": self.seed, "head_pooling": self.head.pooling, "speed_paths": self.head.speed_paths,
        }
