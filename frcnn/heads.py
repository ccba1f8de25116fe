"""The RPN head and the per-ROI head (res5, pooling, Flatten, class and box Dense layers under TimeDistributed).

Shape shorthand: ``B`` images, ``H x W`` res4 feature map, ``A`` anchors per location, ``N`` ROIs per image,
``P`` pooled size (14), ``C`` classes including background.
"""

import keras
from keras import layers, ops

from frcnn.backbone import Conv2D, build_res5


@keras.saving.register_keras_serializable(package="frcnn")
class TimeDistributed(layers.TimeDistributed):
    """``keras.layers.TimeDistributed`` that folds the time axis into the batch: ``(B, N, ...) -> (B * N, ...)``.

    Keras 3's own ``TimeDistributed`` calls the wrapped layer once per time step (a Python loop of ``N`` calls
    when ``N`` is static, ``vectorized_map`` otherwise). For the ROI head that would be a loop over ROIs. Every
    layer wrapped here treats samples independently (convolutions, per-sample normalisation, Dense), so one call on
    the folded batch computes the same thing with the same weights, in one large op per layer.
    """

    def call(self, inputs, training=None, mask=None):
        shape = ops.shape(inputs)
        batch, steps = shape[0], shape[1]
        folded = ops.reshape(inputs, (-1,) + tuple(inputs.shape[2:]))
        kwargs = {"training": training} if self.layer._call_has_training_arg else {}
        outputs = self.layer(folded, **kwargs)
        out_shape = tuple(outputs.shape[1:])
        if any(d is None for d in out_shape):
            out_shape = tuple(ops.shape(outputs)[1:])
        return ops.reshape(outputs, (batch, steps) + out_shape)


@keras.saving.register_keras_serializable(package="frcnn")
class RPNHead(layers.Layer):
    """3x3 conv + ReLU, then 1x1 convs for ``A`` objectness logits and ``A * 4`` box deltas per location.

    Returns ``rpn_logits (B, H*W*A)`` and ``rpn_deltas (B, H*W*A, 4)`` in the anchor order of :mod:`frcnn.anchors`.
    """

    def __init__(self, num_anchors, channels=1024, speed_paths=True, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = num_anchors
        self.channels = channels
        init = keras.initializers.RandomNormal(stddev=0.01)
        # speed_paths: in training its kernel gradient is a matrix product (measured on a CPU with native bfloat16,
        # train.speed_paths; docs/NOTES.md).
        self.speed_paths = bool(speed_paths)
        self.conv = Conv2D(channels, 3, padding="same", activation="relu", kernel_initializer=init,
                           matmul_form="kernel_grad" if speed_paths else "none", name="rpn_conv")
        self.objectness = layers.Conv2D(num_anchors, 1, kernel_initializer=init, name="rpn_cls")
        self.deltas = layers.Conv2D(num_anchors * 4, 1, kernel_initializer=init, name="rpn_box")

    def build(self, input_shape):
        self.conv.build(input_shape)
        hidden = tuple(input_shape[:-1]) + (self.channels,)
        self.objectness.build(hidden)
        self.deltas.build(hidden)

    def call(self, features):
        x = self.conv(features)
        batch = ops.shape(features)[0]
        logits = ops.reshape(self.objectness(x), (batch, -1))
        deltas = ops.reshape(self.deltas(x), (batch, -1, 4))
        # Losses and proposal decoding run in float32 under mixed precision.
        return ops.cast(logits, "float32"), ops.cast(deltas, "float32")

    def get_config(self):
        return {**super().get_config(), "num_anchors": self.num_anchors, "channels": self.channels,
                "speed_paths": self.speed_paths}


@keras.saving.register_keras_serializable(package="frcnn")
class ROIHead(layers.Layer):
    """Per-ROI head: ``TimeDistributed`` res5 -> average pool to 1x1 (``pooling="avg"``, or none) ->
    ``TimeDistributed(Flatten)`` -> Dense heads.

    Input ``(B, N, P, P, 1024)`` pooled ROI features; outputs ``class_logits (B, N, C)`` (no softmax: the loss
    takes the log-softmax of the logits, detections the softmax, both in float32) and ``box_deltas (B, N, 4 * (C -
    1))`` (class-specific, classes 1..C-1). One set of weights serves every ROI and
    each ROI is processed on its own (see :class:`TimeDistributed`; with ``norm='batch'`` res5's statistics
    in training are the exception, which is why ``frozen`` is the default for fine-tuning).
    """

    def __init__(self, num_classes, norm="frozen", pooling="avg", speed_paths=True, **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("avg", "none"):
            raise ValueError(f"pooling must be 'avg' or 'none', got {pooling!r}")
        self.num_classes = num_classes
        self.norm = norm
        self.pooling = pooling
        self.speed_paths = bool(speed_paths)
        self.res5 = TimeDistributed(build_res5(norm, self.speed_paths), name="res5")
        # avg: res5's map is averaged to 1x1 (Detectron2's C4 head; its checkpoints expect 2048 inputs). none: the
        # Dense layers see the whole ceil(P/2) x ceil(P/2) x 2048 map, where the object sits in the ROI included.
        self.pool = None
        if pooling == "avg":
            self.pool = TimeDistributed(layers.GlobalAveragePooling2D(keepdims=True), name="avg_pool")
        self.flatten = TimeDistributed(layers.Flatten(), name="flatten")
        # Class logits and box deltas are float32 under mixed precision: they feed the losses and box decoding. The
        # wrapper keeps its old name "class_probs" (from when the layer ended in a softmax).
        self.cls = TimeDistributed(
            layers.Dense(num_classes, dtype="float32",
                         kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), name="cls_score"),
            name="class_probs",
        )
        self.box = TimeDistributed(
            layers.Dense(4 * (num_classes - 1), dtype="float32",
                         kernel_initializer=keras.initializers.RandomNormal(stddev=0.001), name="bbox_pred"),
            name="box_deltas",
        )

    def build(self, input_shape):
        self.res5.build(input_shape)
        res5_shape = self.res5.compute_output_shape(input_shape)  # (B, N, P', P', 2048)
        if self.pool is not None:
            self.pool.build(res5_shape)
            pooled = tuple(res5_shape[:-3]) + (1, 1, res5_shape[-1])
        else:
            pooled = tuple(res5_shape)
        self.flatten.build(pooled)
        self.cls.build(self.flatten.compute_output_shape(pooled))
        self.box.build(self.flatten.compute_output_shape(pooled))

    def call(self, pooled, training=None):
        x = self.res5(pooled, training=training)
        if self.pool is not None:
            x = self.pool(x)
        x = self.flatten(x)
        return self.cls(x), self.box(x)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "norm": self.norm, "pooling": self.pooling,
                "speed_paths": self.speed_paths}
