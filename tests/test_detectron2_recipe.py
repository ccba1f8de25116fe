"""frcnn's configs/detectron2_*.yaml hold Detectron2's own R50-C4 training recipes, key by key.

Detectron2's config files (commit 02b5c4e, Apache-2.0, tests/data/detectron2/NOTICE) are read here without
Detectron2: ``detectron2/config/defaults.py`` is parsed with :mod:`ast` (every ``_C.A.B = <literal>``), the YAML
files are merged as Detectron2's ``CfgNode.merge_from_file`` merges them (``_BASE_`` first, the file over it, the
result over the defaults). :data:`MAPPING` pairs each training key with frcnn's; :data:`FIXED` lists the Detectron2
keys that frcnn has no key for because it always does what that value says; :data:`NOT_EQUAL` lists what cannot be
equal, with the reason (the README repeats it).
"""

import ast
import os

import pytest
import yaml

from frcnn import optim
from frcnn.config import load_config

D2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "detectron2")

RECIPES = {  # frcnn config -> Detectron2 config
    "detectron2_coco_R50_C4_1x.yaml": "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
    "detectron2_coco_R50_C4_3x.yaml": "COCO-Detection/faster_rcnn_R_50_C4_3x.yaml",
    "detectron2_voc_R50_C4.yaml": "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml",
}


# --------------------------------------------------------------------------------------- Detectron2's config


def _value(node):
    """A literal of defaults.py: constants, lists, tuples, dicts, arithmetic on numbers, ``CN()`` / ``CN({...})``."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "CN":
        return _value(node.args[0]) if node.args else {}
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left), _value(node.right)
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b}
        return ops[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


UNREAD = "<not a literal>"


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return parts[::-1] if isinstance(node, ast.Name) and node.id == "_C" else None


def detectron2_defaults():
    """``detectron2/config/defaults.py`` as a nested dict, read with ``ast`` (nothing is imported or run)."""
    with open(os.path.join(D2, "detectron2", "config", "defaults.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cfg = {}
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            continue
        path = _dotted(stmt.targets[0])
        if not path:
            continue
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            node[path[-1]] = _value(stmt.value)
        except (ValueError, KeyError, TypeError):  # not a literal (e.g. a keypoint head's tuple(... for ...))
            node[path[-1]] = UNREAD
    return cfg


def _merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _decode(value):
    """yacs' decoding of a YAML value: strings that are Python literals become them (``"(60000, 80000)"``);
    tuples are lists here."""
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    return value


def _load_yaml_with_base(path):
    with open(path, encoding="utf-8") as f:
        cfg = _decode(yaml.safe_load(f))
    base = cfg.pop("_BASE_", None)
    if base is None:
        return cfg
    return _merge(_load_yaml_with_base(os.path.join(os.path.dirname(path), base)), cfg)


def detectron2_config(name):
    """A Detectron2 config file merged over the defaults, as ``cfg.merge_from_file`` does."""
    return _merge(detectron2_defaults(), _load_yaml_with_base(os.path.join(D2, "configs", name)))


def lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------- the mapping


def _attr(key):
    def get(cfg):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node
    get.key = key
    return get


def _fn(description, fn):
    fn.key = description
    return fn


def _iters(epochs):
    return _fn(f"{epochs} x train.steps_per_epoch",
               lambda c: [e * c.train.steps_per_epoch for e in getattr(c.train, epochs)]
               if epochs == "lr_decay_epochs" else getattr(c.train, epochs) * c.train.steps_per_epoch)


# (Detectron2 key, frcnn value, Detectron2 value -> comparable value or None)
MAPPING = [
    # solver
    ("SOLVER.IMS_PER_BATCH", _attr("train.batch_size"), None),
    ("SOLVER.IMS_PER_BATCH", _attr("train.reference_batch_size"), None),  # so train.lr is used as it is
    ("SOLVER.BASE_LR", _attr("train.lr"), None),
    ("SOLVER.BASE_LR", _fn("optim.learning_rate(cfg)", optim.learning_rate), None),
    ("SOLVER.MAX_ITER", _iters("epochs"), None),
    ("SOLVER.STEPS", _iters("lr_decay_epochs"), None),
    ("SOLVER.GAMMA", _attr("train.lr_gamma"), None),
    ("SOLVER.LR_SCHEDULER_NAME", _attr("train.lr_schedule"), {"WarmupMultiStepLR": "step"}.get),
    ("SOLVER.WARMUP_ITERS", _attr("train.warmup_steps"), None),
    ("SOLVER.WARMUP_FACTOR", _attr("train.warmup_factor"), None),
    ("SOLVER.MOMENTUM", _attr("train.momentum"), None),
    ("SOLVER.NESTEROV", _fn("make_optimizer(cfg).nesterov", lambda c: optim.make_optimizer(c, 10).nesterov), None),
    ("SOLVER.WEIGHT_DECAY", _attr("train.weight_decay"), None),
    ("SOLVER.WEIGHT_DECAY_BIAS", _attr("train.weight_decay_bias"), None),
    ("SOLVER.WEIGHT_DECAY_NORM", _attr("train.weight_decay_norm"), None),
    ("SOLVER.CLIP_GRADIENTS.ENABLED", _fn("train.clip_norm is not null", lambda c: c.train.clip_norm is not None),
     None),
    ("SOLVER.AMP.ENABLED", _fn("train.mixed_precision != off", lambda c: c.train.mixed_precision != "off"), None),
    # input
    ("INPUT.MIN_SIZE_TRAIN", _fn("input.train_min_sizes", lambda c: list(c.input.train_min_sizes)), None),
    ("INPUT.MAX_SIZE_TRAIN", _attr("input.max_size"), None),
    ("INPUT.MIN_SIZE_TEST", _attr("input.test_min_size"), None),
    ("INPUT.MAX_SIZE_TEST", _attr("input.max_size"), None),
    ("INPUT.RANDOM_FLIP", _attr("input.flip"), {"horizontal": True, "none": False}.get),
    ("INPUT.FORMAT", _attr("input.channel_order"), str.lower),
    ("MODEL.PIXEL_MEAN", _fn("input.pixel_mean", lambda c: list(c.input.pixel_mean)), None),
    ("MODEL.PIXEL_STD", _fn("input.pixel_std", lambda c: list(c.input.pixel_std)), None),
    # backbone
    ("MODEL.WEIGHTS", _attr("model.backbone_weights"), lambda v: v.replace("detectron2://", "detectron2:")
     .replace(".pkl", "")),
    ("MODEL.BACKBONE.FREEZE_AT", _attr("model.freeze_at"), None),
    ("MODEL.RESNETS.NORM", _attr("model.norm"), {"FrozenBN": "frozen", "BN": "batch"}.get),
    # anchors and RPN
    ("MODEL.ANCHOR_GENERATOR.SIZES", _fn("[anchors.sizes]", lambda c: [list(c.anchors.sizes)]), None),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", _fn("[anchors.ratios]", lambda c: [list(c.anchors.ratios)]),
     None),
    ("MODEL.ANCHOR_GENERATOR.OFFSET", _attr("anchors.offset"), None),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", _attr("rpn.pre_nms_topk_train"), None),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", _attr("rpn.post_nms_topk_train"), None),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", _attr("rpn.pre_nms_topk_test"), None),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", _attr("rpn.post_nms_topk_test"), None),
    ("MODEL.RPN.NMS_THRESH", _attr("rpn.nms_thresh"), None),
    ("MODEL.PROPOSAL_GENERATOR.MIN_SIZE", _attr("rpn.min_size"), None),
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", _attr("rpn.batch_size_per_image"), None),
    ("MODEL.RPN.POSITIVE_FRACTION", _attr("rpn.positive_fraction"), None),
    ("MODEL.RPN.IOU_THRESHOLDS", _fn("[rpn.bg_iou, rpn.fg_iou]",
                                     lambda c: [c.rpn.bg_iou, c.rpn.fg_iou]), None),
    ("MODEL.RPN.BBOX_REG_WEIGHTS", _fn("rpn.box_weights", lambda c: list(c.rpn.box_weights)), None),
    ("MODEL.RPN.SMOOTH_L1_BETA", _attr("rpn.smooth_l1_beta"), None),
    ("MODEL.RPN.LOSS_WEIGHT", _attr("rpn.loss_weight"), None),
    # ROI head
    ("MODEL.ROI_HEADS.NUM_CLASSES", _fn("len(data.classes)", lambda c: len(c.data.classes)), None),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", _attr("roi_heads.num_rois"), None),
    ("MODEL.ROI_HEADS.POSITIVE_FRACTION", _attr("roi_heads.positive_fraction"), None),
    ("MODEL.ROI_HEADS.IOU_THRESHOLDS", _fn("[roi_heads.fg_iou]", lambda c: [c.roi_heads.fg_iou]), None),
    ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", _attr("roi_heads.score_thresh"), None),
    ("MODEL.ROI_HEADS.NMS_THRESH_TEST", _attr("roi_heads.nms_thresh"), None),
    ("TEST.DETECTIONS_PER_IMAGE", _attr("roi_heads.max_detections"), None),
    ("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", _fn("roi_heads.box_weights", lambda c: list(c.roi_heads.box_weights)),
     None),
    ("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", _attr("roi_heads.smooth_l1_beta"), None),
    ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", _attr("roi_heads.loss_weight"), None),
    ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", _attr("roi_heads.pool_size"), None),
    ("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", _attr("roi_heads.sampling_ratio"), None),
]

# Detectron2 keys frcnn has no key for: it always does what this value says.
FIXED = {
    "SOLVER.WARMUP_METHOD": "linear",  # training.WarmupStepDecay: linear from warmup_factor
    "SOLVER.BIAS_LR_FACTOR": 1.0,  # one learning rate for every variable
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",  # one of input.min_size drawn per image
    "INPUT.CROP.ENABLED": False,  # no random crop
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,  # MSRA ResNet: the stride in the first 1x1 convolution
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RPN.IOU_LABELS": [0, -1, 1],  # below bg_iou negative, between ignored, from fg_iou positive
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT": 1.0,  # rpn.loss_weight weighs both RPN losses
    "MODEL.ROI_HEADS.IOU_LABELS": [0, 1],  # with roi_heads.bg_iou_low 0 (checked below)
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,  # targets.sample_rois always appends the ground truth
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",  # RoiPoolingConv is RoIAlign with aligned=True
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False,  # class-specific box deltas
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
}

# What cannot be equal, and why (the README's "Recipes" paragraph says the same).
NOT_EQUAL = {
    "SOLVER.MAX_ITER / SOLVER.STEPS": "Detectron2 counts iterations; frcnn counts epochs of train.steps_per_epoch "
                                      "steps (the recipes set steps_per_epoch so that the products are equal, "
                                      "checked above) and draws a fresh data order each epoch",
    "MODEL.RPN.BOUNDARY_THRESH": "-1 (keep every anchor): frcnn keeps every anchor whose centre is inside the "
                                 "image, and ignores those whose centre lies in the batch padding, which "
                                 "Detectron2 samples as negatives: the same for an unpadded image",
    "DATALOADER.ASPECT_RATIO_GROUPING": "Detectron2 batches landscape with landscape and portrait with portrait "
                                        "images; frcnn's pipeline batches in data order (more padding, same images)",
    "INPUT.MAX_SIZE_TEST": "frcnn has one input.max_size for training and test (equal in these recipes)",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": "Detectron2 drops training images without a usable box (about 1% of "
                                           "COCO train2017); frcnn trains on them as all-background images",
}


def _same(a, b):
    """Equal values; numbers to 1e-9 relative (0.02 == 0.02, 2 == 2.0), lists element by element."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-300)
    return a == b and type(a) is type(b) or (a is None and b is None)


def differences(cfg, d2):
    """``"<Detectron2 key> = <value> | <frcnn key> = <value>"`` for every key of :data:`MAPPING` that differs."""
    bad = []
    for d2_key, get, convert in MAPPING:
        want = lookup(d2, d2_key)
        assert want != UNREAD, d2_key
        want = convert(want) if convert else want
        got = get(cfg)
        if not _same(got, want):
            bad.append(f"{d2_key} = {want!r} | {get.key} = {got!r}")
    return bad


@pytest.mark.parametrize("frcnn_name, d2_name", sorted(RECIPES.items()))
def test_training_keys_equal_detectron2s(frcnn_name, d2_name):
    d2 = detectron2_config(d2_name)
    cfg = load_config(frcnn_name)
    bad = differences(cfg, d2)
    assert not bad, f"{frcnn_name} differs from Detectron2's {d2_name}:\n" + "\n".join(bad)
    for d2_key, value in FIXED.items():
        assert lookup(d2, d2_key) == value, d2_key
    assert cfg.roi_heads.bg_iou_low == 0.0  # ROI_HEADS.IOU_LABELS [0, 1]: every IoU below fg_iou is background
    assert cfg.train.weight_decay_mode == "coupled"  # torch.optim.SGD's weight_decay
    assert cfg.train.optimizer == "sgd"


def test_a_different_key_is_caught():
    d2 = detectron2_config(RECIPES["detectron2_voc_R50_C4.yaml"])
    cfg = load_config("detectron2_voc_R50_C4.yaml", ["train.weight_decay_bias=0.0", "train.lr_decay_epochs=[6,7]"])
    bad = differences(cfg, d2)
    assert len(bad) == 2 and bad[0].startswith("SOLVER.STEPS = [12000, 16000]")
    assert bad[1].startswith("SOLVER.WEIGHT_DECAY_BIAS = None")


def test_the_parser_reads_detectron2s_defaults():
    """A few values of defaults.py as Detectron2 defines them (arithmetic and CN({...}) included)."""
    d = detectron2_defaults()
    assert lookup(d, "SOLVER.WARMUP_FACTOR") == pytest.approx(1.0 / 1000)
    assert lookup(d, "SOLVER.CLIP_GRADIENTS")["ENABLED"] is False
    assert lookup(d, "MODEL.RPN.IOU_THRESHOLDS") == [0.3, 0.7]
    assert lookup(d, "SOLVER.WEIGHT_DECAY_BIAS") is None
    base = detectron2_config("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml")
    assert lookup(base, "MODEL.ROI_HEADS.NAME") == "Res5ROIHeads"  # from Base-RCNN-C4.yaml through _BASE_
    assert lookup(base, "SOLVER.STEPS") == [60000, 80000]
    assert lookup(detectron2_config("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml"), "SOLVER.WARMUP_ITERS") == 100
    # The values NOT_EQUAL explains.
    assert lookup(d, "MODEL.RPN.BOUNDARY_THRESH") == -1 and lookup(d, "DATALOADER.ASPECT_RATIO_GROUPING") is True
    assert lookup(d, "DATALOADER.FILTER_EMPTY_ANNOTATIONS") is True
    assert lookup(base, "INPUT.MAX_SIZE_TEST") == lookup(base, "INPUT.MAX_SIZE_TRAIN")
