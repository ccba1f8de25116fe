"""The region proposal network as one part: its head, anchors, proposal decoding, training targets and losses.

Shape shorthand: ``B`` images, ``H x W`` res4 feature map, ``A`` anchors of the map (``H * W * k``), ``R``
proposals per image, ``G`` ground-truth slots per image.
"""

import keras

from frcnn import anchors as anchor_lib
from frcnn.heads import RPNHead
from frcnn.layers import ProposalLayer
from frcnn.losses import rpn_losses
from frcnn.targets import rpn_targets


@keras.saving.register_keras_serializable(package="frcnn")
class RPN(keras.layers.Layer):
    """Features -> proposals, and in training the RPN losses.

    ``call(features, image_sizes, gt=None, training=None)`` returns ``(proposals (B, R, 4), proposal_valid (B, R),
    losses)``: ``losses`` is ``{}`` without ground truth, else ``{"rpn_cls", "rpn_box"}`` computed against anchor
    targets drawn in the graph. ``gt`` is a dict with ``gt_boxes (B, G, 4)`` and ``gt_valid (B, G)``.
    Build it from a config with :meth:`from_cfg` (Keras' own ``from_config`` reads ``get_config`` dicts).
    """

    def __init__(self, anchor_sizes, anchor_ratios, anchor_offset=0.5, stride=16, channels=1024,
                 proposals=None, fg_iou=0.7, bg_iou=0.3, batch_size_per_image=256, positive_fraction=0.5,
                 box_weights=(1.0, 1.0, 1.0, 1.0), smooth_l1_beta=1.0 / 9.0, seed=None, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.anchor_offset = float(anchor_offset)
        self.stride = int(stride)
        self.channels = int(channels)
        self.fg_iou, self.bg_iou = float(fg_iou), float(bg_iou)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.seed = seed
        num_anchors = anchor_lib.num_anchors_per_location(self.anchor_sizes, self.anchor_ratios)
        self.head = RPNHead(num_anchors, self.channels, name="rpn")
        proposals = dict(proposals or {})
        proposals.setdefault("box_weights", self.box_weights)
        self.proposals = ProposalLayer(**proposals, name="proposals")
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def from_cfg(cls, cfg):
        m = cfg.model
        return cls(
            m.anchor_sizes, m.anchor_ratios, m.anchor_offset, m.feature_stride, m.rpn_channels,
            proposals=dict(
                pre_nms_topk_train=m.rpn_pre_nms_topk_train, post_nms_topk_train=m.rpn_post_nms_topk_train,
                pre_nms_topk_test=m.rpn_pre_nms_topk_test, post_nms_topk_test=m.rpn_post_nms_topk_test,
                nms_thresh=m.rpn_nms_thresh, min_size=m.rpn_min_size,
            ),
            fg_iou=m.rpn_fg_iou, bg_iou=m.rpn_bg_iou, batch_size_per_image=m.rpn_batch_size_per_image,
            positive_fraction=m.rpn_positive_fraction, box_weights=m.rpn_box_weights,
            smooth_l1_beta=m.rpn_smooth_l1_beta, seed=cfg.train.seed, name="rpn_part",
        )

    def anchors(self, feature_height, feature_width):
        """All ``(A, 4)`` anchors of an ``H x W`` map, in the order of the head's outputs."""
        return anchor_lib.grid_anchors(feature_height, feature_width, self.stride, self.anchor_sizes,
                                       self.anchor_ratios, self.anchor_offset)

    def call(self, features, image_sizes, gt=None, training=None):
        rpn_logits, rpn_deltas = self.head(features)  # (B, A), (B, A, 4)
        shape = keras.ops.shape(features)
        anchors = self.anchors(shape[1], shape[2])
        proposals, proposal_valid = self.proposals([rpn_logits, rpn_deltas, anchors, image_sizes], training=training)
        if gt is None:
            return proposals, proposal_valid, {}
        labels, box_targets = rpn_targets(
            anchors, gt["gt_boxes"], gt["gt_valid"], image_sizes, fg_iou=self.fg_iou, bg_iou=self.bg_iou,
            batch_size_per_image=self.batch_size_per_image, positive_fraction=self.positive_fraction,
            box_weights=self.box_weights, seed=self.seed_generator,
        )
        losses = rpn_losses(rpn_logits, rpn_deltas, labels, box_targets, beta=self.smooth_l1_beta,
                            batch_size_per_image=self.batch_size_per_image)
        return proposals, proposal_valid, losses

    def get_config(self):
        return {
            **super().get_config(), "anchor_sizes": list(self.anchor_sizes), "anchor_ratios": list(self.anchor_ratios),
            "anchor_offset": self.anchor_offset, "stride": self.stride, "channels": self.channels,
            "proposals": {k: v for k, v in self.proposals.get_config().items()
                          if k not in ("name", "trainable", "dtype", "autocast")},
            "fg_iou": self.fg_iou, "bg_iou": self.bg_iou, "batch_size_per_image": self.batch_size_per_image,
            "positive_fraction": self.positive_fraction, "box_weights": list(self.box_weights),
            "smooth_l1_beta": self.smooth_l1_beta, "seed": self.seed,
        }
