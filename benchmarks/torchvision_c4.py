"""The same ResNet-50-C4 Faster R-CNN built from torchvision's parts, timed the way benchmarks/benchmark.py times
frcnn, for the ratio frcnn / torchvision on one machine.

    python benchmarks/torchvision_c4.py                                     # voc.yaml's sizes, 600x1000, on CUDA
    python benchmarks/torchvision_c4.py --precisions float32,bfloat16 --repeats 5 --json tv.json
    python benchmarks/torchvision_c4.py --config test.yaml --min-size 64 --max-size 64 --proposals 8 --rois 4 \\
        --repeats 1 --device cpu                                           # smoke run

The model is ``torchvision.models.detection.FasterRCNN`` (its transform, RPN, ROI heads and postprocessing) on:

- the trunk: ``torchvision.models.resnet50`` (random weights, ``FrozenBatchNorm2d``) from ``conv1`` to ``layer3``,
  with each stage's stride in its first 1x1 convolution, as frcnn's trunk (Keras' and Detectron2's ResNet-50 C4)
  has it, not in the 3x3 (torchvision's own choice): the same FLOPs. ``model.freeze_at`` freezes the same stages;
- the RPN head: a 3x3 convolution with ``rpn.channels`` outputs and ReLU, then 1x1 objectness and box
  convolutions, on ``anchors.sizes`` x ``anchors.ratios`` anchors;
- ``torchvision.ops.MultiScaleRoIAlign`` on the one res4 map (``roi_heads.pool_size``, ``sampling_ratio``);
- the ROI head: ``layer4`` (res5, stride 2) on each ROI, average-pooled to 1x1 (``head_pooling: avg``) or
  flattened whole (``none``), then the class and box ``Linear`` layers (torchvision's predictor has box outputs for
  the background class too: 4 more outputs than frcnn's, on 2048 inputs, a negligible cost).

Every number comes from the same config as frcnn's benchmark (:func:`benchmarks.workload.base_config`): image size,
padding (``input.size_divisibility``), pre- and post-NMS proposals, NMS thresholds, anchors and ROIs sampled per
image in training, score threshold and detections per image. The images and the 3 ground-truth boxes per image are
:func:`benchmarks.workload.synthetic_batches`' (the same seed). Inference runs on a copy whose frozen BatchNorms are
folded into the convolutions, as frcnn's inference does; training on the model itself, with SGD and momentum at
a learning rate of 1e-20 (as frcnn's benchmark: random weights must not blow up). ``bfloat16`` is
``torch.autocast`` with bfloat16 (weights stay float32, as Keras' ``mixed_bfloat16``). Timing is
:func:`benchmarks.measure.interleaved` (warm-up rounds excluded, interleaved rounds, medians), each call ending in
``torch.cuda.synchronize()``. torch's own TF32 switches are left at their defaults and reported.
"""

import argparse
import copy
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import measure, workload  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def log(message):
    print(f"[torchvision_c4 {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = workload.Sizes()
    parser.add_argument("--config", default="voc.yaml", help="config name in configs/ or a path (default voc.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable), as benchmark.py takes it")
    parser.add_argument("--precisions", default="float32,bfloat16",
                        help="comma-separated subset of " + ",".join(PRECISIONS) + " (default: both)")
    parser.add_argument("--min-size", type=int, default=sizes.min_size, help="image height (default 600)")
    parser.add_argument("--max-size", type=int, default=sizes.max_size, help="image width (default 1000)")
    parser.add_argument("--proposals", type=int, default=sizes.proposals, help="test proposals per image (300)")
    parser.add_argument("--rois", type=int, default=sizes.rois, help="training ROIs per image (default 128)")
    parser.add_argument("--batch", type=int, default=sizes.batch, help="images per call and per step (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per task first (default 1, min 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (default 3)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda where available, else cpu)")
    parser.add_argument("--json", help="also write every figure (and every timed run) to this JSON file")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(args.precisions) - set(PRECISIONS))
    if unknown or not args.precisions:
        parser.error(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    return args


def _stride_in_1x1(resnet):
    """Move each stage's stride from the 3x3 convolution (torchvision) to the first 1x1 (frcnn's trunk, Keras'
    ResNet50 and Detectron2's MSRA C4): the 1x1 then runs on the strided map, as in frcnn."""
    for stage in (resnet.layer2, resnet.layer3, resnet.layer4):
        block = stage[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def rpn_head(in_channels, channels, num_anchors):
    """The RPN head as a torch module (torchvision's ``RPNHead`` keeps the input's channel count; frcnn's 3x3
    convolution has ``rpn.channels`` outputs)."""
    import torch
    from torch import nn

    class RPNHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
            self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
            self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
            for layer in (self.conv, self.cls_logits, self.bbox_pred):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

        def forward(self, features):
            logits, deltas = [], []
            for x in features:
                x = torch.relu(self.conv(x))
                logits.append(self.cls_logits(x))
                deltas.append(self.bbox_pred(x))
            return logits, deltas

    return RPNHead()


def build_model(cfg, sizes):
    """The torchvision Faster R-CNN described in the module docstring, on the CPU, in training mode."""
    import torch
    import torchvision
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.misc import FrozenBatchNorm2d

    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    _stride_in_1x1(resnet)
    trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
                          resnet.layer3)
    trunk.out_channels = 1024
    frozen = [[resnet.conv1, resnet.bn1], [resnet.layer1], [resnet.layer2], [resnet.layer3]][:cfg.model.freeze_at]
    for group in frozen:
        for module in group:
            for p in module.parameters():
                p.requires_grad_(False)

    pooling = cfg.roi_heads.head_pooling
    res5_side = (cfg.roi_heads.pool_size + 1) // 2

    class ROIHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.res5 = resnet.layer4

        def forward(self, x):
            x = self.res5(x)
            if pooling == "avg":
                x = torch.mean(x, dim=(2, 3))
            return torch.flatten(x, 1)

    features = 2048 if pooling == "avg" else 2048 * res5_side * res5_side
    anchors = AnchorGenerator(sizes=(tuple(cfg.anchors.sizes),), aspect_ratios=(tuple(cfg.anchors.ratios),))
    rpn, heads = cfg.rpn, cfg.roi_heads
    model = FasterRCNN(
        trunk, num_classes=None,
        min_size=sizes.min_size, max_size=sizes.max_size,
        image_mean=list(cfg.input.pixel_mean), image_std=list(cfg.input.pixel_std),
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head(1024, rpn.channels, len(cfg.anchors.sizes) * len(cfg.anchors.ratios)),
        rpn_pre_nms_top_n_train=rpn.pre_nms_topk_train, rpn_pre_nms_top_n_test=rpn.pre_nms_topk_test,
        rpn_post_nms_top_n_train=rpn.post_nms_topk_train, rpn_post_nms_top_n_test=rpn.post_nms_topk_test,
        rpn_nms_thresh=rpn.nms_thresh, rpn_fg_iou_thresh=rpn.fg_iou, rpn_bg_iou_thresh=rpn.bg_iou,
        rpn_batch_size_per_image=rpn.batch_size_per_image, rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], heads.pool_size, heads.sampling_ratio),
        box_head=ROIHead(), box_predictor=FastRCNNPredictor(features, cfg.num_classes),
        box_score_thresh=heads.score_thresh, box_nms_thresh=heads.nms_thresh,
        box_detections_per_img=heads.max_detections,
        box_fg_iou_thresh=heads.fg_iou, box_bg_iou_thresh=heads.fg_iou,
        box_batch_size_per_image=heads.num_rois, box_positive_fraction=heads.positive_fraction,
        bbox_reg_weights=tuple(heads.box_weights),
    )
    model.transform.size_divisible = cfg.input.size_divisibility
    return model


def fold_frozen_batchnorm(module):
    """Fold every ``FrozenBatchNorm2d`` that directly follows a ``Conv2d`` among its parent's children (the
    ResNet's stem, bottlenecks and downsample branches) into that convolution, in place; returns the count."""
    import torch
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    folded = 0
    previous = None
    for name, child in list(module.named_children()):
        if isinstance(child, FrozenBatchNorm2d) and isinstance(previous, nn.Conv2d):
            scale = child.weight * torch.rsqrt(child.running_var + child.eps)
            shift = child.bias - child.running_mean * scale
            with torch.no_grad():
                previous.weight.mul_(scale[:, None, None, None])
                bias = shift if previous.bias is None else previous.bias * scale + shift
                previous.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            setattr(module, name, nn.Identity())
            folded += 1
        else:
            folded += fold_frozen_batchnorm(child)
        previous = child
    return folded


def inputs(cfg, sizes, device):
    """``(images, targets)``: benchmarks.workload's synthetic images (unpadded, CHW float32, 0..255) and their
    ground-truth boxes and classes, on ``device``."""
    import torch

    batch, train = workload.synthetic_batches(cfg, sizes)
    images, targets = [], []
    for i, (h, w) in enumerate(batch["image_sizes"]):
        image = torch.as_tensor(batch["images"][i, :h, :w]).permute(2, 0, 1).contiguous().float().to(device)
        images.append(image)
        valid = train["gt_valid"][i]
        targets.append({"boxes": torch.as_tensor(train["gt_boxes"][i][valid]).to(device),
                        "labels": torch.as_tensor(train["gt_classes"][i][valid]).long().to(device)})
    return images, targets


def tasks(cfg, sizes, precision, device):
    """``({"infer": fn, "train": fn}, seen, model)`` for one precision; ``seen`` as in benchmarks.workload."""
    import torch

    device = torch.device(device)
    model = build_model(cfg, sizes).to(device)
    predictor = copy.deepcopy(model).eval()
    folded = fold_frozen_batchnorm(predictor)
    model.train()
    images, targets = inputs(cfg, sizes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0e-20, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    autocast = precision == "bfloat16"
    seen = {"losses": [], "detections": [], "folded_norms": folded,
            "trainable_parameters": sum(p.numel() for p in params)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = predictor(images)
        sync()
        seen["detections"].append(sum(len(o["boxes"]) for o in out) / len(out))

    def train():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        seen["losses"].append(float(loss.detach()))

    return {"infer": infer, "train": train}, seen, model


def describe(device):
    import torch
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": str(device), "gpu": None,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run(args):
    import torch

    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = workload.Sizes(args.min_size, args.max_size, args.proposals, args.rois, args.batch)
    cfg = workload.base_config(args.config, args.overrides, sizes)
    torch.manual_seed(0)
    info = describe(device)
    log(f"torch {info['torch']}, torchvision {info['torchvision']}, device {device} {info['gpu'] or ''}")
    prepared, everything = {}, {}
    for precision in args.precisions:
        log(f"{precision}: building, {args.warmup} warm-up call(s) per task")
        fns, seen, _ = tasks(cfg, sizes, precision, device)
        warm = measure.interleaved(fns, warmup=args.warmup, repeats=0)
        prepared[precision] = (fns, seen, warm)
        everything.update({f"{precision} | {task}": fn for task, fn in fns.items()})
    log(f"{args.repeats} interleaved round(s) of {len(everything)} tasks")
    memory = measure.PeakMemory("torch")
    timings = measure.interleaved(everything, warmup=0, repeats=args.repeats, memory=memory, log=log)
    rows = []
    for precision, (fns, seen, warm) in prepared.items():
        own = {task: timings[f"{precision} | {task}"] for task in fns}
        rows.append({
            "name": precision, "precision": precision,
            "infer_s": own["infer"]["median"] / sizes.batch, "train_s": own["train"]["median"],
            "runs": {task: t["runs"] for task, t in own.items()},
            "first_call_s": {task: w["warmup"][0] for task, w in warm.items()},
            "peak_device_infer_mb": (own["infer"]["peak"] or {}).get("device_mb"),
            "peak_device_train_mb": (own["train"]["peak"] or {}).get("device_mb"),
            "detections_per_image": seen["detections"][-1], "last_loss": seen["losses"][-1],
            "folded_norms": seen["folded_norms"], "trainable_parameters": seen["trainable_parameters"],
        })
    notes = []
    if cfg.model.norm != "frozen":
        notes.append(f"the config's model.norm is {cfg.model.norm}; this model always has FrozenBatchNorm2d "
                     "(voc.yaml's frozen), so its figures compare with a frozen-norm frcnn only")
    return {"machine": info, "notes": notes,
            "settings": {"config": args.config, "overrides": args.overrides, **vars(sizes), "warmup": args.warmup,
                         "repeats": args.repeats},
            "variants": rows, "wall_s": time.perf_counter() - start}


def render(results):
    s, m = results["settings"], results["machine"]
    lines = [f"torchvision ResNet-50-C4 Faster R-CNN on {m['device']} {m['gpu'] or ''} (torch {m['torch']}, "
             f"torchvision {m['torchvision']}, TF32 matmul {m['tf32']['matmul']}, cuDNN {m['tf32']['cudnn']}); "
             f"{s['config']} sizes, images {s['min_size']}x{s['max_size']}, batch {s['batch']}, {s['proposals']} "
             f"test proposals, {s['rois']} training ROIs per image; {s['warmup']} warm-up call(s), "
             f"{s['repeats']} interleaved rounds, medians",
             "", "| variant | infer s/img | train s/step | detections/img | peak GPU MB train |",
             "|---|---|---|---|---|"]
    for r in results["variants"]:
        peak = r["peak_device_train_mb"]
        lines.append(f"| {r['name']} | {r['infer_s']:.4g} | {r['train_s']:.4g} | {r['detections_per_image']:g} | "
                     f"{'-' if peak is None else f'{peak:,.0f}'} |")
    lines += [f"note: {note}" for note in results.get("notes", [])]
    lines.append(f"wall time {results['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = run(args)
    print(render(results), flush=True)
    if args.json:
        from benchmarks import report

        report.write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
