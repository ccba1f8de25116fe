"""The region proposal network as one part: its head, anchors, proposal decoding, training targets and losses.

Shape shorthand: ``B`` images, ``H x W`` res4 feature map, ``A`` anchors of the map (``H * W * k``), ``R``
proposals per image, ``G`` ground-truth slots per image.
"""

import keras

from frcnn import anchors as anchor_lib
from frcnn.boxes import BoxCoder
from frcnn.heads import RPNHead
from frcnn.layers import NoAutocastLayer, ProposalLayer
from frcnn.losses import rpn_losses
from frcnn.precision import speed_paths_on
from frcnn.targets import rpn_targets


@keras.saving.register_keras_serializable(package="frcnn")
class RPN(NoAutocastLayer):
    """Features -> proposals, and in training the RPN losses.

    ``call(features, image_sizes, gt=None, training=None)`` returns ``(proposals (B, R, 4), proposal_valid (B, R),
    losses)``: ``losses`` is ``{}`` without ground truth, else ``{"rpn_cls", "rpn_box"}`` computed against anchor
    targets drawn in the graph. ``gt`` is a dict with ``gt_boxes (B, G, 4)`` and ``gt_valid (B, G)``.
    Build it from a config with :meth:`from_cfg` (Keras' own ``from_config`` reads ``get_config`` dicts).
    """

    def __init__(self, anchor_sizes, anchor_ratios, anchor_offset=0.5, stride=16, channels=1024,
                 proposals=None, fg_iou=0.7, bg_iou=0.3, batch_size_per_image=256, positive_fraction=0.5,
                 box_weights=(1.0, 1.0, 1.0, 1.0), smooth_l1_beta=1.0 / 9.0, seed=None, speed_paths=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.anchor_offset = float(anchor_offset)
        self.stride = int(stride)
        self.channels = int(channels)
        self.fg_iou, self.bg_iou = float(fg_iou), float(bg_iou)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.box_coder = BoxCoder(box_weights)  # the RPN's one coder: its targets and its proposals
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.seed = seed
        num_anchors = anchor_lib.num_anchors_per_location(self.anchor_sizes, self.anchor_ratios)
        self.head = RPNHead(num_anchors, self.channels, speed_paths=speed_paths, name="rpn")
        self.proposals = ProposalLayer(**dict(proposals or {}), box_coder=self.box_coder, name="proposals")
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def from_cfg(cls, cfg):
        """The RPN a config describes: ``anchors``, ``rpn``, ``model.feature_stride`` and ``train.seed``."""
        a, r = cfg.anchors, cfg.rpn
        return cls(
            a.sizes, a.ratios, a.offset, cfg.model.feature_stride, r.channels,
            proposals=dict(
                pre_nms_topk_train=r.pre_nms_topk_train, post_nms_topk_train=r.post_nms_topk_train,
                pre_nms_topk_test=r.pre_nms_topk_test, post_nms_topk_test=r.post_nms_topk_test,
                nms_thresh=r.nms_thresh, min_size=r.min_size,
            ),
            fg_iou=r.fg_iou, bg_iou=r.bg_iou, batch_size_per_image=r.batch_size_per_image,
            positive_fraction=r.positive_fraction, box_weights=r.box_weights, smooth_l1_beta=r.smooth_l1_beta,
            seed=cfg.train.seed, speed_paths=speed_paths_on(cfg.train.speed_paths), name="rpn_part",
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
            box_coder=self.box_coder, seed=self.seed_generator,
        )
        losses = rpn_losses(rpn_logits, rpn_deltas, labels, box_targets, beta=self.smooth_l1_beta,
                            batch_size_per_image=self.batch_size_per_image)
        return proposals, proposal_valid, losses

    def get_build_config(self):
        return None  # built by the detector's first forward pass (FasterRCNN.build_for_inference), not alone

    def get_config(self):
        return {
            **super().get_config(), "anchor_sizes": list(self.anchor_sizes), "anchor_ratios": list(self.anchor_ratios),
            "anchor_offset": self.anchor_offset, "stride": self.stride, "channels": self.channels,
            "proposals": {k: v for k, v in self.proposals.get_config().items()
                          if k not in ("name", "trainable", "dtype", "autocast", "box_coder")},
            "fg_iou": self.fg_iou, "bg_iou": self.bg_iou, "batch_size_per_image": self.batch_size_per_image,
            "positive_fraction": self.positive_fraction, "box_weights": list(self.box_coder.weights),
            "smooth_l1_beta": self.smooth_l1_beta, "seed": self.seed, "speed_paths": self.head.speed_paths,
        }
