"""Detectron2 weights for this detector: its R50-C4 model-zoo checkpoints and MSRA's ImageNet ``R-50.pkl``.

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

Files. A model-zoo checkpoint is a pickle ``{"model": {name: ndarray}, "__author__": ...}`` with names such as
``backbone.res4.5.conv3.norm.running_var`` and ``roi_heads.box_predictor.cls_score.weight``. ``R-50.pkl`` is a
Caffe2 pickle (``{name: ndarray}``, or ``{"blobs": {...}}`` for Detectron 1 files) with names such as
``res2_0_branch2a_w`` and an affine norm ``res2_0_branch2a_bn_s`` / ``_bn_b`` (statistics folded in); read the
way Detectron2's ``DetectionCheckpointer._load_file`` reads it (``*_momentum`` blobs dropped) and renamed here to
Detectron2's names. Keys that a checkpoint may hold without use (``pixel_mean``, ``pixel_std``, cached cell anchors,
``num_batches_tracked``; in ``R-50.pkl`` the ImageNet classifier ``fc1000_*`` and ``conv1_b``, which Detectron2
also leaves unused because its stem has no bias) are ignored; other unused keys are reported, and unused keys of
the converted parts (e.g. a res4 block 6 of a ResNet-101) refuse the file. A missing or misshaped key refuses the
file, naming the key; nothing is assigned until every tensor has been checked.

Specs (``--weights`` of the tools, ``model.backbone_weights``): ``detectron2:<zoo name>`` (see :data:`ZOO`), downloaded
once with ``keras.utils.get_file`` into ``~/.keras/detectron2`` (``KERAS_HOME``); Detectron2 publishes no checksums,
so the SHA-256 of the file is recorded beside it (``<file>.sha256``) when it first arrives and checked on every later
load. A path to a local ``.pkl`` works the same way offline.

Public API: :func:`is_detectron2_spec`, :func:`zoo_entry`, :func:`resolve`, :func:`read_checkpoint`,
:func:`load_detector_weights` (a whole detector), :func:`load_initial_weights` (trunk + res5, and the RPN from a
detection checkpoint: training initialisation; ``frcnn.build_model`` calls it for these specs in
``model.backbone_weights``) and :func:`default_config`. A whole Detectron2 detector ready to use (what the tools call)
comes from :func:`frcnn.loading.load_pretrained_model`.
"""

import dataclasses
import hashlib
import logging
import os
import pickle
import re

import numpy as np

from frcnn.errors import TrainingError

log = logging.getLogger(__name__)

PREFIX = "detectron2:"
DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/detectron2/"
CACHE_SUBDIR = "detectron2"
D2_NORM_EPSILON = 1e-5  # FrozenBatchNorm2d's eps
D2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)  # detectron2/config/defaults.py, MODEL.PIXEL_MEAN (BGR)
D2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)

# Detectron2's COCO class order (builtin_meta.COCO_CATEGORIES with isthing=1, i.e. increasing category id) and the
# COCO category id of each; cls_score row i (i < 80) is COCO_CLASSES[i].
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
# detectron2/data/datasets/pascal_voc.py CLASS_NAMES
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class PretrainedError(TrainingError):
    """A Detectron2 file that cannot be used (missing, swapped, another architecture); the message says why."""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str  # Detectron2's config path without .yaml, e.g. COCO-Detection/faster_rcnn_R_50_C4_3x
    url: str
    config: str  # the frcnn config reproducing its test-time settings (and training recipe)
    published: str  # the figure MODEL_ZOO.md gives
    backbone_only: bool = False

    @property
    def filename(self):
        """Name of the cached file: the model id and Detectron2's file name (unique across the zoo)."""
        return "_".join(self.url.split("/")[-2:])  # 137849393_model_final_f97cb7.pkl, MSRA_R-50.pkl


def _zoo_url(name, suffix):
    return f"{DOWNLOAD_ROOT}{name}/{suffix}"


# detectron2/model_zoo/model_zoo.py (_ModelZooUrls) and MODEL_ZOO.md
ZOO = {
    entry.name: entry
    for entry in (
        ZooEntry("COCO-Detection/faster_rcnn_R_50_C4_1x", _zoo_url("COCO-Detection/faster_rcnn_R_50_C4_1x",
                 "137257644/model_final_721ade.pkl"), "detectron2_coco_R50_C4_1x.yaml", "COCO val2017 box AP 35.7"),
        ZooEntry("COCO-Detection/faster_rcnn_R_50_C4_3x", _zoo_url("COCO-Detection/faster_rcnn_R_50_C4_3x",
                 "137849393/model_final_f97cb7.pkl"), "detectron2_coco_R50_C4_3x.yaml", "COCO val2017 box AP 38.4"),
        ZooEntry("PascalVOC-Detection/faster_rcnn_R_50_C4", _zoo_url("PascalVOC-Detection/faster_rcnn_R_50_C4",
                 "142202221/model_final_b1acc2.pkl"), "detectron2_voc_R50_C4.yaml",
                 "VOC2007 test AP50 80.3 (11-point)"),
        ZooEntry("ImageNetPretrained/MSRA/R-50", DOWNLOAD_ROOT + "ImageNetPretrained/MSRA/R-50.pkl", None,
                 "ImageNet (MSRA ResNet-50)", backbone_only=True),
    )
}


# --------------------------------------------------------------------------------------------- specs and files


def is_detectron2_spec(weights):
    """True for ``detectron2:<name>`` and for paths of ``.pkl`` files (handled here, not by Keras)."""
    return isinstance(weights, (str, os.PathLike)) and (
        os.fspath(weights).startswith(PREFIX) or os.fspath(weights).endswith(".pkl"))


def zoo_entry(spec):
    """The :class:`ZooEntry` of ``detectron2:<name>`` (``<name>`` with or without ``.yaml``/``.pkl``)."""
    name = os.fspath(spec)
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    name = re.sub(r"\.(yaml|pkl)$", "", name.strip().strip("/"))
    if name not in ZOO:
        raise PretrainedError(f"unknown Detectron2 model '{spec}'; this detector (ResNet-50-C4) can load: "
                              + ", ".join(PREFIX + n for n in ZOO))
    return ZOO[name]


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _md5_prefix_note(path):
    """MODEL_ZOO.md says a zoo file name carries its md5 prefix (``model_final_721ade.pkl``): say whether it does."""
    match = re.search(r"_([0-9a-f]{6})\.pkl$", os.path.basename(path))
    if not match:
        return
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    if md5.hexdigest().startswith(match.group(1)):
        log.info("%s: its md5 starts with %s, as its name says", path, match.group(1))
    else:
        log.warning("%s: its md5 is %s, which does not start with the %s in its name (Detectron2's MODEL_ZOO.md "
                    "says zoo file names carry their md5 prefix); if loading fails, delete it to download again",
                    path, md5.hexdigest(), match.group(1))


def check_sidecar(path, fresh):
    """Record (first arrival) or check the SHA-256 of a cached file in ``<path>.sha256``. Returns the digest.

    ``fresh``: the file was just downloaded. A cached file without a record is recorded too, with a warning that it
    could not be checked. A file whose digest differs from its record is refused.
    """
    sidecar = path + ".sha256"
    digest = sha256_file(path)
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="ascii", errors="replace") as f:
            text = f.read().split()
        recorded = text[0].lower() if text else ""
        if recorded != digest:
            raise PretrainedError(
                f"cached file '{path}' has SHA-256 {digest}, but {recorded or '(nothing)'} was recorded in "
                f"'{sidecar}' when it was downloaded: the file was modified, truncated or replaced. Delete both "
                "files to download it again."
            )
        return digest
    tmp = sidecar + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(tmp, sidecar)
    if fresh:
        log.info("downloaded %s; recorded its SHA-256 %s in %s", path, digest, sidecar)
        _md5_prefix_note(path)
    else:
        log.warning("%s was already cached without a SHA-256 record (from before this check existed, or copied "
                    "there by hand); recorded %s now, later loads are checked against it", path, digest)
    return digest


def _get_file(fname, origin, cache_dir, cache_subdir):
    import keras

    return keras.utils.get_file(fname, origin=origin, cache_dir=cache_dir, cache_subdir=cache_subdir)


def resolve(spec, cache_dir=None):
    """A local file for ``spec``: a path as given (it must exist), or the cached download of a zoo name.

    ``cache_dir``: where Keras caches (default ``$KERAS_HOME`` or ``~/.keras``); files go to its ``detectron2/``.
    """
    spec = os.fspath(spec)
    if not spec.startswith(PREFIX):
        if not os.path.isfile(spec):
            raise PretrainedError(f"Detectron2 weights file '{spec}' does not exist")
        sidecar = spec + ".sha256"
        if os.path.isfile(sidecar):
            check_sidecar(spec, fresh=False)
        return spec
    entry = zoo_entry(spec)
    base = cache_dir or os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    target = os.path.join(base, CACHE_SUBDIR, entry.filename)
    existed = os.path.isfile(target)
    try:
        path = _get_file(entry.filename, entry.url, base, CACHE_SUBDIR)
    except Exception as err:  # no network, proxy, HTTP error, interrupted download
        raise PretrainedError(
            f"could not download {spec} from {entry.url} ({type(err).__name__}: {err}). Offline, download that "
            f"file elsewhere and either pass its path instead of {spec} or copy it to {target}"
        ) from err
    check_sidecar(path, fresh=not existed)
    return path


# --------------------------------------------------------------------------------------------- reading a file


@dataclasses.dataclass
class Checkpoint:
    """Tensors of a Detectron2 or Caffe2 file under Detectron2's names. ``origin`` maps a name to the file's own
    name (they differ for Caffe2 files), ``ignored`` lists keys expected to be unused, ``extra`` the others."""

    path: str
    format: str  # "detectron2" | "caffe2"
    tensors: dict
    origin: dict
    ignored: list
    author: str = None

    def describe(self, name):
        own = self.origin.get(name) or (_detectron2_to_caffe2(name) if self.format == "caffe2" else None) or name
        return name if own == name else f"{own} (Detectron2 name {name})"


_D2_IGNORED = re.compile(r"^(pixel_mean|pixel_std)$|num_batches_tracked$|anchor_generator\.cell_anchors")
_C2_IGNORED = re.compile(r"^(fc1000_[wb]|pred_[wb]|conv1_b)$")
_C2_NAME = re.compile(r"^(?:res(\d)_(\d+)_branch(1|2a|2b|2c)|res_conv1|conv1)(?:_(bn|gn))?_(w|b|s|rm|riv)$")
_C2_BRANCH = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}
_C2_SUFFIX = {"w": "weight", "b": "bias", "s": "weight", "rm": "running_mean", "riv": "running_var"}


def _stage_prefix(stage):
    return "roi_heads.res5" if stage == 5 else f"backbone.res{stage}"


def _caffe2_to_detectron2(name):
    """``res2_0_branch2a_bn_s`` -> ``backbone.res2.0.conv1.norm.weight``; None for a name outside the ResNet."""
    match = _C2_NAME.match(name)
    if not match:
        return None
    stage, block, branch, norm, suffix = match.groups()
    if stage is not None:
        module = f"{_stage_prefix(int(stage))}.{block}.{_C2_BRANCH[branch]}"
    else:
        module = "backbone.stem.conv1"
        if name.startswith("res_conv1") != bool(norm):  # conv1_w is the conv; res_conv1_bn_* its norm
            return None
    return f"{module}.norm.{_C2_SUFFIX[suffix]}" if norm else f"{module}.{_C2_SUFFIX[suffix]}"


def _detectron2_to_caffe2(name):
    """Inverse of :func:`_caffe2_to_detectron2` for the ResNet names (for messages); None otherwise."""
    inverse = {v: k for k, v in _C2_BRANCH.items()}
    suffix = {"weight": "w", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    match = re.match(r"^(?:backbone\.stem\.conv1|(?:backbone|roi_heads)\.res(\d)\.(\d+)\.(shortcut|conv[123]))"
                     r"(\.norm)?\.(weight|bias|running_mean|running_var)$", name)
    if not match:
        return None
    stage, block, branch, norm, what = match.groups()
    if norm and what == "weight":
        what_c2 = "s"
    else:
        what_c2 = suffix[what]
    if stage is None:
        return f"res_conv1_bn_{what_c2}" if norm else f"conv1_{what_c2}"
    return f"res{stage}_{block}_branch{inverse[branch]}" + ("_bn" if norm else "") + f"_{what_c2}"


def _as_array(name, value, path):
    if hasattr(value, "detach"):  # a torch tensor, if someone saved one
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.number):
        raise PretrainedError(f"{path}: entry '{name}' is not a numeric array ({type(value).__name__})")
    return value


def read_checkpoint(path):
    """Read a Detectron2 model-zoo ``.pkl`` or a Caffe2 ``R-50.pkl`` into a :class:`Checkpoint`."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise PretrainedError(f"'{path}' is not a readable Detectron2 pickle ({type(err).__name__}: {err}); "
                              "is it complete?") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"'{path}' holds a {type(data).__name__}, not a Detectron2 checkpoint dict")
    if "model" in data and isinstance(data["model"], dict):  # Detectron2 (zoo file or a training checkpoint)
        author = data.get("__author__")
        tensors, origin, ignored = {}, {}, []
        for name, value in data["model"].items():
            if _D2_IGNORED.search(name):
                ignored.append(name)
                continue
            tensors[name] = _as_array(name, value, path)
        return Checkpoint(path, "detectron2", tensors, origin, ignored, author)
    blobs = data["blobs"] if isinstance(data.get("blobs"), dict) else data  # Detectron 1 files keep them there
    tensors, origin, ignored = {}, {}, []
    for name, value in blobs.items():
        if name.endswith("_momentum") or _C2_IGNORED.match(name):
            ignored.append(name)
            continue
        new = _caffe2_to_detectron2(name)
        if new is None:
            new = name  # reported as unknown later
        tensors[new] = _as_array(name, value, path)
        origin[new] = name
    if not tensors:
        raise PretrainedError(f"'{path}' holds no weights (keys: {sorted(data)[:10]})")
    return Checkpoint(path, "caffe2", tensors, origin, ignored, "Caffe2")


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
            d2_block = f"{_stage_prefix(stage)}.{i}"
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
    kind = model.cfg.model.norm
    if kind not in ("frozen", "batch"):
        raise PretrainedError(f"Detectron2 weights need model.norm: frozen (or batch); this model has "
                              f"model.norm: {kind} (GroupNorm cannot take BatchNorm weights and statistics)")
    return kind


def _plan_resnet(model, assign, parts):
    """Stem, res2-res4 (trunk) and res5: conv kernels, zero biases, norms."""
    layers = _target_layers(model)
    ckpt = assign.checkpoint
    fold = _norm_kind(model) == "frozen"
    rgb = model.cfg.input.channel_order == "rgb"
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
    i = model.cfg.input
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
                 "the trunk, RPN and res5 come from %s", model.cfg.num_classes - 1, ckpt.path)
    _input_warnings(model)
    return ckpt


# -------------------------------------------------------------------------------------------------- the tools


def default_config(spec, checkpoint=None):
    """The config (a name under ``configs/``) for a detector spec: the zoo entry's, or for a local file the one
    whose zoo file name it carries, else by its number of classes (80: COCO, 20: VOC)."""
    spec = os.fspath(spec)
    if spec.startswith(PREFIX):
        entry = zoo_entry(spec)
        if entry.backbone_only:
            raise PretrainedError(f"{spec} is an ImageNet backbone, not a detector: use it as "
                                  "model.backbone_weights for training")
        return entry.config
    base = os.path.basename(spec)
    for entry in ZOO.values():
        if entry.url.endswith("/" + base) or base == entry.filename:
            if entry.config:
                return entry.config
    if checkpoint is not None:
        cls = checkpoint.tensors.get("roi_heads.box_predictor.cls_score.weight")
        if cls is not None and cls.shape[0] - 1 == len(COCO_CLASSES):
            return ZOO["COCO-Detection/faster_rcnn_R_50_C4_3x"].config
        if cls is not None and cls.shape[0] - 1 == len(VOC_CLASSES):
            return ZOO["PascalVOC-Detection/faster_rcnn_R_50_C4"].config
    raise PretrainedError(f"cannot tell which config fits '{spec}'; pass --config (e.g. "
                          f"{ZOO['COCO-Detection/faster_rcnn_R_50_C4_3x'].config} with data.classes set to the "
                          "checkpoint's classes in its order)")
