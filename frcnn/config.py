"""Configuration: frozen dataclasses, YAML loading with defaults, ``key=value`` overrides, validation.

The dataclass defaults below are the single source of default values; ``configs/base.yaml`` restates them with a
comment per key (a test keeps the two equal). An experiment file overrides a few keys, optionally on top of another
file named by ``_base_``. Unknown keys and wrong types are errors that name the key and the file.

This module imports nothing from ``frcnn`` but the stdlib-only ``fileio``: everything else reads a :class:`Config`, and only
``frcnn.model.build_model`` turns one into a model.
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import yaml

from frcnn.fileio import atomic_path

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # an installed wheel: frcnn/configs/
if not os.path.isdir(CONFIG_DIR):  # a checkout, also under `pip install -e .`: configs/ at the top of the repository
    CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key (and the file, when there is one)."""


@dataclass(frozen=True)
class InputConfig:
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

    @property
    def train_min_sizes(self):
        """The shorter sides training draws from (one per image), as a tuple."""
        return self.min_size if isinstance(self.min_size, tuple) else (self.min_size,)

    @property
    def test_min_size(self):
        """The shorter side for evaluation, inference and export."""
        return self.min_size_test if self.min_size_test is not None else max(self.train_min_sizes)


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int = 96
    num_val: int = 24
    image_size: int = 256
    max_objects: int = 4
    object_size: Optional[Tuple[float, ...]] = None  # (min, max) object extent in pixels; None: 24..112 * size/256
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    format: str = "voc"  # voc | coco | shapes
    root: Union[str, Tuple[str, ...]] = "data/VOCdevkit/VOC2007"  # one root or a list (VOC07+12)
    train_split: str = "trainval"
    val_split: Optional[str] = "test"
    classes: Optional[Tuple[str, ...]] = None  # read from the data when absent
    use_difficult: bool = False  # train on VOC 'difficult' boxes (evaluation always marks them ignore)
    strict: bool = False  # stop at the first bad file instead of skipping it
    num_parallel_calls: int = -1  # tf.data parallelism; -1 = AUTOTUNE
    shuffle_buffer: int = 1000
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    backbone_weights: str = "none"  # none | imagenet | Keras ResNet-50 .h5 | Detectron2 .pkl | detectron2:<name>
    norm: str = "frozen"  # frozen | batch | group
    freeze_at: int = 2  # 0: train all; 1: freeze the stem (conv1); 2: stem and res2
    anchor_sizes: Tuple[float, ...] = (128.0, 256.0, 512.0)
    anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    feature_stride: int = 16
    anchor_offset: float = 0.5  # anchor centres at (x + offset) * stride; 0.5: cell centres, 0.0: Detectron2
    rpn_channels: int = 1024
    rpn_pre_nms_topk_train: int = 12000
    rpn_post_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 6000
    rpn_post_nms_topk_test: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 0.0  # proposals with a shorter side below this many pixels are dropped
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_box_weights: Tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    rpn_smooth_l1_beta: float = 1.0 / 9.0
    num_rois: int = 128  # ROIs sampled per image in training
    roi_positive_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    roi_bg_iou_low: float = 0.0
    roi_box_weights: Tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    roi_smooth_l1_beta: float = 1.0
    pool_size: int = 14
    head_pooling: str = "avg"  # after res5: avg (to 1x1, Detectron2's C4) | none (Dense sees the whole map)
    sampling_ratio: int = 2  # RoIAlign samples per bin side; 0: adaptive, ceil(ROI side / pool_size) (Detectron2)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    max_detections: int = 100
    rpn_loss_weight: float = 1.0
    roi_loss_weight: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    steps_per_epoch: Optional[int] = None  # steps per epoch (data repeats as needed); None = one pass
    batch_size: int = 2  # global batch (split across replicas)
    lr: float = 0.02  # learning rate at reference_batch_size (scaled linearly with batch_size)
    reference_batch_size: int = 16
    scale_lr: bool = True
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 1e-4
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
    strategy: str = "default"  # default | mirrored | multi_worker
    mixed_precision: str = "off"  # off | mixed_float16 | mixed_bfloat16 | auto (bfloat16 where native)
    jit_compile: bool = False


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 1


@dataclass(frozen=True)
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self):
        return _to_plain(self)

    def replace(self, **sections):
        return dataclasses.replace(self, **sections)

    @property
    def num_classes(self):
        """Number of classes including background (index 0); needs ``data.classes``."""
        if self.data.classes is None:
            raise ConfigError("data.classes is not resolved yet (frcnn.data.resolve_classes fills it from the data)")
        return len(self.data.classes) + 1


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
    if base is not None:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            base_path = resolve_config_path(base)
        data = _merge(_read_yaml(base_path, seen + (path,)), data)
    return data


def parse_override(text):
    """``'model.num_rois=64'`` -> ``('model.num_rois', 64)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=0.01)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
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
    data = _merge({}, data or {})
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

_CHOICES = {
    "data.format": ("voc", "coco", "shapes"),
    "model.norm": ("frozen", "batch", "group"),
    "train.optimizer": ("sgd", "adam"),
    "train.strategy": ("default", "mirrored", "multi_worker"),
    "model.head_pooling": ("avg", "none"),
    "train.mixed_precision": ("off", "mixed_float16", "mixed_bfloat16", "auto"),
    "input.channel_order": ("bgr", "rgb"),
    "train.lr_schedule": ("step", "cosine"),
}


def validate(cfg, source="<config>"):
    """Refuse impossible values before any work starts; each message names the key."""

    def fail(key, why):
        raise ConfigError(f"{source}: key '{key}' {why}")

    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            fail(key, f"must be one of {', '.join(choices)}, got {value!r}")

    positive = [
        "input.max_size", "input.max_gt", "input.size_divisibility",
        "model.feature_stride", "model.rpn_channels", "model.rpn_pre_nms_topk_train",
        "model.rpn_post_nms_topk_train", "model.rpn_pre_nms_topk_test", "model.rpn_post_nms_topk_test",
        "model.rpn_batch_size_per_image", "model.num_rois", "model.pool_size",
        "model.max_detections", "train.epochs", "train.batch_size", "train.lr", "train.reference_batch_size",
        "eval.batch_size", "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.image_size",
        "data.synthetic.max_objects",
    ]
    for key in positive:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node <= 0:
            fail(key, f"must be positive, got {node!r}")
    syn = cfg.data.synthetic
    if syn.object_size is not None and not (len(syn.object_size) == 2
                                            and 4 <= syn.object_size[0] <= syn.object_size[1] < syn.image_size):
        fail("data.synthetic.object_size", "must be null or [min, max] pixels with 4 <= min <= max < "
             f"data.synthetic.image_size ({syn.image_size}), got {list(syn.object_size)}")
    i = cfg.input
    if not i.train_min_sizes or any(v <= 0 for v in i.train_min_sizes):
        fail("input.min_size", f"must be a positive size or a non-empty list of them, got {i.min_size!r}")
    if i.min_size_test is not None and i.min_size_test <= 0:
        fail("input.min_size_test", f"must be positive or null, got {i.min_size_test!r}")
    if i.max_size < max(i.train_min_sizes + (i.test_min_size,)):
        fail("input.max_size", f"({i.max_size}) must be >= input.min_size ({i.min_size}) and input.min_size_test")
    if len(i.pixel_mean) != 3:
        fail("input.pixel_mean", f"must be three numbers (one per channel), got {list(i.pixel_mean)}")
    if len(i.pixel_std) != 3 or any(v <= 0 for v in i.pixel_std):
        fail("input.pixel_std", f"must be three positive numbers, got {list(i.pixel_std)}")
    m = cfg.model
    if not m.anchor_sizes:
        fail("model.anchor_sizes", "must not be empty")
    if not m.anchor_ratios:
        fail("model.anchor_ratios", "must not be empty")
    if any(v <= 0 for v in m.anchor_sizes + m.anchor_ratios):
        fail("model.anchor_sizes/anchor_ratios", "must all be positive")
    for key in ("rpn_box_weights", "roi_box_weights"):
        weights = getattr(m, key)
        if len(weights) != 4 or any(w <= 0 for w in weights):
            fail(f"model.{key}", f"must be four positive numbers, got {list(weights)}")
    for key in ("rpn_positive_fraction", "roi_positive_fraction"):
        if not 0.0 < getattr(m, key) <= 1.0:
            fail(f"model.{key}", f"must be in (0, 1], got {getattr(m, key)}")
    for key in ("rpn_nms_thresh", "nms_thresh", "rpn_fg_iou", "rpn_bg_iou", "roi_fg_iou", "score_thresh"):
        if not 0.0 <= getattr(m, key) <= 1.0:
            fail(f"model.{key}", f"must be in [0, 1], got {getattr(m, key)}")
    if m.rpn_bg_iou > m.rpn_fg_iou:
        fail("model.rpn_bg_iou", f"({m.rpn_bg_iou}) must be <= model.rpn_fg_iou ({m.rpn_fg_iou})")
    if not 0.0 <= m.roi_bg_iou_low < m.roi_fg_iou:
        fail("model.roi_bg_iou_low", f"must be in [0, model.roi_fg_iou), got {m.roi_bg_iou_low}")
    if m.rpn_post_nms_topk_train > m.rpn_pre_nms_topk_train:
        fail("model.rpn_post_nms_topk_train", "must be <= model.rpn_pre_nms_topk_train")
    if m.rpn_post_nms_topk_test > m.rpn_pre_nms_topk_test:
        fail("model.rpn_post_nms_topk_test", "must be <= model.rpn_pre_nms_topk_test")
    if m.sampling_ratio < 0:
        fail("model.sampling_ratio", f"must be >= 0 (0: adaptive), got {m.sampling_ratio}")
    if not 0.0 <= m.anchor_offset < 1.0:
        fail("model.anchor_offset", f"must be in [0, 1), got {m.anchor_offset}")
    if m.freeze_at not in (0, 1, 2, 3, 4):
        fail("model.freeze_at", f"must be 0..4, got {m.freeze_at}")
    if (m.backbone_weights.lower() not in ("none", "imagenet")
            and not m.backbone_weights.startswith("detectron2:")
            and not m.backbone_weights.endswith((".h5", ".weights.h5", ".keras", ".pkl"))):
        fail("model.backbone_weights", "must be none, imagenet, a .h5 file path, a Detectron2 .pkl file path or a "
             f"detectron2:<model zoo name> (see frcnn/pretrained.py), got {m.backbone_weights!r}")
    if cfg.data.classes is not None:
        if not cfg.data.classes:
            fail("data.classes", "must not be empty")
        if len(set(cfg.data.classes)) != len(cfg.data.classes):
            fail("data.classes", "has duplicate names")
        if "__background__" in cfg.data.classes:
            fail("data.classes", "must not list the background class (it is added as index 0)")
    t = cfg.train
    if t.steps_per_epoch is not None and t.steps_per_epoch <= 0:
        fail("train.steps_per_epoch", f"must be positive or null, got {t.steps_per_epoch}")
    if t.clip_norm is not None and t.clip_norm <= 0:
        fail("train.clip_norm", f"must be positive or null, got {t.clip_norm}")
    if t.warmup_steps < 0 or not 0.0 < t.warmup_factor <= 1.0:
        fail("train.warmup_steps/warmup_factor", "need warmup_steps >= 0 and warmup_factor in (0, 1]")
    if t.weight_decay < 0 or t.momentum < 0:
        fail("train.weight_decay/momentum", "must not be negative")
    if t.val_every < 0:
        fail("train.val_every", "must be >= 0")
    if t.checkpoint_every < 0:
        fail("train.checkpoint_every", "must be >= 0")
    if isinstance(cfg.data.root, tuple) and not cfg.data.root:
        fail("data.root", "must not be an empty list")
    return cfg


def data_roots(cfg):
    """``data.root`` as a tuple of paths (one root or several, e.g. VOC2007 and VOC2012)."""
    return (cfg.data.root,) if isinstance(cfg.data.root, str) else tuple(cfg.data.root)
