"""The detector: ``FasterRCNN(keras.Model)``, a composer of the parts it is given, and ``build_model(cfg)``, the one
factory that turns a config into a model.

Data path (shape shorthand: ``B`` images, ``Hp x Wp`` padded batch, ``R`` proposals, ``S`` sampled ROIs, ``P`` pooled
size, ``D`` detections)::

    images (B, Hp, Wp, 3) -> transform.normalize -> trunk (ResNet-50 to res4) -> features (B, Hp/16, Wp/16, 1024)
      -> RPN part (head, anchors, proposals [, targets, losses]) -> proposals (B, R, 4)
      -> ROI part ([training: sample S ROIs] -> RoiPoolingConv (B, R or S, P, P, 1024) -> TimeDistributed res5,
         pool, Flatten, Dense -> [training: losses | inference: detections (B, D, ...)])

One model, two paths, chosen by the batch: with ground truth (``gt_boxes``, ``gt_classes``, ``gt_valid``) ``call``
returns the four named losses, without it the detections. Training runs through Keras' own ``fit`` on every backend:
the forward pass computes the losses from the ground truth in the batch, ``compute_loss`` weighs and sums them.

Owns: the composition and the two paths. Must not import the data pipeline, the training job, the tools or any
TensorFlow-only module at import time (``build_model`` picks ``frcnn.tf_distribute``'s subclass under a
``tf.distribute`` strategy, and only then imports it).
"""

import keras
import numpy as np
from keras import ops

from frcnn import replicas
from frcnn.backbone import build_trunk, fold_frozen_batchnorm
from frcnn.config import ConfigError
from frcnn.precision import resolve_policy, speed_paths_on
from frcnn.roi_heads import ROIHeads
from frcnn.rpn import RPN
from frcnn.transform import ImageTransform, to_original

LOSS_NAMES = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
GT_KEYS = ("gt_boxes", "gt_classes", "gt_valid")


@keras.saving.register_keras_serializable(package="frcnn")
class FasterRCNN(keras.Model):
    """ResNet-50-C4 Faster R-CNN from its parts: ``trunk`` (image -> res4 features), ``rpn`` (:class:`RPN`),
    ``roi_heads`` (:class:`ROIHeads`), ``transform`` (:class:`frcnn.transform.ImageTransform`: resizing for
    inference and the input normalisation), ``class_names`` (without background) and the two loss weights.
    :func:`build_model` makes one from a config; ``from_config`` rebuilds one from :meth:`get_config`."""

    def __init__(self, trunk, rpn, roi_heads, transform, class_names, rpn_loss_weight=1.0, roi_loss_weight=1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.trunk, self.rpn, self.roi_heads = trunk, rpn, roi_heads
        self.transform = transform if isinstance(transform, ImageTransform) else ImageTransform(**transform)
        self.class_names = ("__background__",) + tuple(class_names)
        self.num_classes = len(self.class_names)
        self.rpn_loss_weight, self.roi_loss_weight = float(rpn_loss_weight), float(roi_loss_weight)
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES}

    def call(self, inputs, training=False):
        """``{"images", "image_sizes"}`` -> detections in the (resized) input pixels; with ``scales`` (and
        ``original_sizes``) in the batch, boxes in original image pixels (clipped to the image), and ``image_ids``
        passed through. With ``gt_boxes``, ``gt_classes`` and ``gt_valid`` in the batch ->
        ``{"rpn_cls", "rpn_box", "roi_cls", "roi_box"}``."""
        image_sizes = ops.cast(inputs["image_sizes"], "int32")
        features = self.trunk(self.transform.normalize(inputs["images"], image_sizes), training=training)
        gt = {key: inputs[key] for key in GT_KEYS} if all(key in inputs for key in GT_KEYS) else None
        proposals, proposal_valid, losses = self.rpn(features, image_sizes, gt, training=training)
        outputs = self.roi_heads(features, proposals, proposal_valid, image_sizes, gt, training=training)
        if gt is not None:
            return {**losses, **outputs}
        if "scales" in inputs:  # a batch from the pipeline or ImageTransform.prepare_batch: original pixels
            outputs = {**outputs, "boxes": to_original(outputs["boxes"], inputs["scales"],
                                                       inputs.get("original_sizes"))}
        if "image_ids" in inputs:
            outputs = {**outputs, "image_ids": inputs["image_ids"]}
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The weighted sum of the four losses that ``call`` returned for a batch with ground truth."""
        total = (self.rpn_loss_weight * (y_pred["rpn_cls"] + y_pred["rpn_box"])
                 + self.roi_loss_weight * (y_pred["roi_cls"] + y_pred["roi_box"]))
        return total + sum(ops.cast(ops.sum(extra), "float32") for extra in self.losses)  # layers' terms, if any

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        for name in LOSS_NAMES:
            self.loss_trackers[name].update_state(y_pred[name])
        return {metric.name: metric.result() for metric in self.metrics}

    @property
    def metrics(self):  # Keras' total-loss tracker (once compiled), then the four losses
        return [t for t in [getattr(self, "_loss_tracker", None)] if t is not None] + list(self.loss_trackers.values())

    def predict_on_batch(self, x):
        """Keras' ``predict_on_batch`` of the detections: ground truth in the batch is ignored (no losses)."""
        return super().predict_on_batch({k: v for k, v in batch_dict(x).items() if k not in GT_KEYS})

    def fold_batchnorm(self):
        """Fold frozen BatchNorms into their convolutions for inference and export (same outputs to round-off;
        see :func:`frcnn.backbone.fold_frozen_batchnorm`). Returns how many were folded."""
        folded = fold_frozen_batchnorm(self.trunk, self.roi_heads.head.res5.layer)
        if folded:
            self.predict_function = None  # a function traced before would still apply the norms
        return folded

    def build_for_inference(self):
        """Create every variable with a symbolic forward pass (the model takes a dict, not one tensor): no compute,
        the same variables and initial values as a real call."""
        size = 4 * self.rpn.stride
        self({"images": keras.KerasTensor((1, size, size, 3), "float32"),
              "image_sizes": keras.KerasTensor((1, 2), "int32")})
        self.built = True

    def get_config(self):
        parts = {key: keras.saving.serialize_keras_object(getattr(self, key)) for key in ("trunk", "rpn", "roi_heads")}
        return {"name": self.name, **parts, "transform": self.transform.get_config(),
                "class_names": list(self.class_names[1:]), "rpn_loss_weight": self.rpn_loss_weight,
                "roi_loss_weight": self.roi_loss_weight}

    @classmethod
    def from_config(cls, config):
        if "config" in config:  # a .keras archive of frcnn 0.1, which stored the whole Config
            from frcnn.config import config_from_dict

            return build_model(config_from_dict(config["config"], "<saved model config>"), load_weights=False)
        parts = {key: keras.saving.deserialize_keras_object(config[key]) for key in ("trunk", "rpn", "roi_heads")}
        return cls(**{**config, **parts})

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """A trained detector, keras-hub style: ``FasterRCNN.from_preset("detectron2_coco_r50_c4_3x")``, or
        ``detectron2:<zoo name>``, a checkpoint file or a training work directory; ``kwargs`` as
        :func:`frcnn.loading.from_preset` (``config``, ``overrides``, ``score_thresh``)."""
        from frcnn.loading import from_preset  # the loader sits above the model: imported on call

        return from_preset(preset, **kwargs)

    def get_build_config(self):
        return {"forward_pass": True}

    def build_from_config(self, config):
        self.build_for_inference()


def batch_dict(data):
    """The batch dict, also when Keras hands it over as ``(x, y, sample_weight)``."""
    return data[0] if isinstance(data, (tuple, list)) else data


def unpad_detections(out):
    """The padded detections of one batch (``predict_on_batch``) -> one dict per image with its ``boxes``
    (float32), ``scores`` (float32) and ``classes`` (int32) rows, plus ``image_id`` when the batch carried ids."""
    results = []
    for j in range(len(out["num_detections"])):
        n = int(out["num_detections"][j])
        det = {"boxes": np.asarray(out["boxes"][j, :n], np.float32),
               "scores": np.asarray(out["scores"][j, :n], np.float32),
               "classes": np.asarray(out["classes"][j, :n], np.int32)}
        if "image_ids" in out:
            det = {"image_id": int(out["image_ids"][j]), **det}
        results.append(det)
    return results


def build_model(cfg, load_weights=True):
    """The one factory that reads the config: a built :class:`FasterRCNN` with its backbone weights loaded.

    ``cfg.data.classes`` must be set: ``frcnn.data.resolve_classes`` reads it from the data, and the package's
    ``frcnn.build_model`` does that first (the model does not import the data pipeline). With
    ``load_weights=False`` the backbone keeps its random initialisation (used when a full checkpoint follows).
    Under a ``tf.distribute`` strategy the model is ``frcnn.tf_distribute.DistributedFasterRCNN``.
    """
    if cfg.data.classes is None:
        raise ConfigError("data.classes is not set; frcnn.build_model (or frcnn.data.resolve_classes) reads it "
                          "from the data")
    keras.mixed_precision.set_global_policy(resolve_policy(cfg.train.mixed_precision))
    cls = FasterRCNN
    if replicas.in_tf_strategy():
        from frcnn.tf_distribute import DistributedFasterRCNN as cls  # noqa: N813
    model = cls(
        trunk=build_trunk(cfg.model.norm, cfg.model.freeze_at, speed_paths_on(cfg.train.speed_paths)),
        rpn=RPN.from_cfg(cfg),
        roi_heads=ROIHeads.from_cfg(cfg), transform=ImageTransform.from_input_config(cfg.input),
        class_names=cfg.data.classes, rpn_loss_weight=cfg.rpn.loss_weight, roi_loss_weight=cfg.roi_heads.loss_weight,
        name="faster_rcnn",
    )
    model.build_for_inference()
    if load_weights:
        from frcnn import pretrained

        pretrained.load_backbone(model, cfg.model.backbone_weights)
    return model
