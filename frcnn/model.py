"""The detector: ``FasterRCNN(keras.Model)`` and ``build_model(cfg)``, the one place that turns a config into a model.

Data path (shape shorthand: ``B`` images, ``Hp x Wp`` padded batch, ``A`` anchors, ``R`` proposals, ``S`` sampled
ROIs, ``P`` pooled size, ``C`` classes with background, ``D`` detections)::

    images (B, Hp, Wp, 3) -> trunk (ResNet-50 to res4) -> features (B, Hp/16, Wp/16, 1024)
      -> RPN head -> rpn_logits (B, A), rpn_deltas (B, A, 4) -> ProposalLayer -> proposals (B, R, 4)
      -> [training: sample_rois against the ground truth -> rois (B, S, 4)]
      -> RoiPoolingConv -> (B, R or S, P, P, 1024) -> ROIHead (TimeDistributed res5, pool, Flatten, Dense)
      -> [training: losses | inference: DetectionLayer -> boxes (B, D, 4), scores, classes, num_detections]

One model, two paths: ``train_step`` returns named losses, ``predict_step`` / ``detect`` return detections; no
forward pass runs twice. Everything a training step needs (anchor labels, ROI sampling, losses) is computed in the
graph, inside ``train_step``.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from frcnn import anchors as anchor_lib
from frcnn.backbone import CAFFE_BGR_MEAN, build_trunk, load_backbone_weights
from frcnn.config import Config, config_from_dict
from frcnn.data.pipeline import padded_side, resize_params
from frcnn.heads import ROIHead, RPNHead
from frcnn.layers import DetectionLayer, ProposalLayer, RoiPoolingConv
from frcnn.losses import roi_losses, rpn_losses
from frcnn.targets import rpn_targets, sample_rois
from frcnn.training import num_workers, sync_replica_gradients

LOSS_NAMES = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")


def preprocess(images, image_sizes):
    """RGB ``[0, 255]`` float images -> BGR minus the ImageNet mean (Keras' ResNet-50 "caffe" convention).

    Pixels of the batch padding (outside each image's true ``(height, width)``) are set to 0 *after* mean
    subtraction, so padding looks like an average pixel rather than a dark border.
    """
    images = tf.cast(images, tf.float32)
    bgr = images[..., ::-1] - tf.constant(CAFFE_BGR_MEAN, tf.float32)
    shape = tf.shape(images)
    rows = tf.range(shape[1])[None, :, None] < image_sizes[:, 0][:, None, None]
    cols = tf.range(shape[2])[None, None, :] < image_sizes[:, 1][:, None, None]
    inside = tf.cast(tf.logical_and(rows, cols), tf.float32)[..., None]
    return bgr * inside


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
        m = cfg.model
        self.num_classes = cfg.num_classes
        self.class_names = ("__background__",) + tuple(cfg.data.classes)
        self.trunk = build_trunk(m.norm, m.freeze_at)
        self.rpn_head = RPNHead(
            anchor_lib.num_anchors_per_location(m.anchor_sizes, m.anchor_ratios), m.rpn_channels, name="rpn"
        )
        self.proposal_layer = ProposalLayer(
            pre_nms_topk_train=m.rpn_pre_nms_topk_train,
            post_nms_topk_train=m.rpn_post_nms_topk_train,
            pre_nms_topk_test=m.rpn_pre_nms_topk_test,
            post_nms_topk_test=m.rpn_post_nms_topk_test,
            nms_thresh=m.rpn_nms_thresh,
            min_size=m.rpn_min_size,
            box_weights=m.rpn_box_weights,
            name="proposals",
        )
        self.roi_pooling = RoiPoolingConv(m.pool_size, m.feature_stride, m.sampling_ratio, name="roi_pooling")
        self.roi_head = ROIHead(self.num_classes, m.norm, name="roi_head")
        self.detection_layer = DetectionLayer(
            self.num_classes,
            score_thresh=m.score_thresh,
            nms_thresh=m.nms_thresh,
            max_detections=m.max_detections,
            box_weights=m.roi_box_weights,
            name="detections",
        )
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES + ("loss",)}

    # ---------------------------------------------------------------------------------------------- forward

    def _rpn(self, images, image_sizes, training):
        m = self.cfg.model
        features = self.trunk(preprocess(images, image_sizes), training=training)
        rpn_logits, rpn_deltas = self.rpn_head(features)
        shape = tf.shape(features)
        anchors = anchor_lib.grid_anchors(shape[1], shape[2], m.feature_stride, m.anchor_sizes, m.anchor_ratios)
        return features, rpn_logits, rpn_deltas, anchors

    def _roi_head(self, pooled, training):
        return self.roi_head(pooled, training=training)

    def _xla(self, name, fn):
        """``fn``, compiled with XLA (``tf.function(jit_compile=True)``) when ``train.jit_compile`` is on.

        XLA cannot compile the whole training step: ``CropAndResize`` (RoIAlign) and the NMS ops have no XLA kernel,
        so Keras' ``compile(jit_compile=True)`` is refused for this model (``supports_jit = False`` on those layers).
        ``train.jit_compile`` compiles the parts that can be: trunk + RPN head (``_rpn``) and the ROI head (res5 +
        Dense), forward and backward; proposals, RoIAlign, targets and losses run as usual around them. Used by the
        loss path only (``train_step`` / ``test_step``); inference and export are unchanged. XLA compiles once per
        input shape: ``input.fixed_size`` avoids recompiling for every new padded batch size.
        """
        if not self.cfg.train.jit_compile or not self.built:
            return fn
        return self._function("xla_" + name, fn, jit_compile=True)

    def _function(self, name, fn, jit_compile=False):
        # Kept in __dict__, out of sight of Keras' attribute tracking and of tf.saved_model's function discovery.
        cache = self.__dict__.setdefault("_compiled_functions", {})
        if name not in cache:
            cache[name] = tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)
        return cache[name]

    def call(self, inputs, training=False):
        """Inference: ``{"images", "image_sizes"}`` -> detections in the (resized) input pixels."""
        images, image_sizes = inputs["images"], tf.cast(inputs["image_sizes"], tf.int32)
        features, rpn_logits, rpn_deltas, anchors = self._rpn(images, image_sizes, False)
        proposals, proposal_valid = self.proposal_layer(
            [rpn_logits, rpn_deltas, anchors, image_sizes], training=False
        )
        pooled = self.roi_pooling([features, proposals])
        class_probs, box_deltas = self.roi_head(pooled, training=False)
        return self.detection_layer([class_probs, box_deltas, proposals, proposal_valid, image_sizes])

    def compute_losses(self, batch, training=True):
        """The four named losses of one batch (see ``docs/CONTRACTS.md`` for the batch format)."""
        m = self.cfg.model
        image_sizes = tf.cast(batch["image_sizes"], tf.int32)
        gt_boxes = tf.cast(batch["gt_boxes"], tf.float32)
        gt_classes = tf.cast(batch["gt_classes"], tf.int32)
        gt_valid = tf.cast(batch["gt_valid"], tf.bool)
        rpn = self._xla("rpn", self._rpn)
        features, rpn_logits, rpn_deltas, anchors = rpn(batch["images"], image_sizes, training)
        rpn_labels, rpn_box_targets = rpn_targets(
            anchors, gt_boxes, gt_valid, image_sizes,
            fg_iou=m.rpn_fg_iou, bg_iou=m.rpn_bg_iou, batch_size_per_image=m.rpn_batch_size_per_image,
            positive_fraction=m.rpn_positive_fraction, box_weights=m.rpn_box_weights,
        )
        # Proposals are a stop-gradient input to the second stage (approximate joint training): the ROI losses do
        # not differentiate through the box coordinates, only through the pooled features.
        proposals, proposal_valid = self.proposal_layer(
            [rpn_logits, rpn_deltas, anchors, image_sizes], training=True
        )
        rois, roi_classes, roi_box_targets, roi_valid = sample_rois(
            proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, m.num_rois,
            positive_fraction=m.roi_positive_fraction, fg_iou=m.roi_fg_iou, bg_iou_low=m.roi_bg_iou_low,
            box_weights=m.roi_box_weights,
        )
        pooled = self.roi_pooling([features, rois])
        class_probs, box_deltas = self._xla("roi_head", self._roi_head)(pooled, training)
        losses = rpn_losses(rpn_logits, rpn_deltas, rpn_labels, rpn_box_targets, beta=m.rpn_smooth_l1_beta)
        losses.update(
            roi_losses(class_probs, box_deltas, roi_classes, roi_box_targets, roi_valid, beta=m.roi_smooth_l1_beta)
        )
        return losses

    def _total_loss(self, losses):
        m = self.cfg.model
        total = m.rpn_loss_weight * (losses["rpn_cls"] + losses["rpn_box"])
        total += m.roi_loss_weight * (losses["roi_cls"] + losses["roi_box"])
        if self.losses:  # regularisation terms added by layers, if any
            total += tf.add_n([tf.cast(x, tf.float32) for x in self.losses])
        return total

    def _record(self, losses, total):
        for name in LOSS_NAMES:
            self.loss_trackers[name].update_state(losses[name])
        self.loss_trackers["loss"].update_state(total)
        logs = {name: tracker.result() for name, tracker in self.loss_trackers.items()}
        if num_workers(tf.distribute.get_strategy()) > 1:
            # Keras 3 averages each logged value over the workers with strategy.reduce("MEAN", value, axis=0),
            # which fails on a scalar (tensorflow/tensorflow#72388): hand it 1-element vectors (it returns scalars).
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 (TensorFlow backend), for a model created under a tf.distribute strategy, takes the first batch of
        # fit/evaluate and averages it over the replicas (strategy.reduce("MEAN")) to build the model symbolically:
        # that fails on our bool (gt_valid) entries. build_model has built every layer already, so there is nothing
        # to build from data; Keras then only builds the optimizer.
        if iterator is not None and all(layer.built for layer in self._flatten_layers()):
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data):
        data = _batch_dict(data)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(data, training=True)
            total = self._total_loss(losses)
            # Under tf.distribute each replica sees its share of the global batch and the optimizer sums the
            # replicas' gradients, so each replica's loss is divided by their number: a global-batch mean (as
            # Keras' own train_step does). scale_loss multiplies by the loss scale under mixed_float16 (compile
            # wraps the optimizer in a LossScaleOptimizer, whose apply divides it out again), else by 1.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(sync_replica_gradients(grads, self.optimizer), variables)
        return self._record(losses, total)

    def test_step(self, data):
        data = _batch_dict(data)
        losses = self.compute_losses(data, training=False)
        return self._record(losses, self._total_loss(losses))

    def predict_step(self, data):
        """Detections for a batch; with ``scales`` in the batch, boxes are mapped back to original image pixels."""
        data = _batch_dict(data)
        out = dict(self(data, training=False))
        if "scales" in data:
            scales = tf.cast(data["scales"], tf.float32)
            out["boxes"] = out["boxes"] / scales[:, None, None]
        if "image_ids" in data:
            out["image_ids"] = data["image_ids"]
        return out

    # -------------------------------------------------------------------------------------------- inference

    def predict_on_batch(self, x):
        """Keras' ``predict_on_batch`` (detections of one batch as NumPy arrays), also under ``tf.distribute``.

        For a model built under a strategy with several replicas, Keras' ``predict_on_batch`` runs the WHOLE batch
        on every replica and concatenates the copies (each image N times). Such a model predicts here with one
        plain ``tf.function`` outside the strategy: the batch runs once, on the first replica's copy of the
        (identical) weights, with no collective operation, so under multi-worker training the chief can evaluate
        alone. Evaluation therefore uses one device; ``eval.batch_size`` images per call.
        """
        if self.distribute_strategy.num_replicas_in_sync == 1:
            return super().predict_on_batch(x)
        x = keras.tree.map_structure(tf.convert_to_tensor, _batch_dict(x))
        out = self._function("local_predict", self.predict_step)(x)
        return {name: value.numpy() for name, value in out.items()}

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
            batch = self.prepare_batch(images[start:start + batch_size])
            out = self.predict_on_batch(batch)
            for j, image in enumerate(images[start:start + batch_size]):
                n = int(out["num_detections"][j])
                # Clip to the original image: rounding of the resized size can put a box edge < 1 px outside.
                h, w = image.shape[:2]
                boxes = np.minimum(np.asarray(out["boxes"][j, :n], np.float32), np.float32([w, h, w, h]))
                classes = np.asarray(out["classes"][j, :n], np.int32)
                results.append({
                    "boxes": boxes,
                    "scores": np.asarray(out["scores"][j, :n], np.float32),
                    "classes": classes,
                    "class_names": [self.class_names[c] for c in classes],
                })
        return results

    def prepare_batch(self, images):
        """Resize (shorter side ``input.min_size``, longer at most ``input.max_size``) and pad a list of images,
        exactly as the ``tf.data`` pipeline does for evaluation."""
        cfg = self.cfg.input
        resized, sizes, scales = [], [], []
        for image in images:
            scale, nh, nw = resize_params(image.shape[0], image.shape[1], cfg.test_min_size, cfg.max_size)
            resized.append(tf.image.resize(tf.convert_to_tensor(image, tf.float32), (nh, nw)).numpy())
            sizes.append((nh, nw))
            scales.append(scale)
        if cfg.fixed_size:
            ph = pw = padded_side(cfg.size_divisibility, cfg.max_size)
        else:
            ph = padded_side(cfg.size_divisibility, max(s[0] for s in sizes))
            pw = padded_side(cfg.size_divisibility, max(s[1] for s in sizes))
        batch = np.zeros((len(images), ph, pw, 3), np.float32)
        for i, image in enumerate(resized):
            batch[i, : image.shape[0], : image.shape[1]] = image
        # One scale per image (as in the tf.data pipeline); rounding the resized size moves boxes by < 0.5 px.
        return {
            "images": batch,
            "image_sizes": np.asarray(sizes, np.int32),
            "scales": np.asarray(scales, np.float32),
        }

    # ---------------------------------------------------------------------------------------- serialisation

    def build_for_inference(self):
        """Create every variable by running a tiny forward pass (the model takes a dict, not one tensor)."""
        size = 2 * self.cfg.model.feature_stride * 2
        dummy = {"images": tf.zeros((1, size, size, 3)), "image_sizes": tf.constant([[size, size]], tf.int32)}
        self(dummy, training=False)
        self.built = True

    def get_config(self):
        return {"name": self.name, "config": self.cfg.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def get_build_config(self):
        return {"forward_pass": True}

    def build_from_config(self, config):
        self.build_for_inference()


def build_model(cfg, load_weights=True):
    """The one factory that reads the config: a built :class:`FasterRCNN` with its backbone weights loaded.

    ``cfg.data.classes`` must be set (``frcnn.data.resolve_classes`` reads it from the data). With
    ``load_weights=False`` the backbone keeps its random initialisation (used when a full checkpoint follows).
    """
    if cfg.data.classes is None:
        from frcnn.data import resolve_classes  # the data readers know where the class list lives

        cfg = resolve_classes(cfg)
    policy = {"off": "float32"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision)
    keras.mixed_precision.set_global_policy(policy)
    model = FasterRCNN(cfg, name="faster_rcnn")
    model.build_for_inference()
    if load_weights:
        load_backbone_weights(cfg.model.backbone_weights, model.trunk, model.roi_head.res5.layer)
    return model
