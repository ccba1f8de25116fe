"""Reading a Detectron2 or Caffe2 checkpoint: a Detectron2 model-zoo ``.pkl`` (``{"model": {name: ndarray},
"__author__": ...}``) or MSRA's ``R-50.pkl`` (Caffe2 blobs: ``{name: ndarray}``, or ``{"blobs": {...}}`` for
Detectron 1 files), read the way Detectron2's ``DetectionCheckpointer._load_file`` reads them
(``checkpoint/detection_checkpoint.py``: ``*_momentum`` blobs dropped) and renamed to Detectron2's names
(``checkpoint/c2_model_loading.py``: ``res2_0_branch2a_bn_s`` -> ``backbone.res2.0.conv1.norm.weight``).

Keys that a checkpoint may hold without use (``pixel_mean``, ``pixel_std``, cached cell anchors,
``num_batches_tracked``; in ``R-50.pkl`` the ImageNet classifier ``fc1000_*`` and ``conv1_b``, which Detectron2 also
leaves unused because its stem has no bias) are set aside as ``ignored``.

Owns: the file formats. Imports no model code and no backend.
"""

import dataclasses
import pickle
import re

import numpy as np

from frcnn.pretrained.registry import PretrainedError

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


def stage_prefix(stage):
    return "roi_heads.res5" if stage == 5 else f"backbone.res{stage}"


def _caffe2_to_detectron2(name):
    """``res2_0_branch2a_bn_s`` -> ``backbone.res2.0.conv1.norm.weight``; None for a name outside the ResNet."""
    match = _C2_NAME.match(name)
    if not match:
        return None
    stage, block, branch, norm, suffix = match.groups()
    if stage is not None:
        module = f"{stage_prefix(int(stage))}.{block}.{_C2_BRANCH[branch]}"
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


