"""The detector: ``FasterRCNN(keras.Model)`` and ``build_model(cfg)``, the one place that turns a config into a model.

Data path (shape shorthand: ``B`` images, ``Hp x Wp`` padded batch, ``R`` proposals, ``S`` sampled ROIs, ``P`` pooled
size, ``D`` detections)::

    images (B, Hp, Wp, 3) -> transform.normalize -> trunk (ResNet-50 to res4) -> features (B, Hp/16, Wp/16, 1024)
      -> RPN part (head, anchors, proposals [, targets, losses]) -> proposals (B, R, 4)
      -> ROI part ([training: sample S ROIs] -> RoiPoolingConv (B, R or S, P, P, 1024) -> TimeDistributed res5,
         pool, Flatten, Dense -> [training: losses | inference: detections (B, D, ...)])

One model, two paths, chosen by the batch: with ground truth (``gt_boxes``, ``gt_classes``, ``gt_valid``) ``call``
returns the four named losses, without it the detections. Training runs through Keras' own ``fit`` machinery on
every backend: the forward pass computes the losses from the ground truth in the batch, ``compute_loss`` weighs
and sums them. Everything is ``keras.ops``, so ``train.jit_compile`` compiles the whole step with XLA.
"""

import os
import re
import tempfile

import keras
import numpy as np
from keras import ops

from frcnn import pretrained, transform
from frcnn.backbone import build_trunk, fold_frozen_batchnorm, load_backbone_weights
from frcnn.config import Config, ConfigError, config_from_dict
from frcnn.precision import resolve_policy
from frcnn.replicas import multi_worker, num_replicas, replicas_of
from frcnn.roi_heads import ROIHeads
from frcnn.rpn import RPN

LOSS_NAMES = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
GT_KEYS = ("gt_boxes", "gt_classes", "gt_valid")


def _batch_dict(data):
    """The batch dict, also when Keras hands it over as ``(x, y, sample_weight)`` (``train_on_batch``)."""
    return data[0] if isinstance(data, (tuple, list)) else data


@keras.saving.register_keras_serializable(package="frcnn")
class FasterRCNN(keras.Model):
    """ResNet-50-C4 Faster R-CNN. Build it with :func:`build_model`; ``config`` is a :class:`Config` or its dict."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        cfg = config if isinstance(config, Config) else config_from_dict(config, "<saved model config>")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.class_names = ("__background__",) + tuple(cfg.data.classes)
        self.trunk = build_trunk(cfg.model.norm, cfg.model.freeze_at)
        self.rpn = RPN.from_cfg(cfg)
        self.roi_heads = ROIHeads.from_cfg(cfg)
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES}

    def call(self, inputs, training=False):
        """``{"images", "image_sizes"}`` -> detections in the (resized) input pixels; with ``scales`` (and
        ``original_sizes``) in the batch, boxes in original image pixels (clipped to the image), and ``image_ids``
        passed through. With ``gt_boxes``, ``gt_classes`` and ``gt_valid`` in the batch ->
        ``{"rpn_cls", "rpn_box", "roi_cls", "roi_box"}``."""
        image_sizes = ops.cast(inputs["image_sizes"], "int32")
        features = self.trunk(self.normalize_images(inputs["images"], image_sizes), training=training)
        gt = {key: inputs[key] for key in GT_KEYS} if all(key in inputs for key in GT_KEYS) else None
        proposals, proposal_valid, losses = self.rpn(features, image_sizes, gt, training=training)
        outputs = self.roi_heads(features, proposals, proposal_valid, image_sizes, gt, training=training)
        if gt is not None:
            return {**losses, **outputs}
        if "scales" in inputs:  # a batch from the pipeline or prepare_batch: boxes back to original pixels
            outputs = dict(outputs)
            outputs["boxes"] = transform.to_original(outputs["boxes"], inputs["scales"], inputs.get("original_sizes"))
        if "image_ids" in inputs:
            outputs = {**outputs, "image_ids": inputs["image_ids"]}
        return outputs

    def normalize_images(self, images, image_sizes):
        """A padded uint8/float batch as the trunk takes it (``input.pixel_mean``, ``pixel_std``, ``channel_order``;
        see :func:`frcnn.transform.normalize`)."""
        i = self.cfg.input
        return transform.normalize(images, image_sizes, i.pixel_mean, i.pixel_std, i.channel_order)

    def fold_batchnorm(self):
        """Fold the frozen BatchNorms (``model.norm: frozen``) into their convolutions, for inference and export:
        the same outputs to float round-off, without the norms' per-pixel work. Returns the number folded (0 for
        other norms). Weights saved afterwards still load into an unfolded model (see
        :func:`frcnn.backbone.fold_frozen_batchnorm`)."""
        folded = fold_frozen_batchnorm(self.trunk, self.roi_heads.head.res5.layer)
        if folded:
            # Prediction functions traced before would still apply the norms.
            self.predict_function = None
            self.__dict__.pop("_local_predict", None)
        return folded

    # ---------------------------------------------------------------------------------------------- training

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The weighted sum of the four losses that ``call`` returned for a batch with ground truth.

        Under ``tf.distribute`` each replica sees its share of the global batch and the replicas' gradients are
        summed, so each replica's loss is divided by their number (as Keras' compiled losses do): the update
        follows the global-batch mean."""
        m = self.cfg.model
        total = m.rpn_loss_weight * (y_pred["rpn_cls"] + y_pred["rpn_box"])
        total = total + m.roi_loss_weight * (y_pred["roi_cls"] + y_pred["roi_box"])
        for extra in self.losses:  # regularisation terms added by layers, if any
            total = total + ops.cast(ops.sum(extra), "float32")
        return total / num_replicas()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        for name in LOSS_NAMES:
            self.loss_trackers[name].update_state(y_pred[name])
        logs = {metric.name: metric.result() for metric in self.metrics}
        if multi_worker():
            # Keras 3 averages each logged value over the workers with strategy.reduce("MEAN", value, axis=0),
            # which fails on a scalar (tensorflow/tensorflow#72388): hand it 1-element vectors (it returns scalars).
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs

    @property
    def metrics(self):
        tracker = getattr(self, "_loss_tracker", None)
        return ([tracker] if tracker is not None else []) + list(self.loss_trackers.values())

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 (TensorFlow backend), for a model created under a tf.distribute strategy, takes the first batch of
        # fit/evaluate and averages it over the replicas (strategy.reduce("MEAN")) to build the model symbolically:
        # that fails on our bool (gt_valid) entries. build_model has built every layer already, so there is nothing
        # to build from data; Keras then only builds the optimizer.
        if iterator is not None and all(layer.built for layer in self._flatten_layers()):
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # -------------------------------------------------------------------------------------------- inference

    def predict_on_batch(self, x):
        """Keras' ``predict_on_batch`` (detections of one batch as NumPy arrays, ground truth in the batch ignored),
        also under ``tf.distribute``.

        For a model built under a strategy with several replicas, Keras' ``predict_on_batch`` runs the WHOLE batch
        on every replica and concatenates the copies (each image N times). Such a model predicts here with one
        plain ``tf.function`` outside the strategy: the batch runs once, on the first replica's copy of the
        (identical) weights, with no collective operation, so under multi-worker training the chief can evaluate
        alone. Evaluation therefore uses one device; ``eval.batch_size`` images per call.
        """
        x = {key: value for key, value in _batch_dict(x).items() if key not in GT_KEYS}  # detections, not losses
        if replicas_of(self) == 1:
            return super().predict_on_batch(x)
        import tensorflow as tf

        x = keras.tree.map_structure(tf.convert_to_tensor, x)
        cache = self.__dict__.setdefault("_local_predict", [])  # out of sight of Keras' attribute tracking
        if not cache:
            cache.append(tf.function(lambda batch: self(batch, training=False), reduce_retracing=True))
        return {name: value.numpy() for name, value in cache[0](x).items()}

    def detect(self, images, batch_size=None):
        """Detect objects in a list of ``H x W x 3`` uint8 RGB arrays of any sizes.

        Returns one dict per image: ``boxes`` (N, 4) float32 ``(x1, y1, x2, y2)`` in that image's pixels, ``scores``
        (N,), ``classes`` (N,) int32 class ids (1..C-1) and ``class_names`` (N,) list of str.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise TypeError("detect() takes a list of images; wrap a single HxWx3 array in a list")
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError("detect() needs a non-empty list of HxWx3 uint8 RGB arrays")
        for i, image in enumerate(images):
            image = np.asarray(image) if not isinstance(image, np.ndarray) else image
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image {i} has shape {image.shape}; detect() expects HxWx3 RGB arrays")
            if image.dtype != np.uint8:
                raise TypeError(f"image {i} has dtype {image.dtype}; detect() expects uint8 RGB in [0, 255]")
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise ValueError(f"image {i} is empty (shape {image.shape})")
        batch_size = batch_size or self.cfg.eval.batch_size
        results = []
        for start in range(0, len(images), batch_size):
            out = self.predict_on_batch(self.prepare_batch(images[start:start + batch_size]))
            for det in unpad_detections(out):
                results.append({**det, "class_names": [self.class_names[c] for c in det["classes"]]})
        return results

    def prepare_batch(self, images):
        """Resize and pad a list of images exactly as the ``tf.data`` pipeline does for evaluation
        (:func:`frcnn.transform.prepare_batch`)."""
        return transform.prepare_batch(images, self.cfg.input)

    # ---------------------------------------------------------------------------------------- serialisation

    def build_for_inference(self):
        """Create every variable by running a tiny forward pass (the model takes a dict, not one tensor)."""
        size = 2 * self.cfg.model.feature_stride * 2
        dummy = {"images": np.zeros((1, size, size, 3), np.float32), "image_sizes": np.array([[size, size]], np.int32)}
        self(dummy, training=False)
        self.built = True

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras' ``load_weights``; also reads ``.weights.h5`` checkpoints written before the model was split into
        RPN and ROI parts, or before frozen norms were FrozenBatchNormalization layers (their variable paths are
        renamed on the fly)."""
        legacy = _legacy_weights(filepath, self.cfg.model.norm == "frozen")
        if legacy is None:
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        try:
            return super().load_weights(legacy, skip_mismatch=skip_mismatch, **kwargs)
        finally:
            os.remove(legacy)

    def get_config(self):
        return {"name": self.name, "config": self.cfg.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def get_build_config(self):
        return {"forward_pass": True}

    def build_from_config(self, config):
        self.build_for_inference()


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
    """
    if cfg.data.classes is None:
        raise ConfigError("data.classes is not set; frcnn.build_model (or frcnn.data.resolve_classes) reads it "
                          "from the data")
    keras.mixed_precision.set_global_policy(resolve_policy(cfg.train.mixed_precision))
    model = FasterRCNN(cfg, name="faster_rcnn")
    model.build_for_inference()
    if load_weights:
        weights = cfg.model.backbone_weights
        if pretrained.is_detectron2_spec(weights):
            pretrained.load_initial_weights(model, weights)  # R-50.pkl or a zoo detector's trunk, RPN and res5
        else:
            load_backbone_weights(weights, model.trunk, model.roi_heads.head.res5.layer)
    return model


# Checkpoints written before the RPN and ROI parts existed: old variable path prefix -> new one.
_LEGACY_PATHS = (
    ("layers/rpn_head/", "layers/rpn/head/"),
    ("layers/roi_head/", "layers/roi_heads/head/"),
)
# Keras names a layer's variables in a weights file after its class: frozen norms were plain BatchNormalization
# layers before FrozenBatchNormalization (frcnn.backbone) existed. Same order, so the same counters.
_PLAIN_BN = re.compile(r"(^|/)batch_normalization(_\d+)?(?=/)")


def _legacy_weights(filepath, frozen_norm):
    """A temporary copy of an old-layout ``.weights.h5`` with today's variable paths, or None when the file needs
    none (or is not a ``.weights.h5``). Old layouts: the RPN and ROI heads before they became parts, and (for a
    model whose norms are frozen) frozen norms saved as plain BatchNormalization."""
    path = os.fspath(filepath)
    if not path.endswith(".weights.h5") or not os.path.isfile(path):
        return None
    import h5py

    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        parts = "layers/rpn_head" in f
        norms = frozen_norm and any(_PLAIN_BN.search(name) for name in names)
        if not (parts or norms):
            return None
        fd, tmp = tempfile.mkstemp(suffix=".weights.h5")  # not beside the checkpoint: its folder may be read-only
        os.close(fd)
        with h5py.File(tmp, "w") as out:
            for key, value in f.attrs.items():
                out.attrs[key] = value
            for name in names:
                new = name
                for old, prefix in _LEGACY_PATHS:
                    if new.startswith(old):
                        new = prefix + new[len(old):]
                if norms:
                    new = _PLAIN_BN.sub(r"\1frozen_batch_normalization\2", new)
                out.create_dataset(new, data=f[name][()])
    return tmp
