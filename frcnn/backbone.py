"""ResNet-50 for the C4 detector: the trunk to res4 (stride 16, 1024 channels) and the res5 stage.

The network is Keras' ResNet-50 (v1: stride in the first 1x1 convolution of a stage, biases on every convolution),
built here with exactly the layer names of ``keras.applications.ResNet50`` (``conv1_conv``, ``conv4_block6_out``,
``conv5_block1_0_conv``, ...) so that its ImageNet weights carry over by name into both parts. Building it here,
rather than cutting ``keras.applications.ResNet50`` apart, lets the normalisation layer be chosen:

- ``frozen``: BatchNormalization with ``trainable=False``, i.e. fixed statistics and affine parameters (inference
  mode even during training). The standard choice when fine-tuning from ImageNet at detection batch sizes.
- ``batch``: BatchNormalization that trains. In res5, which runs per ROI, its statistics span all ROIs of the batch.
- ``group``: GroupNormalization(32), per sample; trains from scratch at any batch size (Wu & He, 2018).

Weights (``model.backbone_weights``): ``imagenet`` (Keras' own download, cached in ``~/.keras/models``), a path to
a Keras ResNet-50 weights file (``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``, e.g. under ``weights/``),
or ``none`` (random initialisation).
"""

import logging
import os

import keras
import numpy as np
from keras import layers

from frcnn import ops as frcnn_ops

log = logging.getLogger(__name__)

BN_EPSILON = 1.001e-5  # keras.applications' value, so ImageNet statistics mean the same thing
IMAGENET_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"

# Stages: (name, filters of the bottleneck, blocks, stride of the first block)
STAGES = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
TRUNK_CHANNELS = 1024


class BackboneWeightsError(RuntimeError):
    """Backbone weights that cannot be loaded; the message says which file and how to fix it."""


@keras.saving.register_keras_serializable(package="frcnn")
class FrozenBatchNormalization(layers.BatchNormalization):
    """BatchNormalization with fixed statistics and affine parameters (``model.norm: frozen``).

    Its variables are BatchNormalization's, in the same order and under the same names, so Keras' ImageNet weights,
    Detectron2's conversion and older checkpoints load unchanged. It differs in two ways, both for speed:

    - it applies ``x * scale + shift`` with ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``
      computed once from the float32 variables and cast to the compute dtype: under ``mixed_bfloat16`` that is one
      multiply-add in bfloat16 on the (large) activation, instead of Keras' cast of the whole tensor to float32,
      normalisation there and cast back;
    - :func:`fold_frozen_batchnorm` can fold it into the convolution before it, after which it does nothing at all
      (``folded``).
    """

    def __init__(self, folded=False, **kwargs):
        super().__init__(**kwargs)
        self.trainable = False  # Keras 3 runs a non-trainable BatchNormalization in inference mode, even in fit()
        self.folded = bool(folded)

    def call(self, inputs, training=None, mask=None):
        if self.folded:
            return inputs
        scale = self.gamma * keras.ops.rsqrt(self.moving_variance + self.epsilon)
        shift = self.beta - self.moving_mean * scale
        return inputs * keras.ops.cast(scale, inputs.dtype) + keras.ops.cast(shift, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "folded": self.folded}


def fold_frozen_batchnorm(*models):
    """Fold every :class:`FrozenBatchNormalization` of ``models`` into the ``Conv2D`` that feeds it (for inference and
    export: the norm's multiply-add disappears from the graph). Returns the number of norms folded.

    The convolution absorbs the norm (``kernel * scale``, ``bias * scale + shift``) and the norm's own variables are
    set to the identity (gamma 1, beta 0, mean 0, variance ``1 - epsilon``), so the weights stay correct whether or
    not a model applies the norm: a checkpoint saved after folding loads into an unfolded model and gives the same
    outputs. Call it before the first prediction: functions traced earlier keep the norm.
    """
    folded = 0
    for model in models:
        for layer in model.layers:
            if not isinstance(layer, FrozenBatchNormalization) or layer.folded:
                continue
            # Every norm here directly follows the convolution of the same name (``<name>_conv`` -> ``<name>_bn``,
            # see _bottleneck and build_trunk); that convolution feeds nothing else.
            conv = model.get_layer(layer.name[: -len("_bn")] + "_conv")
            gamma, beta, mean, var = (np.asarray(v, np.float64) for v in layer.get_weights())
            scale = gamma / np.sqrt(var + layer.epsilon)
            kernel, bias = (np.asarray(v, np.float64) for v in conv.get_weights())
            conv.set_weights([kernel * scale, bias * scale + beta - mean * scale])
            layer.set_weights([np.ones_like(gamma), np.zeros_like(beta), np.zeros_like(mean),
                               np.full_like(var, 1.0 - layer.epsilon)])
            layer.folded = True
            folded += 1
    return folded


@keras.saving.register_keras_serializable(package="frcnn")
class Conv2D(layers.Conv2D):
    """``keras.layers.Conv2D`` (the same variables, the same outputs), optionally computed in training as matrix
    products.

    With ``matmul_form="all"`` (the ROI head's res5: many small maps, ROIs x 7 x 7), a training call computes 1x1
    convolutions as :func:`frcnn.ops.pointwise_conv`, a matrix product over channels in both directions, and
    stride-1 "same" convolutions with the backend's forward pass and input gradient but their kernel gradient as one
    matrix product (:func:`frcnn.ops.conv_with_matmul_kernel_grad`). ``"kernel_grad"`` (the RPN's 3x3 conv) does
    only the latter; ``"none"`` (the trunk) is Keras' convolution throughout. Why: on a CPU with native
    bfloat16, oneDNN's bfloat16 kernel gradient for such shapes ran well below the rate of its forward pass and of
    a matrix product (figures in docs/NOTES.md). A speed path measured on a CPU only: ``train.speed_paths`` turns it
    off elsewhere. Inference keeps Keras' convolution, which the backend fuses with the bias and the activation; so
    does the trunk, whose few large maps have a fast kernel gradient.

    The class keeps Keras' name so that checkpoints name its variables as before (Keras derives weight-file paths
    from the class name).
    """

    def __init__(self, *args, matmul_form=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_form = _matmul_mode(matmul_form)

    def call(self, inputs, training=None):
        outputs = self._matmul_convolution(inputs) if training and self.matmul_form != "none" else None
        if outputs is None:
            return super().call(inputs)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs) if self.activation is not None else outputs

    def _matmul_convolution(self, inputs):
        """The convolution in matrix-product form, or ``None`` where this layer's settings have none."""
        if self.data_format != "channels_last" or self.groups != 1 or max(self.dilation_rate) != 1:
            return None
        size, strides = tuple(self.kernel_size), tuple(self.strides)
        if size == (1, 1) and strides[0] == strides[1]:
            if self.matmul_form != "all":
                return None
            return frcnn_ops.pointwise_conv(inputs, self.kernel, strides[0])
        if strides == (1, 1) and self.padding == "same" and size[0] == size[1] and size[0] % 2 == 1:
            return frcnn_ops.conv_with_matmul_kernel_grad(inputs, self.kernel)
        return None

    def get_config(self):
        return {**super().get_config(), "matmul_form": self.matmul_form}


@keras.saving.register_keras_serializable(package="frcnn")
class GroupNormalization(layers.GroupNormalization):
    """``keras.layers.GroupNormalization`` (the same variables, the same outputs to float round-off), with
    ``written_gradient`` computed by :func:`frcnn.ops.group_norm`: float32 statistics, one multiply-add per element
    in the compute dtype and a written-out gradient, instead of Keras' float32 copy of the activation and a gradient
    derived through the reductions (faster forwards and backwards on the development CPU: docs/NOTES.md; a speed
    path, ``train.speed_paths``). Channels-last with ``scale`` and ``center`` (how the trunk uses it); other settings
    fall back to Keras'. The class keeps Keras' name, so checkpoints name its variables as before."""

    def __init__(self, *args, written_gradient=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.written_gradient = bool(written_gradient)

    def call(self, inputs):
        if (not self.written_gradient or self.axis not in (-1, len(inputs.shape) - 1) or len(inputs.shape) != 4
                or not (self.scale and self.center)):
            return super().call(inputs)
        outputs = frcnn_ops.group_norm(inputs, self.gamma, self.beta, self.groups, self.epsilon)
        return keras.ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "written_gradient": self.written_gradient}


MATMUL_MODES = ("none", "kernel_grad", "all")


def _matmul_mode(value):
    """``matmul_form`` as one of :data:`MATMUL_MODES` (``True``/``False``, as older configs saved it, are ``all``
    and ``none``)."""
    if value is True or value is False:
        return "all" if value else "none"
    if value not in MATMUL_MODES:
        raise ValueError(f"matmul_form must be one of {MATMUL_MODES} (or a bool), got {value!r}")
    return value


def _norm(kind, name, zero_init=False, speed_paths=True):
    gamma = "zeros" if zero_init else "ones"
    if kind == "group":
        return GroupNormalization(groups=32, epsilon=1e-5, gamma_initializer=gamma, written_gradient=speed_paths,
                                  name=name)
    if kind == "frozen":
        return FrozenBatchNormalization(axis=-1, epsilon=BN_EPSILON, gamma_initializer=gamma, name=name)
    return layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, gamma_initializer=gamma, name=name)


def _conv(filters, kernel, name, strides=1, padding="valid", matmul_form="none"):
    return Conv2D(filters, kernel, strides=strides, padding=padding, kernel_initializer="he_normal",
                  matmul_form=matmul_form, name=name)


def _bottleneck(x, filters, stride, shortcut_conv, name, norm, matmul_form="none", speed_paths=True):
    # Zero-initialised last norm gamma makes each residual block start as the identity: the standard trick that
    # lets a deep ResNet train from scratch. Only for norms that train; frozen ones keep gamma = 1.
    zero_last = norm != "frozen"
    if shortcut_conv:
        shortcut = _conv(4 * filters, 1, name + "_0_conv", strides=stride, matmul_form=matmul_form)(x)
        shortcut = _norm(norm, name + "_0_bn", speed_paths=speed_paths)(shortcut)
    else:
        shortcut = x
    x = _conv(filters, 1, name + "_1_conv", strides=stride, matmul_form=matmul_form)(x)
    x = _norm(norm, name + "_1_bn", speed_paths=speed_paths)(x)
    x = layers.Activation("relu", name=name + "_1_relu")(x)
    x = _conv(filters, 3, name + "_2_conv", padding="same", matmul_form=matmul_form)(x)
    x = _norm(norm, name + "_2_bn", speed_paths=speed_paths)(x)
    x = layers.Activation("relu", name=name + "_2_relu")(x)
    x = _conv(4 * filters, 1, name + "_3_conv", matmul_form=matmul_form)(x)
    x = _norm(norm, name + "_3_bn", zero_init=zero_last, speed_paths=speed_paths)(x)
    x = layers.Add(name=name + "_add")([shortcut, x])
    return layers.Activation("relu", name=name + "_out")(x)


def _stage(x, stage, norm, matmul_form="none", speed_paths=True):
    name, filters, blocks, stride = stage
    x = _bottleneck(x, filters, stride, True, f"{name}_block1", norm, matmul_form, speed_paths)
    for i in range(2, blocks + 1):
        x = _bottleneck(x, filters, 1, False, f"{name}_block{i}", norm, matmul_form, speed_paths)
    return x


def build_trunk(norm="frozen", freeze_at=2, speed_paths=True):
    """ResNet-50 from the (already preprocessed) image to res4: ``(B, H, W, 3) -> (B, ceil(H/16), ceil(W/16), 1024)``.

    ``freeze_at``: 0 trains everything, 1 freezes the stem (conv1), 2 the stem and res2, 3 also res3, 4 also res4.
    ``speed_paths``: GroupNorm's written-out gradient (``train.speed_paths``).
    """
    inputs = keras.Input((None, None, 3), name="image")
    x = layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = _conv(64, 7, "conv1_conv", strides=2)(x)
    x = _norm(norm, "conv1_bn", speed_paths=speed_paths)(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage in STAGES[:3]:
        x = _stage(x, stage, norm, speed_paths=speed_paths)
    trunk = keras.Model(inputs, x, name="resnet50_res4")
    frozen_prefixes = ("conv1", "conv2", "conv3", "conv4")[:freeze_at]
    for layer in trunk.layers:
        if layer.name.startswith(frozen_prefixes):
            layer.trainable = False
    return trunk


def build_res5(norm="frozen", speed_paths=True):
    """The res5 stage (``conv5`` blocks): ``(n, P, P, 1024) -> (n, ceil(P/2), ceil(P/2), 2048)``, one ROI per sample.

    Many small maps (one per ROI): with ``speed_paths`` (``train.speed_paths``, measured on a CPU) its convolutions
    are computed as matrix products in training (:class:`Conv2D` ``matmul_form="all"``) and GroupNorm uses its
    written-out gradient; in inference the convolutions are Keras' own."""
    inputs = keras.Input((None, None, TRUNK_CHANNELS), name="roi_features")
    outputs = _stage(inputs, STAGES[3], norm, "all" if speed_paths else "none", speed_paths)
    return keras.Model(inputs, outputs, name="resnet50_res5")


def norm_kind(model):
    """``frozen``, ``batch`` or ``group``: the normalisation layers of a model built here (None without any)."""
    for layer in model.layers:
        if isinstance(layer, FrozenBatchNormalization):
            return "frozen"
        if isinstance(layer, layers.GroupNormalization):
            return "group"
        if isinstance(layer, layers.BatchNormalization):
            return "batch"
    return None


def _imagenet_source(weights):
    """A ``keras.applications.ResNet50`` holding the requested weights, or a clear error."""
    if weights.lower() == "imagenet":
        cached = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models", IMAGENET_FILE)
        try:
            return keras.applications.ResNet50(include_top=False, weights="imagenet")
        except Exception as err:  # the download failed: no network, proxy, partial file...
            raise BackboneWeightsError(
                f"could not get Keras' ImageNet ResNet-50 weights ({type(err).__name__}: {err}). Offline, put "
                f"'{IMAGENET_FILE}' (from Keras' releases) at {cached} or under weights/ and set "
                f"model.backbone_weights to its path."
            ) from err
    if not os.path.isfile(weights):
        raise BackboneWeightsError(
            f"backbone weights file '{weights}' does not exist (model.backbone_weights: use imagenet, none or the "
            f"path of '{IMAGENET_FILE}')"
        )
    try:
        return keras.applications.ResNet50(include_top=False, weights=weights)
    except Exception as err:  # h5py/ValueError on a truncated file or one for another architecture
        first = (str(err).strip().splitlines() or [""])[0]  # Keras goes on to list every layer, with its values
        raise BackboneWeightsError(
            f"backbone weights file '{weights}' could not be loaded as Keras ResNet-50 (no top) weights: "
            f"{type(err).__name__}: {first[:300]}"
        ) from None


def load_backbone_weights(weights, *models):
    """Copy ResNet-50 weights into ``models`` (the trunk and res5) by layer name. Returns the number of layers set.

    With ``group`` norm only convolutions and the norms' affine parameters carry over (statistics cannot).
    """
    if weights is None or weights.lower() == "none":
        return 0
    source = _imagenet_source(weights)
    by_name = {layer.name: layer for layer in source.layers if layer.weights}
    copied = 0
    for model in models:
        for layer in model.layers:
            src = by_name.get(layer.name)
            if src is None or not layer.weights:
                continue
            values = src.get_weights()
            if isinstance(layer, layers.GroupNormalization):
                values = values[:2]  # gamma, beta; BatchNorm's moving statistics have no GroupNorm counterpart
            layer.set_weights(values)
            copied += 1
    expected = sum(1 for m in models for layer in m.layers if layer.weights)
    if copied != expected:
        raise BackboneWeightsError(f"backbone weights '{weights}' set {copied} of {expected} layers")
    log.info("loaded backbone weights '%s' into %d layers", weights, copied)
    return copied
