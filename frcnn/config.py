"""Configuration: frozen dataclasses, YAML loading with defaults, ``key=value`` overrides, validation.

The dataclass defaults below are the single source of default values; ``configs/base.yaml`` restates them with a
comment per key (a test keeps the two equal). An experiment file overrides a few keys, optionally on top of another
file named by ``_base_``. Unknown keys and wrong types are errors that name the key and the file.

Sections: ``input`` (resize, pad, normalise), ``data`` (datasets), ``model`` (backbone: weights, norm, freezing,
stride), ``anchors``, ``rpn``, ``roi_heads``, ``train`` and ``eval``. Each section's dataclass checks its own values;
:func:`validate` runs them and the few rules that span sections. The keys of frcnn 0.1's flat ``model`` section
(``model.num_rois``, ``model.rpn_channels``, ...) still load, mapped by :data:`LEGACY_KEYS`.

Owns: the config format. Must not import anything from ``frcnn`` but the stdlib-only ``fileio``: everything else
reads a :class:`Config`, and only the factories (``from_cfg`` of the parts, ``frcnn.model.build_model``) turn one
into objects.
"""

import dataclasses
import logging
import os
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import yaml

from frcnn.fileio import atomic_path

log = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # an installed wheel: frcnn/configs/
if not os.path.isdir(CONFIG_DIR):  # a checkout, also under `pip install -e .`: configs/ at the top of the repository
    CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key (and the file, when there is one)."""


def class_name_problem(name):
    """Why ``name`` cannot be a class name (a string), or None. Names are data, not layout: a newline, tab or other
    control character (Unicode categories Cc, Zl, Zp: what ``str.splitlines`` splits on, among others) would shift
    or merge lines of a file of names, so it is refused wherever names are read (``data.classes``, VOC ``<name>``,
    COCO category names); so is an empty name."""
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if not name.strip():
        return "an empty name"
    bad = sorted({c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")})
    if bad:
        return f"{name!r} holds the control character{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}"
    return None


class _Section:
    """A config section that checks its own values: :meth:`validate` calls ``fail(key, why)`` (``key`` relative to
    the section) for the first impossible value. ``_CHOICES`` and ``_POSITIVE`` cover the common rules; ``_check``
    the section's own."""

    _CHOICES = {}
    _POSITIVE = ()

    def validate(self, fail):
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                fail(name, f"must be one of {', '.join(map(str, choices))}, got {getattr(self, name)!r}")
        for name in self._POSITIVE:
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)!r}")
        self._check(fail)

    def _check(self, fail):
        pass


def _in_unit_interval(section, fail, names, open_low=False):
    for name in names:
        value = getattr(section, name)
        if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
            fail(name, f"must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value}")


def _box_weights(fail, name, weights):
    if len(weights) != 4 or any(w <= 0 for w in weights):
        fail(name, f"must be four positive numbers, got {list(weights)}")


@dataclass(frozen=True)
class InputConfig(_Section):
    min_size: Union[int, Tuple[int, ...]] = 600  # shorter side after resizing (pixels); a list: one drawn per image
    min_size_test: Optional[int] = None  # shorter side at test time; None: min_size (the largest, for a list)
    max_size: int = 1000  # cap on the longer side
    flip: bool = True  # random horizontal flip in training
    max_gt: int = 100  # ground-truth boxes per image are padded (or cut) to this many
    size_divisibility: int = 32  # a padded batch's height and width are multiples of this
    fixed_size: bool = False  # pad every batch to (max_size, max_size): static shapes for XLA
    channel_order: str = "bgr"  # order of the colour channels the network sees: bgr (Caffe/Detectron2) | rgb
    pixel_mean: Tuple[float, ...] = (103.939, 116.779, 123.68)  # subtracted per channel, in channel_order
    pixel_std: Tuple[float, ...] = (1.0, 1.0, 1.0)  # then divided per channel, in channel_order

    _CHOICES = {"channel_order": ("bgr", "rgb")}
    _POSITIVE = ("max_size", "max_gt", "size_divisibility")

    @property
    def train_min_sizes(self):
        """The shorter sides training draws from (one per image), as a tuple."""
        return self.min_size if isinstance(self.min_size, tuple) else (self.min_size,)

    @property
    def test_min_size(self):
        """The shorter side for evaluation, inference and export."""
        return self.min_size_test if self.min_size_test is not None else max(self.train_min_sizes)

    def _check(self, fail):
        if not self.train_min_sizes or any(v <= 0 for v in self.train_min_sizes):
            fail("min_size", f"must be a positive size or a non-empty list of them, got {self.min_size!r}")
        if self.min_size_test is not None and self.min_size_test <= 0:
            fail("min_size_test", f"must be positive or null, got {self.min_size_test!r}")
        if self.max_size < max(self.train_min_sizes + (self.test_min_size,)):
            fail("max_size", f"({self.max_size}) must be >= input.min_size ({self.min_size}) and "
                             "input.min_size_test")
        if len(self.pixel_mean) != 3:
            fail("pixel_mean", f"must be three numbers (one per channel), got {list(self.pixel_mean)}")
        if len(self.pixel_std) != 3 or any(v <= 0 for v in self.pixel_std):
            fail("pixel_std", f"must be three positive numbers, got {list(self.pixel_std)}")


@dataclass(frozen=True)
class SyntheticConfig(_Section):
    num_train: int = 96
    num_val: int = 24
    image_size: int = 256
    max_objects: int = 4
    object_size: Optional[Tuple[float, ...]] = None  # (min, max) object extent in pixels; None: 24..112 * size/256
    seed: int = 0

    _POSITIVE = ("num_train", "num_val", "image_size", "max_objects")

    def _check(self, fail):
        size = self.object_size
        if size is not None and not (len(size) == 2 and 4 <= size[0] <= size[1] < self.image_size):
            fail("object_size", "must be null or [min, max] pixels with 4 <= min <= max < "
                                f"data.synthetic.image_size ({self.image_size}), got {list(size)}")


@dataclass(frozen=True)
class DataConfig(_Section):
    format: str = "voc"  # voc | coco | shapes
    root: Union[str, Tuple[str, ...]] = "data/VOCdevkit/VOC2007"  # one root or a list (VOC07+12)
    train_split: str = "trainval"
    val_split: Optional[str] = "test"
    classes: Optional[Tuple[str, ...]] = None  # read from the data when absent
    use_difficult: bool = False  # train on VOC 'difficult' boxes (evaluation always marks them ignore)
    strict: bool = False  # stop at the first bad file instead of skipping it
    num_parallel_calls: int = -1  # input pipeline parallelism; -1 = automatic
    shuffle_buffer: int = 1000
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    _CHOICES = {"format": ("voc", "coco", "shapes")}

    def _check(self, fail):
        if isinstance(self.root, tuple) and not self.root:
            fail("root", "must not be an empty list")
        if self.classes is not None:
            if not self.classes:
                fail("classes", "must not be empty")
            if len(set(self.classes)) != len(self.classes):
                fail("classes", "has duplicate names")
            if "__background__" in self.classes:
                fail("classes", "must not list the background class (it is added as index 0)")
            for name in self.classes:
                problem = class_name_problem(name)
                if problem:
                    fail("classes", f"has a name that cannot be a class name: {problem}")
        self.synthetic.validate(lambda key, why: fail(f"synthetic.{key}", why))


@dataclass(frozen=True)
class ModelConfig(_Section):
    backbone_weights: str = "none"  # none | imagenet | Keras ResNet-50 .h5 | Detectron2 .pkl | detectron2:<name>
    norm: str = "frozen"  # frozen | batch | group
    freeze_at: int = 2  # 0: train all; 1: freeze the stem (conv1); 2: stem and res2
    feature_stride: int = 16  # stride of the res4 feature map

    _CHOICES = {"norm": ("frozen", "batch", "group"), "freeze_at": (0, 1, 2, 3, 4)}
    _POSITIVE = ("feature_stride",)

    def _check(self, fail):
        weights = self.backbone_weights
        if (weights.lower() not in ("none", "imagenet") and not weights.startswith("detectron2:")
                and not weights.endswith((".h5", ".weights.h5", ".keras", ".pkl"))):
            fail("backbone_weights", "must be none, imagenet, a .h5 file path, a Detectron2 .pkl file path or a "
                                     f"detectron2:<model zoo name> (see README), got {weights!r}")


@dataclass(frozen=True)
class AnchorConfig(_Section):
    sizes: Tuple[float, ...] = (128.0, 256.0, 512.0)  # side lengths (square root of the area), input pixels
    ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    offset: float = 0.5  # anchor centres at (x + offset) * stride; 0.5: cell centres, 0.0: Detectron2

    def _check(self, fail):
        for name in ("sizes", "ratios"):
            values = getattr(self, name)
            if not values:
                fail(name, "must not be empty")
            if any(v <= 0 for v in values):
                fail(name, f"must all be positive, got {list(values)}")
        if not 0.0 <= self.offset < 1.0:
            fail("offset", f"must be in [0, 1), got {self.offset}")


@dataclass(frozen=True)
class RPNConfig(_Section):
    channels: int = 1024  # channels of the head's 3x3 conv
    pre_nms_topk_train: int = 12000
    post_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 6000
    post_nms_topk_test: int = 300
    nms_thresh: float = 0.7
    min_size: float = 0.0  # proposals with a shorter side below this many pixels are dropped
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    box_weights: Tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    smooth_l1_beta: float = 1.0 / 9.0
    loss_weight: float = 1.0

    _POSITIVE = ("channels", "pre_nms_topk_train", "post_nms_topk_train", "pre_nms_topk_test",
                 "post_nms_topk_test", "batch_size_per_image")

    def _check(self, fail):
        _box_weights(fail, "box_weights", self.box_weights)
        _in_unit_interval(self, fail, ("positive_fraction",), open_low=True)
        _in_unit_interval(self, fail, ("nms_thresh", "fg_iou", "bg_iou"))
        if self.bg_iou > self.fg_iou:
            fail("bg_iou", f"({self.bg_iou}) must be <= rpn.fg_iou ({self.fg_iou})")
        for mode in ("train", "test"):
            if getattr(self, f"post_nms_topk_{mode}") > getattr(self, f"pre_nms_topk_{mode}"):
                fail(f"post_nms_topk_{mode}", f"must be <= rpn.pre_nms_topk_{mode}")


@dataclass(frozen=True)
class ROIHeadsConfig(_Section):
    num_rois: int = 128  # ROIs sampled per image in training
    positive_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_low: float = 0.0
    box_weights: Tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 1.0
    pool_size: int = 14
    head_pooling: str = "avg"  # after res5: avg (to 1x1, Detectron2's C4) | none (Dense sees the whole map)
    sampling_ratio: int = 2  # RoIAlign samples per bin side; 0: adaptive, ceil(ROI side / pool_size) (Detectron2)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    max_detections: int = 100
    loss_weight: float = 1.0

    _CHOICES = {"head_pooling": ("avg", "none")}
    _POSITIVE = ("num_rois", "pool_size", "max_detections")

    def _check(self, fail):
        _box_weights(fail, "box_weights", self.box_weights)
        _in_unit_interval(self, fail, ("positive_fraction",), open_low=True)
        _in_unit_interval(self, fail, ("fg_iou", "nms_thresh", "score_thresh"))
        if not 0.0 <= self.bg_iou_low < self.fg_iou:
            fail("bg_iou_low", f"must be in [0, roi_heads.fg_iou), got {self.bg_iou_low}")
        if self.sampling_ratio < 0:
            fail("sampling_ratio", f"must be >= 0 (0: adaptive), got {self.sampling_ratio}")


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = 12
    steps_per_epoch: Optional[int] = None  # steps per epoch (data repeats as needed); None = one pass
    batch_size: int = 2  # global batch (split across replicas)
    lr: float = 0.02  # learning rate at reference_batch_size (scaled linearly with batch_size)
    reference_batch_size: int = 16
    scale_lr: bool = True
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 1e-4  # of the kernels
    weight_decay_bias: Optional[float] = 0.0  # of the biases; None: weight_decay (Detectron2's WEIGHT_DECAY_BIAS)
    weight_decay_norm: float = 0.0  # of the normalisation gammas and betas
    weight_decay_mode: str = "decoupled"  # decoupled (Keras) | coupled (L2 in the gradient: torch's SGD, Detectron2)
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    lr_schedule: str = "step"  # step (x lr_gamma at lr_decay_epochs) | cosine (to 0 at the last step)
    lr_decay_epochs: Tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1
    clip_norm: Optional[float] = None
    seed: int = 0
    val_every: int = 1  # run the validation evaluation every N epochs (0: never)
    val_max_images: Optional[int] = None
    checkpoint_every: int = 500  # also save the last checkpoint every N steps (0: only at epoch ends)
    strategy: str = "default"  # default | mirrored | multi_worker (tf.distribute) | data_parallel (JAX)
    mixed_precision: str = "off"  # off | mixed_float16 | mixed_bfloat16 | auto (bfloat16 where native)
    jit_compile: bool = False
    speed_paths: str = "auto"  # kernels chosen by measurement on a CPU: auto (on a CPU only) | on | off

    _CHOICES = {
        "optimizer": ("sgd", "adam"),
        "lr_schedule": ("step", "cosine"),
        "strategy": ("default", "mirrored", "multi_worker", "data_parallel"),
        "mixed_precision": ("off", "mixed_float16", "mixed_bfloat16", "auto"),
        "speed_paths": ("auto", "on", "off"),
        "weight_decay_mode": ("decoupled", "coupled"),
    }
    _POSITIVE = ("epochs", "batch_size", "lr", "reference_batch_size")

    def _check(self, fail):
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            fail("steps_per_epoch", f"must be positive or null, got {self.steps_per_epoch}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            fail("clip_norm", f"must be positive or null, got {self.clip_norm}")
        if self.warmup_steps < 0 or not 0.0 < self.warmup_factor <= 1.0:
            fail("warmup_steps/warmup_factor", "need warmup_steps >= 0 and warmup_factor in (0, 1]")
        if self.weight_decay < 0 or self.momentum < 0:
            fail("weight_decay/momentum", "must not be negative")
        if (self.weight_decay_bias is not None and self.weight_decay_bias < 0) or self.weight_decay_norm < 0:
            fail("weight_decay_bias/weight_decay_norm", "must not be negative")
        for name in ("val_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")


@dataclass(frozen=True)
class EvalConfig(_Section):
    batch_size: int = 1

    _POSITIVE = ("batch_size",)


@dataclass(frozen=True)
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self):
        return _to_plain(self)

    def replace(self, **sections):
        return dataclasses.replace(self, **sections)

    def with_values(self, **values):
        """A copy with ``section__key=value`` pairs replaced (``cfg.with_values(roi_heads__score_thresh=0.0)``),
        validated; a shorthand for nested ``dataclasses.replace``."""
        sections = {}
        for name, value in values.items():
            section, key = name.split("__", 1)
            sections.setdefault(section, {})[key] = value
        cfg = self.replace(**{s: dataclasses.replace(getattr(self, s), **kv) for s, kv in sections.items()})
        return validate(cfg)

    @property
    def num_classes(self):
        """Number of classes including background (index 0); needs ``data.classes``."""
        if self.data.classes is None:
            raise ConfigError("data.classes is not resolved yet (frcnn.data.resolve_classes fills it from the data)")
        return len(self.data.classes) + 1


# Keys of the flat model section of frcnn 0.1 -> their sections today. YAML files, --set overrides and saved
# config.yaml files written with the old names keep loading.
LEGACY_KEYS = {
    "model.anchor_sizes": "anchors.sizes",
    "model.anchor_ratios": "anchors.ratios",
    "model.anchor_offset": "anchors.offset",
    "model.rpn_channels": "rpn.channels",
    **{f"model.rpn_{key}": f"rpn.{key}" for key in (
        "pre_nms_topk_train", "post_nms_topk_train", "pre_nms_topk_test", "post_nms_topk_test", "nms_thresh",
        "min_size", "batch_size_per_image", "positive_fraction", "fg_iou", "bg_iou", "box_weights",
        "smooth_l1_beta", "loss_weight")},
    "model.num_rois": "roi_heads.num_rois",
    **{f"model.roi_{key}": f"roi_heads.{key}" for key in (
        "positive_fraction", "fg_iou", "bg_iou_low", "box_weights", "smooth_l1_beta", "loss_weight")},
    **{f"model.{key}": f"roi_heads.{key}" for key in (
        "pool_size", "head_pooling", "sampling_ratio", "score_thresh", "nms_thresh", "max_detections")},
}


# --------------------------------------------------------------------------------------------------- conversion


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp):
    """``int``, ``list of float``, ``int or list of int``, ``str or null``: for error messages."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, Tuple):
        return "list of " + _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key, source):
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples, ints to floats."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue  # the next option may fit; the message below names them all
        raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, source, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare off / on as a boolean
            return "on" if value else "off"
    raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")


def _from_dict(cls, data, source, prefix=""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys in '{prefix.rstrip('.') or 'top level'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, source)
    return cls(**kwargs)


def upgrade_legacy_keys(data, source="<config>"):
    """``data`` (a config dict) with the keys of :data:`LEGACY_KEYS` moved to their sections (a new dict). A file
    that sets a key under both names is refused."""
    model = data.get("model")
    if not isinstance(model, dict) or not any(f"model.{key}" in LEGACY_KEYS for key in model):
        return data
    data = {name: dict(value) if isinstance(value, dict) else value for name, value in data.items()}
    for key in list(model):
        new = LEGACY_KEYS.get(f"model.{key}")
        if new is None:
            continue
        section, name = new.split(".")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{source}: key '{section}' must be a mapping, got {target!r}")
        if name in target:
            raise ConfigError(f"{source}: key 'model.{key}' is the old name of '{new}', which is set too")
        target[name] = data["model"].pop(key)
        log.debug("%s: config key model.%s is now %s", source, key, new)
    return data


def _merge(base, override):
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------------ loading


def resolve_config_path(name_or_path):
    """A path as given if it exists, else a file of that name in ``configs/`` (``voc``, ``voc.yaml``)."""
    candidates = [name_or_path]
    if not os.path.isabs(name_or_path):
        candidates.append(os.path.join(CONFIG_DIR, name_or_path))
        if not name_or_path.endswith((".yaml", ".yml")):
            candidates.append(os.path.join(CONFIG_DIR, name_or_path + ".yaml"))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ConfigError(f"config '{name_or_path}' not found (looked in: {', '.join(candidates)})")


def _read_yaml(path, seen=()):
    if path in seen:
        raise ConfigError(f"{path}: '_base_' chain loops back to itself")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    data = upgrade_legacy_keys(data, path)
    if base is not None:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            base_path = resolve_config_path(base)
        data = _merge(_read_yaml(base_path, seen + (path,)), data)
    return data


def parse_override(text):
    """``'roi_heads.num_rois=64'`` -> ``('roi_heads.num_rois', 64)``; the value is read as YAML, an old key is
    mapped (:data:`LEGACY_KEYS`)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=0.01)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    key = LEGACY_KEYS.get(key, key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(data, key, value):
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data, source="<dict>", overrides=()):
    data = upgrade_legacy_keys(_merge({}, data or {}), source)
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(data, key, value)
    source_name = source if not overrides else f"{source} (with overrides {list(overrides)})"
    cfg = _from_dict(Config, data, source_name)
    validate(cfg, source_name)
    return cfg


def load_config(name_or_path=None, overrides=()):
    """Load a config by name (``voc``, ``voc.yaml``) or path, apply ``key=value`` overrides, validate.

    ``None`` gives the defaults. Raises :class:`ConfigError` naming the file and key on any problem.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    if name_or_path is None:
        return config_from_dict({}, "<defaults>", overrides)
    path = resolve_config_path(name_or_path)
    return config_from_dict(_read_yaml(path), path, overrides)


def save_config(cfg, path):
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    with atomic_path(path, ".yaml") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# --------------------------------------------------------------------------------------------------- validation

SECTIONS = ("input", "data", "model", "anchors", "rpn", "roi_heads", "train", "eval")


def validate(cfg, source="<config>"):
    """Refuse impossible values before any work starts; each message names the key. Each section checks its own
    values (``validate`` of the section's dataclass); the rules that span sections are here."""

    def failing(prefix):
        def fail(key, why):
            raise ConfigError(f"{source}: key '{prefix}{key}' {why}")
        return fail

    for name in SECTIONS:
        getattr(cfg, name).validate(failing(name + "."))
    fail = failing("")
    weights = cfg.model.backbone_weights
    if (weights.startswith("detectron2:") or weights.endswith(".pkl")) and cfg.model.norm == "group":
        fail("model.norm", "must be frozen or batch with Detectron2 weights in model.backbone_weights (GroupNorm "
                           "cannot take BatchNorm weights and statistics)")
    return cfg


def data_roots(cfg):
    """``data.root`` as a tuple of paths (one root or several, e.g. VOC2007 and VOC2012)."""
    return (cfg.data.root,) if isinstance(cfg.data.root, str) else tuple(cfg.data.root)
