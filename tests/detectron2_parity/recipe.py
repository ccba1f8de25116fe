"""The inputs of the Detectron2 training-parity check, rebuilt from a seed in pure NumPy.

Both sides use this module: ``make_reference.py`` (run once, in a scratch environment with PyTorch and
Detectron2's source) and ``tests/test_detectron2_parity.py`` (frcnn, in CI, without PyTorch). Nothing here imports
PyTorch, Keras or frcnn.

What it builds:

- :func:`make_image`: one ``IMAGE_HEIGHT x IMAGE_WIDTH`` RGB image (whole numbers in ``[0, 255]``, float32): a smooth
  random background with the ground-truth boxes painted in as textured rectangles.
- :data:`GT_BOXES`, :data:`GT_CLASSES`: three boxes with fractional, unsymmetric corners (so that no two anchors
  tie exactly for a box's highest IoU), classes in Detectron2's 0-based foreground numbering.
- :func:`state_dict`: a complete Detectron2 R50-C4 state dict under Detectron2's names
  (``backbone.stem.conv1.weight``, ``backbone.res2.0.conv1.norm.running_var``, ..., ``roi_heads.res5.*``,
  ``proposal_generator.rpn_head.*``, ``roi_heads.box_predictor.*``), float32.

  A random 50-layer network blows up or dies unless its scale is controlled, so every frozen norm is calibrated: the
  network is run on :func:`make_image` layer by layer (Detectron2's R50-C4 forward: caffe-style stem,
  bottlenecks with the stride in the first 1x1 convolution) and each norm's ``running_mean`` / ``running_var`` are
  the per-channel mean and variance of the convolution output it normalises; its ``weight`` / ``bias`` (gamma,
  beta) are drawn around 1 and 0, smaller for the last norm of each residual branch. res5 is calibrated on the res4
  map of the whole image (the ROIs are crops of it). ReLU inputs within round-off of 0 would make the two
  frameworks' gradients differ by far more than round-off (the ReLU passes the gradient in one and not in the
  other), so every ReLU input of the trunk and of the RPN conv is moved at least :data:`RELU_MARGIN` away from 0
  through its norm's (or conv's) bias (:func:`_clear_of_zero`), and res5, whose inputs (ROI crops) only the
  detectors compute, has its ReLU inputs centred near :data:`RES5_BETA` instead of 0. The heads are scaled from the same run: RPN objectness logits
  spread over several units with a distinct bias per anchor shape, small RPN deltas (proposals near their anchors),
  class logits with a standard deviation of about :data:`CLASS_LOGIT_STD` (peaked scores: several ROIs are
  confidently wrong, which is what the classification loss must not cap) and box deltas of order 1.

The sampling settings (:data:`SETTINGS`) make both detectors take every candidate, so nothing random remains:
the RPN samples ``batch_size_per_image = NUM_ANCHORS`` anchors with ``positive_fraction = 1`` (every labelled
anchor) and the ROI head ``POST_NMS_TOPK_TRAIN + len(GT_BOXES)`` ROIs with ``positive_fraction = 1`` (every
proposal and every appended ground-truth box). ``POST_NMS_TOPK_TRAIN`` is cut from Detectron2's 2000 to keep the
per-ROI res5 cheap; every other setting is Detectron2's R50-C4 training default.

Gradients are compared through :func:`summarize_gradient`: the L2 norm, the sum, the first :data:`SLICE` values and
:data:`NUM_PROBES` projections on seeded random vectors (:func:`probes`), all in Detectron2's layout.
"""

import zlib

import numpy as np

SEED = 2024
IMAGE_HEIGHT, IMAGE_WIDTH = 160, 256
STRIDE = 16
ANCHOR_SIZES = (32.0, 64.0, 128.0, 256.0, 512.0)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
NUM_ANCHORS = (IMAGE_HEIGHT // STRIDE) * (IMAGE_WIDTH // STRIDE) * len(ANCHOR_SIZES) * len(ANCHOR_RATIOS)
CLASS_NAMES = ("circle", "square", "triangle")
NUM_CLASSES = len(CLASS_NAMES)
# (x1, y1, x2, y2) in pixels; Detectron2's 0-based foreground class of each (frcnn's is one more: 0 is background).
# Chosen so that every decision of the RPN's matching clears its threshold by far more than round-off: no
# anchor's IoU within 3e-3 of 0.3 or 0.7, each box's best anchor unique (ahead of the next by 6e-3 or more). Every
# box's best IoU is below 0.7, so its positive anchors come from the low-quality-match rule.
GT_BOXES = np.array([[17.5, 36.0, 95.7, 120.1], [137.1, 11.9, 220.4, 73.7], [155.5, 81.4, 238.1, 159.0]],
                    np.float32)
GT_CLASSES = np.array([0, 2, 1], np.int64)
POST_NMS_TOPK_TRAIN = 48
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)  # Detectron2's MODEL.PIXEL_MEAN (BGR), std 1
D2_NORM_EPSILON = 1e-5

SETTINGS = {
    "rpn_batch_size_per_image": NUM_ANCHORS,
    "rpn_positive_fraction": 1.0,
    "rpn_post_nms_topk_train": POST_NMS_TOPK_TRAIN,
    "roi_batch_size_per_image": POST_NMS_TOPK_TRAIN + len(GT_BOXES),
    "roi_positive_fraction": 1.0,
}

CLASS_LOGIT_STD = 24.0
RELU_MARGIN = 1e-4  # every ReLU input of the trunk and the RPN is at least this far from 0 (see _clear_of_zero)
RES5_BETA = 4.0  # added to the norm biases of res5 before its ReLUs (see _build)
OBJECTNESS_LOGIT_STD = 3.0
RPN_DELTA_STD = 0.1
BOX_DELTA_STD = 0.5

# The variables whose gradients are compared (Detectron2 names).
GRADIENT_VARIABLES = (
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.res5.2.conv3.weight",
    "roi_heads.res5.0.conv1.weight",
    "proposal_generator.rpn_head.conv.weight",
    "proposal_generator.rpn_head.conv.bias",
    "backbone.res4.5.conv3.weight",
)
NUM_PROBES = 8
SLICE = 16

RESNET_STAGES = ((2, 64, 3, 1), (3, 128, 4, 2), (4, 256, 6, 2), (5, 512, 3, 2))  # stage, width, blocks, stride


# ------------------------------------------------------------------------------------------------------- image


def make_image():
    """``(IMAGE_HEIGHT, IMAGE_WIDTH, 3)`` float32 RGB, whole numbers in ``[0, 255]``."""
    rng = np.random.default_rng([SEED, 1])
    h, w = IMAGE_HEIGHT, IMAGE_WIDTH
    coarse = rng.uniform(40.0, 215.0, size=(h // 32 + 2, w // 32 + 2, 3))
    ys = np.linspace(0.0, coarse.shape[0] - 1.0, h)
    xs = np.linspace(0.0, coarse.shape[1] - 1.0, w)
    y0 = np.minimum(ys.astype(int), coarse.shape[0] - 2)
    x0 = np.minimum(xs.astype(int), coarse.shape[1] - 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    image = top * (1 - fy) + bottom * fy + rng.normal(0.0, 12.0, size=(h, w, 3))
    colours = rng.uniform(0.0, 255.0, size=(len(GT_BOXES), 3))
    for (x1, y1, x2, y2), colour in zip(GT_BOXES, colours):
        r0, r1, c0, c1 = int(round(y1)), int(round(y2)), int(round(x1)), int(round(x2))
        stripes = 30.0 * np.sin(np.arange(c1 - c0) / 3.0)[None, :, None]
        image[r0:r1, c0:c1] = colour + stripes + rng.normal(0.0, 6.0, size=(r1 - r0, c1 - c0, 3))
    return np.clip(np.round(image), 0.0, 255.0).astype(np.float32)


def normalized_bgr(image):
    """Detectron2's input: BGR minus ``PIXEL_MEAN_BGR`` (std 1), float64 ``(H, W, 3)``."""
    return image[..., ::-1].astype(np.float64) - np.asarray(PIXEL_MEAN_BGR)


# ------------------------------------------------------------------------------------------------ boxes


def anchors():
    """Detectron2's anchors of the image's res4 map, ``(H * W * A, 4)`` float64, in its order: locations row-major,
    then sizes, then ratios (``w = sqrt(size^2 / ratio)``, ``h = ratio * w``), centres at ``(x, y) * STRIDE``
    (offset 0)."""
    cell = []
    for size in ANCHOR_SIZES:
        for ratio in ANCHOR_RATIOS:
            w = np.sqrt(size * size / ratio)
            h = ratio * w
            cell.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    ys, xs = np.meshgrid(np.arange(IMAGE_HEIGHT // STRIDE) * STRIDE, np.arange(IMAGE_WIDTH // STRIDE) * STRIDE,
                         indexing="ij")
    shifts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    return (shifts[:, None, :] + np.asarray(cell)[None]).reshape(-1, 4)


def pairwise_iou(boxes_a, boxes_b):
    """``(N, M)`` IoU of ``(x1, y1, x2, y2)`` boxes, float64."""
    a, b = np.asarray(boxes_a, np.float64), np.asarray(boxes_b, np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = np.prod(np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]),
                            0.0, None), axis=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


# ---------------------------------------------------------------------------------------- NumPy R50-C4 forward


def _conv(x, weight, stride=1, pad=0):
    """``x (H, W, Cin)``, ``weight (Cout, Cin, kh, kw)`` (PyTorch layout) -> ``(H', W', Cout)``, computed in float32
    (the statistics drawn from it are float64; BLAS round-off moves the weights by about 1e-7 relative, far below
    what the parity test resolves)."""
    cout, cin, kh, kw = weight.shape
    x = np.asarray(x, np.float32)
    weight = np.asarray(weight, np.float32)
    if kh == 1 and kw == 1 and pad == 0:
        return x[::stride, ::stride] @ weight[:, :, 0, 0].T
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    patches = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(0, 1))[::stride, ::stride]
    ho, wo = patches.shape[:2]
    cols = np.ascontiguousarray(patches).reshape(ho * wo, cin * kh * kw)  # (cin, kh, kw) order
    return (cols @ weight.reshape(cout, -1).T).reshape(ho, wo, cout)


def _max_pool(x):
    """3x3, stride 2, padding 1 (Detectron2's stem); ``x`` is post-ReLU, so zero padding equals -inf padding."""
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(0, 1))[::2, ::2]
    return win.max(axis=(-2, -1))


def _clear_of_zero(pre, margin=RELU_MARGIN):
    """Per-channel shifts ``(C,)`` that move every value of ``pre (..., C)`` at least ``margin`` away from 0.

    A ReLU whose input sits within round-off of 0 passes its gradient in one framework and not in the other; the
    frameworks sum in different orders, so such a value would make the gradients differ by far more than
    round-off. Each shift is the one of least size that clears its channel (most are 0)."""
    pre = np.asarray(pre, np.float64).reshape(-1, np.shape(pre)[-1])
    shift = np.zeros(pre.shape[1])
    for c in np.nonzero((np.abs(pre) < margin).any(axis=0))[0]:
        at_zero = np.sort(-pre[:, c])  # the shifts that would put each value exactly at 0
        near = at_zero[np.abs(at_zero) < 1e4 * margin]
        candidates = np.concatenate([near - 1.01 * margin, near + 1.01 * margin])
        for s in candidates[np.argsort(np.abs(candidates), kind="stable")]:
            i = np.searchsorted(at_zero, s)
            if all(abs(at_zero[j] - s) >= margin for j in (i - 1, i) if 0 <= j < len(at_zero)):
                shift[c] = s
                break
        else:
            raise RuntimeError("could not move the ReLU inputs clear of zero")
    return shift


class _Builder:
    """Draws the weights in a fixed order and calibrates each frozen norm on the actual activations."""

    def __init__(self, rng):
        self.rng = rng
        self.sd = {}

    def conv_norm(self, module, x, cout, k, stride=1, pad=0, relu=True, last=False, positive=False):
        cin = x.shape[-1]
        weight = (self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        y = _conv(x, weight, stride, pad).astype(np.float64)
        flat = y.reshape(-1, cout)
        mean = flat.mean(axis=0)
        var = flat.var(axis=0)
        var = np.maximum(var, 1e-3 * var.mean() + 1e-12)
        if last:  # the last norm of a residual branch: a small gamma keeps the residual sums bounded
            gamma = self.rng.uniform(0.2, 0.5, cout)
            beta = self.rng.normal(0.0, 0.05, cout)
        else:
            gamma = self.rng.uniform(0.7, 1.3, cout)
            beta = self.rng.normal(0.1, 0.2, cout)
        if positive:  # res5 (see _build): ReLU inputs far above 0
            beta = beta + RES5_BETA
        mean32, var32, gamma32 = mean.astype(np.float32), var.astype(np.float32), gamma.astype(np.float32)
        # What the frozen norm computes from the float32 values.
        scale = gamma32.astype(np.float64) / np.sqrt(var32.astype(np.float64) + D2_NORM_EPSILON)
        y = (y - mean32) * scale
        if relu and not positive:
            beta = beta + _clear_of_zero(y + beta)
        beta32 = beta.astype(np.float32)
        self.sd[module + ".weight"] = weight
        self.sd[module + ".norm.weight"] = gamma32
        self.sd[module + ".norm.bias"] = beta32
        self.sd[module + ".norm.running_mean"] = mean32
        self.sd[module + ".norm.running_var"] = var32
        y = y + beta32
        return np.maximum(y, 0.0) if relu else y

    def bottleneck(self, prefix, x, width, out, stride, first, positive):
        if first:
            shortcut = self.conv_norm(prefix + ".shortcut", x, out, 1, stride, relu=False, positive=positive)
        else:
            shortcut = x
        y = self.conv_norm(prefix + ".conv1", x, width, 1, stride, positive=positive)
        y = self.conv_norm(prefix + ".conv2", y, width, 3, 1, 1, positive=positive)
        y = self.conv_norm(prefix + ".conv3", y, out, 1, relu=False, last=True)
        pre = y + shortcut
        if not positive:  # the block's ReLU: move its input clear of 0 through conv3's norm bias
            name = prefix + ".conv3.norm.bias"
            old = self.sd[name].astype(np.float64)
            self.sd[name] = (old + _clear_of_zero(pre)).astype(np.float32)
            pre = pre + (self.sd[name].astype(np.float64) - old)
        return np.maximum(pre, 0.0)

    def stage(self, stage, x, width, blocks, stride):
        prefix = "roi_heads.res5" if stage == 5 else f"backbone.res{stage}"
        for i in range(blocks):
            x = self.bottleneck(f"{prefix}.{i}", x, width, 4 * width, stride if i == 0 else 1, i == 0, stage == 5)
        return x

    def dense(self, x, out, std):
        """A PyTorch-layout layer (``(out, in)`` or ``(out, in, 1, 1)``) whose outputs on ``x`` have about ``std``."""
        scale = std / np.sqrt(np.mean(np.sum(np.square(x), axis=-1)))
        return (self.rng.standard_normal((out, x.shape[-1])) * scale).astype(np.float32)


def _build():
    rng = np.random.default_rng([SEED, 2])
    b = _Builder(rng)
    x = normalized_bgr(make_image())
    x = b.conv_norm("backbone.stem.conv1", x, 64, 7, 2, 3)
    x = _max_pool(x)
    for stage, width, blocks, stride in RESNET_STAGES:
        x = b.stage(stage, x, width, blocks, stride)
        if stage == 4:
            res4 = x
    # res5 runs on ROI crops of the res4 map that only the detectors compute (RoIAlign of the proposals), so its
    # ReLU inputs cannot be moved clear of 0 one by one as the trunk's are: instead its norms before a ReLU get
    # RES5_BETA added to their bias, which puts those inputs near N(4, 1), where a value within round-off of 0 is
    # about 3000 times rarer than around N(0, 1). It is calibrated on the res4 map of the whole image.
    pooled = x.reshape(-1, x.shape[-1])  # res5 outputs at the positions of the res4 map (one per 2x2 cells)

    sd = b.sd
    # RPN: 3x3 conv (1024 -> 1024, bias) + ReLU, then 1x1 objectness (A) and deltas (4 A).
    a = len(ANCHOR_SIZES) * len(ANCHOR_RATIOS)
    c = res4.shape[-1]
    conv = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
    pre = _conv(res4, conv, 1, 1).astype(np.float64).reshape(-1, c)  # (H*W, C)
    conv_bias = rng.normal(0.0, 0.1, c)
    conv_bias = (conv_bias + _clear_of_zero(pre + conv_bias)).astype(np.float32)
    hidden = np.maximum(pre + conv_bias, 0.0)
    sd["proposal_generator.rpn_head.conv.weight"] = conv
    sd["proposal_generator.rpn_head.conv.bias"] = conv_bias
    # Objectness: fitted (least squares, minimum norm; exact, since there are fewer locations than channels) to
    # logits chosen here: OBJECTNESS_LOGIT_STD x the anchor's best IoU with the ground truth, plus unit noise. The
    # proposals then gather around the objects (so the ROI head sees foreground proposals, not only the appended
    # ground truth) and the logits are spread out (no near-ties in the ranking).
    best_iou = pairwise_iou(anchors(), GT_BOXES).max(axis=1).reshape(-1, a)  # (H*W, A)
    target = OBJECTNESS_LOGIT_STD * (3.0 * best_iou - 1.0) + rng.normal(0.0, 1.0, best_iou.shape)
    design = np.concatenate([hidden, np.ones((hidden.shape[0], 1))], axis=1)
    solution = design.T @ np.linalg.solve(design @ design.T, target)  # (C + 1, A): minimum-norm exact fit
    sd["proposal_generator.rpn_head.objectness_logits.weight"] = solution[:-1].T.astype(np.float32)[:, :, None, None]
    sd["proposal_generator.rpn_head.objectness_logits.bias"] = solution[-1].astype(np.float32)
    centred = hidden - hidden.mean(axis=0)
    delta_w = b.dense(centred, 4 * a, RPN_DELTA_STD)
    sd["proposal_generator.rpn_head.anchor_deltas.weight"] = delta_w[:, :, None, None]
    sd["proposal_generator.rpn_head.anchor_deltas.bias"] = (
        rng.normal(0.0, 0.05, 4 * a) - delta_w.astype(np.float64) @ hidden.mean(axis=0)).astype(np.float32)

    # Box predictor on res5's mean-pooled output: K + 1 class logits (background LAST) and 4 K deltas, centred on
    # the mean feature so that the spread across ROIs, not a common offset, decides the scores.
    mean = pooled.mean(axis=0)
    centred = pooled - mean
    for name, out, std, bias_std in (("cls_score", NUM_CLASSES + 1, CLASS_LOGIT_STD, 1.0),
                                     ("bbox_pred", 4 * NUM_CLASSES, BOX_DELTA_STD, 0.2)):
        weight = b.dense(centred, out, std)
        bias = rng.normal(0.0, bias_std, out) - weight.astype(np.float64) @ mean
        sd[f"roi_heads.box_predictor.{name}.weight"] = weight
        sd[f"roi_heads.box_predictor.{name}.bias"] = bias.astype(np.float32)
    return sd


_CACHE = {}


def state_dict():
    """The Detectron2 R50-C4 state dict (a fresh dict of float32 arrays; built once per process)."""
    if "sd" not in _CACHE:
        _CACHE["sd"] = _build()
    return {name: value.copy() for name, value in _CACHE["sd"].items()}


# --------------------------------------------------------------------------------------------------- gradients


def probes(name, size):
    """``(NUM_PROBES, size)`` float32 random vectors, uniform in ``[-1, 1)``, seeded by the variable name."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    return rng.random((NUM_PROBES, size), dtype=np.float32) * 2.0 - 1.0


def summarize_gradient(name, grad):
    """Norm, sum, the first ``SLICE`` values and ``NUM_PROBES`` projections of a gradient in Detectron2's layout."""
    flat = np.asarray(grad, np.float64).reshape(-1)
    return {
        "shape": list(np.shape(grad)),
        "norm": float(np.linalg.norm(flat)),
        "sum": float(flat.sum()),
        "slice": [float(v) for v in flat[:SLICE]],
        "probes": [float(v) for v in probes(name, flat.size).astype(np.float64) @ flat],
    }


def relative_difference(value, reference, scale=None):
    """``|a - b| / |b|`` for numbers, ``||a - b|| / ||b||`` for vectors; ``scale`` replaces the denominator."""
    a = np.asarray(value, np.float64).reshape(-1)
    b = np.asarray(reference, np.float64).reshape(-1)
    denom = np.linalg.norm(b) if scale is None else scale
    return float(np.linalg.norm(a - b) / max(denom, 1e-30))
