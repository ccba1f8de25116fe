"""Converting Detectron2 weights into this detector's layers, checked in full before anything is written.

Detectron2's ``faster_rcnn_R_50_C4`` is this architecture (MSRA ResNet-50 with the stride in the first 1x1
convolution, res4 trunk, RPN with one 3x3 conv and two 1x1 convs, res5 run per ROI, mean pool, two linear layers),
so its weights convert one tensor to one Keras variable. What the conversion has to get right:

- **Layouts.** PyTorch convolutions are ``(out, in, kh, kw)``, Keras ``(kh, kw, in, out)``; ``nn.Linear`` is
  ``(out, in)``, Keras ``Dense`` ``(in, out)``.
- **Norms.** Detectron2's ``FrozenBatchNorm2d`` computes ``(x - mean) * weight / sqrt(var + 1e-5) + bias``; Keras'
  BatchNormalization uses its own epsilon (1.001e-5 here). For ``model.norm: frozen`` the factor
  ``1 / sqrt(var + 1e-5)`` is folded into gamma (in float64) and ``moving_variance`` is set to ``1 - epsilon``, so
  Keras divides by ``sqrt(1) = 1`` and computes Detectron2's affine map to float32 precision. For
  ``model.norm: batch`` (norms that keep training) gamma stays the weight and ``moving_variance = var + 1e-5 -
  epsilon``. GroupNorm cannot take BatchNorm statistics and is refused.
- **Biases.** Detectron2's ResNet convolutions have none; the Keras ones are set to 0.
- **RPN.** Detectron2 lays out anchors per location size-major then ratio (``generate_cell_anchors``), with
  ``w = sqrt(s^2 / r)``, ``h = r * w``, and reads ``anchor_deltas`` as ``(N, A, 4, H, W)``: channel ``a * 4 + k``.
  :mod:`frcnn.anchors` and :class:`frcnn.heads.RPNHead` use the same order, so no permutation is needed (a test
  proves it on a hand-computed case).
- **Classes.** Detectron2's ``cls_score`` has the K foreground classes first and background LAST; frcnn has
  background at index 0: columns are permuted ``[K, 0, 1, ..., K-1]``. ``bbox_pred`` has 4 outputs per foreground
  class (no background), class ``c`` (0-based) at ``4c..4c+3``: exactly frcnn's ``4 * (c - 1) + k`` for class
  ``c`` in 1..C-1, so it is copied as is.
- **Input.** Detectron2's models read BGR minus ``[103.530, 116.280, 123.675]`` (std 1). The configs under
  ``configs/detectron2_*.yaml`` set that; with ``input.channel_order: rgb`` the input channels of ``conv1`` are
  reversed.

A missing or misshaped key refuses the file, naming the key; unused keys of the converted parts (e.g. a res4 block 6
of a ResNet-101) refuse it too; nothing is assigned until every tensor has been checked (:class:`_Assignments`).

Owns: the conversion maths and the load plans. Imports the model's layers (through :func:`_target_layers`, the one
place that knows their attribute paths), never the training job.
"""

import logging
import re

import numpy as np

from frcnn.backbone import norm_kind
from frcnn.pretrained.reader import Checkpoint, read_checkpoint, stage_prefix
from frcnn.pretrained.registry import D2_NORM_EPSILON, D2_PIXEL_MEAN_BGR, D2_PIXEL_STD_BGR, PretrainedError, resolve

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- the model's layers


def _target_layers(model):
    """The Keras layers the conversion writes to: the ONE place that knows the model's attribute paths.

    Returns ``{"trunk": keras.Model, "res5": keras.Model, "rpn_conv", "rpn_cls", "rpn_box", "cls", "box": layers}``.
    Inside ``trunk`` and ``res5`` layers are looked up by their ``keras.applications.ResNet50`` names.
    """
    head = model.roi_heads.head
    return {
        "trunk": model.trunk,
        "res5": head.res5.layer,
        "rpn_conv": model.rpn.head.conv,
        "rpn_cls": model.rpn.head.objectness,
        "rpn_box": model.rpn.head.deltas,
        "cls": head.cls.layer,
        "box": head.box.layer,
    }


RESNET_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}  # ResNet-50


def resnet_plan():
    """``(detectron2 module, keras conv name, keras norm name, part)`` for every conv of the ResNet-50 (C4 split)."""
    plan = [("backbone.stem.conv1", "conv1_conv", "conv1_bn", "trunk")]
    for stage, blocks in RESNET_BLOCKS.items():
        part = "res5" if stage == 5 else "trunk"
        for i in range(blocks):
            keras_block = f"conv{stage}_block{i + 1}"
            d2_block = f"{stage_prefix(stage)}.{i}"
            if i == 0:
                plan.append((f"{d2_block}.shortcut", f"{keras_block}_0_conv", f"{keras_block}_0_bn", part))
            for j in (1, 2, 3):
                plan.append((f"{d2_block}.conv{j}", f"{keras_block}_{j}_conv", f"{keras_block}_{j}_bn", part))
    return plan


# ------------------------------------------------------------------------------------------------ conversion


def conv_kernel(weight):
    """PyTorch ``(out, in, kh, kw)`` -> Keras ``(kh, kw, in, out)``."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight):
    """PyTorch ``nn.Linear`` ``(out, in)`` -> Keras ``Dense`` ``(in, out)``."""
    return np.transpose(weight, (1, 0))


def frozen_bn_values(weight, bias, mean, var, keras_epsilon, d2_epsilon=D2_NORM_EPSILON, fold=True):
    """Keras BatchNormalization ``[gamma, beta, moving_mean, moving_variance]`` computing Detectron2's
    ``(x - mean) * weight / sqrt(var + d2_epsilon) + bias``.

    ``fold``: scale folded into gamma, ``moving_variance = 1 - keras_epsilon`` (exact for inference-mode norms);
    otherwise gamma = weight and ``moving_variance = var + d2_epsilon - keras_epsilon`` (for norms that train).
    """
    w, b, m, v = (np.asarray(x, np.float64) for x in (weight, bias, mean, var))
    if fold:
        gamma = w / np.sqrt(v + d2_epsilon)
        moving_var = np.full_like(v, 1.0 - keras_epsilon)
    else:
        gamma = w
        moving_var = np.maximum(v + d2_epsilon - keras_epsilon, 0.0)
    return [x.astype(np.float32) for x in (gamma, b, m, moving_var)]


def class_permutation(num_foreground):
    """frcnn class column ``j`` <- Detectron2 ``cls_score`` row ``perm[j]``: background (last there) first."""
    return np.concatenate([[num_foreground], np.arange(num_foreground)]).astype(np.int64)


class _Assignments:
    """Collects ``layer -> values`` with every check done before anything is written."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.used = set()
        self.items = []  # (layer, values, description)

    def take(self, name, shape=None):
        ckpt = self.checkpoint
        if name not in ckpt.tensors:
            raise PretrainedError(f"{ckpt.path}: key '{ckpt.describe(name)}' is missing{_architecture_hint(ckpt)}")
        value = ckpt.tensors[name]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise PretrainedError(f"{ckpt.path}: key '{ckpt.describe(name)}' has shape {tuple(value.shape)}, "
                                  f"expected {tuple(shape)}{_architecture_hint(ckpt)}")
        self.used.add(name)
        return value

    def put(self, layer, values, what):
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise PretrainedError(f"{self.checkpoint.path}: {what} gives shapes {got} for layer '{layer.name}', "
                                  f"which has {expected}")
        self.items.append((layer, values, what))

    def apply(self):
        for layer, values, _ in self.items:
            layer.set_weights(values)


def _architecture_hint(ckpt):
    names = ckpt.tensors
    if any(n.startswith("backbone.bottom_up.") or n.startswith("backbone.fpn_") for n in names):
        return " (this looks like an FPN checkpoint; only Detectron2's R50-C4 models fit this detector)"
    if any(n.startswith("backbone.res5.") for n in names):
        return " (this looks like a DC5 or classification ResNet; only R50-C4 fits this detector)"
    if any(re.match(r"backbone\.res4\.(6|7|8|9|\d\d)\.", n) for n in names):
        return " (this looks like a deeper ResNet, e.g. R101; only R50-C4 fits this detector)"
    return ""


def _norm_kind(model):
    kind = norm_kind(model.trunk)
    if kind not in ("frozen", "batch"):
        raise PretrainedError(f"Detectron2 weights need model.norm: frozen (or batch); this model has "
                              f"model.norm: {kind} (GroupNorm cannot take BatchNorm weights and statistics)")
    return kind


def _plan_resnet(model, assign, parts):
    """Stem, res2-res4 (trunk) and res5: conv kernels, zero biases, norms."""
    layers = _target_layers(model)
    ckpt = assign.checkpoint
    fold = _norm_kind(model) == "frozen"
    rgb = model.transform.channel_order == "rgb"
    for module, conv_name, norm_name, part in resnet_plan():
        if part not in parts:
            continue
        owner = layers[part]
        conv, norm = owner.get_layer(conv_name), owner.get_layer(norm_name)
        kh, kw, cin, cout = conv.kernel.shape
        kernel = conv_kernel(assign.take(module + ".weight", (cout, cin, kh, kw)))
        if conv_name == "conv1_conv" and rgb:
            kernel = kernel[:, :, ::-1, :]  # Detectron2's first conv reads BGR
        values = [kernel.astype(np.float32)]
        if conv.use_bias:
            values.append(np.zeros((cout,), np.float32))
        if module + ".bias" in ckpt.tensors:  # no ResNet conv in Detectron2 has one: another architecture
            raise PretrainedError(f"{ckpt.path}: key '{ckpt.describe(module + '.bias')}' is a bias on a ResNet "
                                  "convolution, which Detectron2's R50-C4 does not have")
        assign.put(conv, values, module)
        n = cout
        weight = assign.take(f"{module}.norm.weight", (n,))
        bias = assign.take(f"{module}.norm.bias", (n,))
        if ckpt.format == "caffe2" and f"{module}.norm.running_mean" not in ckpt.tensors:
            # Caffe2's affine norm: statistics already folded in. Detectron2 leaves FrozenBatchNorm's initial
            # running_mean 0 and running_var 1 - eps, i.e. exactly x * weight + bias.
            mean = np.zeros((n,), np.float64)
            var = np.full((n,), 1.0 - D2_NORM_EPSILON)
        else:
            mean = assign.take(f"{module}.norm.running_mean", (n,))
            var = assign.take(f"{module}.norm.running_var", (n,))
        assign.put(norm, frozen_bn_values(weight, bias, mean, var, norm.epsilon, fold=fold), module + ".norm")


def _plan_rpn(model, assign):
    layers = _target_layers(model)
    for key, module in (("rpn_conv", "proposal_generator.rpn_head.conv"),
                        ("rpn_cls", "proposal_generator.rpn_head.objectness_logits"),
                        ("rpn_box", "proposal_generator.rpn_head.anchor_deltas")):
        layer = layers[key]
        kh, kw, cin, cout = layer.kernel.shape
        try:
            weight = assign.take(module + ".weight", (cout, cin, kh, kw))
        except PretrainedError as err:
            if key != "rpn_conv" and module + ".weight" in assign.checkpoint.tensors:
                per_anchor = 1 if key == "rpn_cls" else 4
                have = assign.checkpoint.tensors[module + ".weight"].shape[0] // per_anchor
                raise PretrainedError(
                    f"{err}: the checkpoint has {have} anchors per location, this model "
                    f"{cout // per_anchor} (model.anchor_sizes x model.anchor_ratios; Detectron2's R50-C4 uses "
                    "[32, 64, 128, 256, 512] x [0.5, 1, 2])") from None
            raise
        bias = assign.take(module + ".bias", (cout,))
        # Channel layout: Detectron2 reads objectness as (A, H, W) and deltas as (A, 4, H, W), i.e. channel a and
        # a * 4 + k, anchors size-major then ratio: frcnn's order (frcnn.anchors), so no permutation.
        assign.put(layer, [conv_kernel(weight).astype(np.float32), bias.astype(np.float32)], module)


def _plan_heads(model, assign):
    layers = _target_layers(model)
    cls_layer, box_layer = layers["cls"], layers["box"]
    features, num_classes = cls_layer.kernel.shape  # frcnn: C = K + 1 with background at 0
    k = num_classes - 1
    ckpt = assign.checkpoint
    name = "roi_heads.box_predictor.cls_score.weight"
    if name in ckpt.tensors and ckpt.tensors[name].shape[0] != num_classes:
        raise PretrainedError(
            f"{ckpt.path}: key '{name}' has {ckpt.tensors[name].shape[0] - 1} classes (+ background), the config "
            f"{k} (data.classes); use the config of this checkpoint (configs/detectron2_*.yaml)")
    perm = class_permutation(k)
    w = assign.take(name, (num_classes, features))
    b = assign.take("roi_heads.box_predictor.cls_score.bias", (num_classes,))
    assign.put(cls_layer, [dense_kernel(w)[:, perm].astype(np.float32), b[perm].astype(np.float32)],
               "roi_heads.box_predictor.cls_score")
    # bbox_pred: 4 per foreground class in class order (no background row): the layout of frcnn's box layer.
    w = assign.take("roi_heads.box_predictor.bbox_pred.weight", (4 * k, features))
    b = assign.take("roi_heads.box_predictor.bbox_pred.bias", (4 * k,))
    assign.put(box_layer, [dense_kernel(w).astype(np.float32), b.astype(np.float32)],
               "roi_heads.box_predictor.bbox_pred")


_CONVERTED_PREFIXES = ("backbone.", "roi_heads.res5.", "proposal_generator.", "roi_heads.box_predictor.")


def _check_leftovers(assign, converted_prefixes):
    """Unused keys of a converted part refuse the file (another architecture); other unused keys are reported."""
    ckpt = assign.checkpoint
    left = sorted(set(ckpt.tensors) - assign.used)
    bad = [n for n in left if n.startswith(converted_prefixes)]
    if bad:
        shown = ", ".join(ckpt.describe(n) for n in bad[:5])
        raise PretrainedError(f"{ckpt.path}: {len(bad)} keys have no place in this detector's ResNet-50-C4 (e.g. "
                              f"{shown}){_architecture_hint(ckpt)}")
    return left


def _log_loaded(ckpt, assign, left, what):
    log.info("loaded %d tensors of %s (%s%s) into the %s", len(assign.used), ckpt.path, ckpt.format,
             f", {ckpt.author}" if ckpt.author else "", what)
    if ckpt.ignored:
        log.info("ignored %d entries expected to be unused: %s", len(ckpt.ignored),
                 ", ".join(sorted(ckpt.ignored)[:8]) + (" ..." if len(ckpt.ignored) > 8 else ""))
    if left:
        log.warning("%s: %d unknown entries were not used: %s", ckpt.path, len(left),
                    ", ".join(ckpt.describe(n) for n in left[:10]) + (" ..." if len(left) > 10 else ""))


def _input_warnings(model):
    i = model.transform
    mean, std = tuple(i.pixel_mean), tuple(i.pixel_std)
    if i.channel_order == "rgb":
        mean, std = mean[::-1], std[::-1]
    if not (np.allclose(mean, D2_PIXEL_MEAN_BGR, atol=1e-3) and np.allclose(std, D2_PIXEL_STD_BGR)):
        log.warning("Detectron2's weights expect BGR minus %s divided by %s; this config has input.pixel_mean %s "
                    "and input.pixel_std %s (%s): outputs will differ from Detectron2's",
                    list(D2_PIXEL_MEAN_BGR), list(D2_PIXEL_STD_BGR), list(i.pixel_mean), list(i.pixel_std),
                    i.channel_order)


def _as_checkpoint(source, cache_dir=None):
    if isinstance(source, Checkpoint):
        return source
    return read_checkpoint(resolve(source, cache_dir))


def load_detector_weights(model, source, cache_dir=None):
    """Load a whole Detectron2 R50-C4 detector (``model_final_*.pkl`` or ``detectron2:<name>``) into ``model``.

    Every variable of the model gets a checkpoint tensor, or the file is refused naming the key. Returns the
    :class:`Checkpoint`.
    """
    ckpt = _as_checkpoint(source, cache_dir)
    if ckpt.format != "detectron2":
        raise PretrainedError(f"{ckpt.path} is an ImageNet backbone ({ckpt.format}), not a detector; use it as "
                              "model.backbone_weights to train from it")
    assign = _Assignments(ckpt)
    _plan_resnet(model, assign, ("trunk", "res5"))
    _plan_rpn(model, assign)
    _plan_heads(model, assign)
    left = _check_leftovers(assign, _CONVERTED_PREFIXES)
    assigned = {id(v) for layer, _, _ in assign.items for v in layer.weights}
    unset = [v.path for v in model.weights if id(v) not in assigned]
    if unset:  # a layer this conversion does not know about: refuse rather than leave it random
        raise PretrainedError(f"{ckpt.path}: the model has variables no Detectron2 tensor maps to: "
                              f"{', '.join(unset[:5])}")
    assign.apply()
    _log_loaded(ckpt, assign, left, "whole detector (trunk, RPN, res5, class and box layers)")
    _input_warnings(model)
    return ckpt


def load_initial_weights(model, source, cache_dir=None):
    """Training initialisation from Detectron2 weights (``model.backbone_weights``).

    ``R-50.pkl`` (``detectron2:ImageNetPretrained/MSRA/R-50``): trunk and res5. A detection checkpoint (e.g.
    ``detectron2:COCO-Detection/faster_rcnn_R_50_C4_3x``): trunk, RPN and res5; the class and box layers stay new
    (fine-tuning on other classes), which is logged. Returns the :class:`Checkpoint`.
    """
    ckpt = _as_checkpoint(source, cache_dir)
    assign = _Assignments(ckpt)
    _plan_resnet(model, assign, ("trunk", "res5"))
    detector = any(n.startswith("proposal_generator.") for n in ckpt.tensors)
    if detector:
        _plan_rpn(model, assign)
    # The box predictor is deliberately not converted (and so not refused as a leftover).
    left = _check_leftovers(assign, ("backbone.", "roi_heads.res5.", "proposal_generator."))
    left = [n for n in left if not n.startswith("roi_heads.box_predictor.")]
    assign.apply()
    _log_loaded(ckpt, assign, left, "trunk, RPN and res5" if detector else "trunk and res5 (backbone)")
    if detector:
        log.info("class and box layers are new (randomly initialised) for the %d classes of this config: only "
                 "the trunk, RPN and res5 come from %s", model.num_classes - 1, ckpt.path)
    _input_warnings(model)
    return ckpt


