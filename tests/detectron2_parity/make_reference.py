"""Have Detectron2's own training code compute the numbers that tests/test_detectron2_parity.py checks frcnn against.

NOT part of the test suite, and not runnable in frcnn's environment: it needs PyTorch, torchvision and Detectron2's
source. Made in a scratch environment outside the repository, on the 2-core development CPU:

    python3 -m venv /work/d2env
    /work/d2env/bin/pip install torch==2.14.1 torchvision==0.29.1 fvcore iopath pycocotools omegaconf
    # Detectron2's source at commit 02b5c4e295e990042a714712c21dc79b731e8833 in /work/d2src (git archive of it).
    # Not built: the R50-C4 training path is pure Python plus torchvision's nms and roi_align, so the C++
    # extension of Detectron2 is not needed (nothing on this path imports detectron2._C).
    PYTHONPATH=/work/d2src /work/d2env/bin/python tests/detectron2_parity/make_reference.py [gradients.npz]

(with a path, the whole gradients are also saved there, to look into a mismatch; they are not committed).

(torch 2.14.1's Linux wheel is the CUDA build; it runs on the CPU. The CPU-only torch 2.13.0 wheel did not work
with torchvision's operators here: torchvision's PyPI wheels link PyTorch's CUDA libraries.)

It builds Detectron2's R50-C4 (configs/COCO-Detection/faster_rcnn_R_50_C4_1x.yaml, which is Base-RCNN-C4.yaml plus
defaults.py) with 3 classes and the take-everything sampling of ``recipe.SETTINGS``, loads ``recipe.state_dict()``
with ``load_state_dict(strict=True)``, runs one training forward pass on ``recipe.make_image()`` and the recipe's
boxes, and backpropagates the sum of the four losses. It writes ``tests/detectron2_parity/reference.json``: the four
losses, the summaries of the gradients of ``recipe.GRADIENT_VARIABLES`` (``recipe.summarize_gradient``: norm, sum,
a slice and seeded random projections, in Detectron2's layouts), what was sampled, and the margins by which every
discrete decision (matching thresholds, NMS, proposal ranking, L1 signs, ROIAlign's adaptive grid) clears its
threshold in Detectron2's own numbers: a margin far above float32 round-off means frcnn, computing the same
function in another order, must take the same decisions.
"""

import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import recipe  # noqa: E402

D2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
OUT = os.path.join(HERE, "reference.json")


def _config():
    import detectron2
    from detectron2.config import get_cfg

    root = os.path.dirname(os.path.dirname(detectron2.__file__))
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(root, "configs", "COCO-Detection", "faster_rcnn_R_50_C4_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = recipe.NUM_CLASSES
    s = recipe.SETTINGS
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = s["rpn_batch_size_per_image"]
    cfg.MODEL.RPN.POSITIVE_FRACTION = s["rpn_positive_fraction"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = s["rpn_post_nms_topk_train"]
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = s["roi_batch_size_per_image"]
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = s["roi_positive_fraction"]
    cfg.freeze()
    return cfg


def _iou(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(inter > 0, inter / np.maximum(union, 1e-300), 0.0)


def _decode(deltas, boxes, weights, clamp=math.log(1000.0 / 16)):
    deltas, boxes = np.asarray(deltas, np.float64), np.asarray(boxes, np.float64)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw, dh = np.minimum(deltas[:, 2] / weights[2], clamp), np.minimum(deltas[:, 3] / weights[3], clamp)
    pcx, pcy, pw, ph = dx * w + cx, dy * h + cy, np.exp(dw) * w, np.exp(dh) * h
    return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=1)


def _encode(reference, target, weights):
    reference, target = np.asarray(reference, np.float64), np.asarray(target, np.float64)
    rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    rx, ry = reference[:, 0] + 0.5 * rw, reference[:, 1] + 0.5 * rh
    tx, ty = target[:, 0] + 0.5 * tw, target[:, 1] + 0.5 * th
    return np.stack([weights[0] * (tx - rx) / rw, weights[1] * (ty - ry) / rh,
                     weights[2] * np.log(tw / rw), weights[3] * np.log(th / rh)], axis=1)


def _margins(cfg, captured):
    """How far every discrete decision is from its threshold, recomputed in float64 from Detectron2's tensors."""
    h, w = recipe.IMAGE_HEIGHT, recipe.IMAGE_WIDTH
    gt = recipe.GT_BOXES.astype(np.float64)
    anchors = captured["anchors"]
    logits = captured["objectness"]  # (A,)
    deltas = captured["anchor_deltas"]  # (A, 4)
    out = {}

    # RPN matching: IoU thresholds 0.3 / 0.7 and each gt's best anchors (ties included).
    iou = _iou(anchors, gt)  # (A, G)
    best = iou.max(axis=1)
    lo, hi = cfg.MODEL.RPN.IOU_THRESHOLDS
    out["rpn_iou_from_thresholds"] = float(min(np.abs(best - lo).min(), np.abs(best - hi).min()))
    gaps = []
    for g in range(len(gt)):
        column = np.sort(iou[:, g])[::-1]
        gaps.append(column[0] - column[1])
    out["rpn_best_anchor_gap"] = float(min(gaps))

    # Proposals: sort by logit (all anchors: pre_nms_topk 12000 > A), decode, clip, NMS 0.7, keep post_nms_topk.
    order = np.argsort(-logits, kind="stable")
    boxes = _decode(deltas[order], anchors[order], cfg.MODEL.RPN.BBOX_REG_WEIGHTS)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    scores = logits[order]
    nonempty = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, scores = boxes[nonempty], scores[nonempty]
    thresh = cfg.MODEL.RPN.NMS_THRESH
    kept, iou_margin, score_margin = [], np.inf, np.inf
    topk = cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN
    for i in range(len(boxes)):
        if kept:
            overlaps = _iou(boxes[i:i + 1], boxes[kept])[0]
            iou_margin = min(iou_margin, np.abs(overlaps - thresh).min())
            suppressors = np.asarray(kept)[overlaps > thresh]
            if len(suppressors):
                score_margin = min(score_margin, np.min(scores[suppressors] - scores[i]))
                continue
        if len(kept) == topk:  # the first survivor left out: the cut must be clear of it
            out["rpn_topk_cut_gap"] = float(scores[kept[-1]] - scores[i])
            break
        kept.append(i)
    out["rpn_nms_iou_from_threshold"] = float(iou_margin)
    out["rpn_nms_score_gap"] = float(score_margin)
    mine = boxes[kept]
    theirs = captured["proposals"]
    out["proposals_recomputed_max_abs_diff"] = float(np.abs(mine - theirs).max())

    # ROI matching at 0.5 (proposals + appended gt).
    candidates = np.concatenate([theirs, gt])
    best = _iou(candidates, gt).max(axis=1)
    out["roi_iou_from_threshold"] = float(np.abs(best - cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]).min())

    # ROIAlign's adaptive grid: ceil(ROI side / 16 / 14) must be clear of whole numbers.
    sides = np.concatenate([candidates[:, 2] - candidates[:, 0], candidates[:, 3] - candidates[:, 1]])
    ratio = sides / recipe.STRIDE / cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    out["roialign_grid_from_whole"] = float(np.abs(ratio - np.round(ratio)).min())

    # L1 (beta 0) signs: |prediction - target| of every positive anchor and every foreground ROI coordinate.
    labels = captured["anchor_labels"]
    pos = labels == 1
    iou_pos = iou[pos]
    targets = _encode(anchors[pos], gt[iou_pos.argmax(axis=1)], cfg.MODEL.RPN.BBOX_REG_WEIGHTS)
    out["rpn_l1_from_zero"] = float(np.abs(deltas[pos] - targets).min())
    roi_classes = captured["roi_classes"]
    fg = roi_classes < recipe.NUM_CLASSES
    roi_boxes = captured["roi_boxes"][fg]
    roi_gt = captured["roi_gt_boxes"][fg]
    weights = cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS
    pred = captured["box_deltas"][fg].reshape(-1, recipe.NUM_CLASSES, 4)[np.arange(fg.sum()), roi_classes[fg]]
    out["roi_l1_from_zero"] = float(np.abs(pred - _encode(roi_boxes, roi_gt, weights)).min())
    return out


def main():
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    cfg = _config()
    model = build_model(cfg)
    sd = recipe.state_dict()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    model.train()

    captured = {}
    rpn = model.proposal_generator
    roi_heads = model.roi_heads

    def rpn_head_hook(module, inputs, outputs):
        logits, deltas = outputs
        captured["objectness"] = logits[0].detach().permute(0, 2, 3, 1).reshape(-1).double().numpy()
        d = deltas[0].detach()
        d = d.view(d.shape[0], -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        captured["anchor_deltas"] = d.double().numpy()

    rpn.rpn_head.register_forward_hook(rpn_head_hook)
    original_label_anchors = rpn.label_and_sample_anchors

    def label_anchors(anchors, gt_instances):
        labels, matched = original_label_anchors(anchors, gt_instances)
        captured["anchors"] = Boxes.cat(anchors).tensor.double().numpy()
        captured["anchor_labels"] = labels[0].numpy()
        return labels, matched

    rpn.label_and_sample_anchors = label_anchors
    original_sample = roi_heads.label_and_sample_proposals

    def sample(proposals, targets):
        captured["proposals"] = proposals[0].proposal_boxes.tensor.double().numpy()
        sampled = original_sample(proposals, targets)
        captured["roi_boxes"] = sampled[0].proposal_boxes.tensor.double().numpy()
        captured["roi_gt_boxes"] = sampled[0].gt_boxes.tensor.double().numpy()
        captured["roi_classes"] = sampled[0].gt_classes.numpy()
        return sampled

    roi_heads.label_and_sample_proposals = sample

    def predictor_hook(module, inputs, outputs):
        scores, deltas = outputs
        captured["class_logits"] = scores.detach().double().numpy()
        captured["box_deltas"] = deltas.detach().double().numpy()

    roi_heads.box_predictor.register_forward_hook(predictor_hook)

    image = recipe.make_image()  # RGB
    bgr = torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))
    instances = Instances((recipe.IMAGE_HEIGHT, recipe.IMAGE_WIDTH))
    instances.gt_boxes = Boxes(torch.from_numpy(recipe.GT_BOXES))
    instances.gt_classes = torch.from_numpy(recipe.GT_CLASSES)
    with EventStorage(0):
        losses = model([{"image": bgr, "instances": instances}])
    total = sum(losses.values())
    model.zero_grad()
    total.backward()
    params = dict(model.named_parameters())
    gradients = {name: recipe.summarize_gradient(name, params[name].grad.double().numpy())
                 for name in recipe.GRADIENT_VARIABLES}
    if len(sys.argv) > 1:  # a path: also save the whole gradients there (.npz, for looking into a mismatch)
        np.savez(sys.argv[1], **{name: params[name].grad.numpy() for name in recipe.GRADIENT_VARIABLES})

    logits = captured["class_logits"]
    classes = captured["roi_classes"]
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    true_log_prob = log_probs[np.arange(len(classes)), classes]
    labels = captured["anchor_labels"]
    import detectron2
    import torchvision

    doc = {
        "about": "Detectron2's own training losses and gradients on tests/detectron2_parity/recipe.py's inputs; "
                 "made by tests/detectron2_parity/make_reference.py",
        "detectron2_commit": D2_COMMIT,
        "detectron2_version": detectron2.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "recipe": {
            "seed": recipe.SEED, "image_size": [recipe.IMAGE_HEIGHT, recipe.IMAGE_WIDTH],
            "gt_boxes": recipe.GT_BOXES.tolist(), "gt_classes": recipe.GT_CLASSES.tolist(),
            "settings": recipe.SETTINGS, "num_probes": recipe.NUM_PROBES, "slice": recipe.SLICE,
        },
        "config": {
            "RPN.IOU_THRESHOLDS": list(cfg.MODEL.RPN.IOU_THRESHOLDS),
            "RPN.PRE_NMS_TOPK_TRAIN": cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN,
            "RPN.POST_NMS_TOPK_TRAIN": cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN,
            "RPN.NMS_THRESH": cfg.MODEL.RPN.NMS_THRESH,
            "RPN.BATCH_SIZE_PER_IMAGE": cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE,
            "RPN.POSITIVE_FRACTION": cfg.MODEL.RPN.POSITIVE_FRACTION,
            "RPN.SMOOTH_L1_BETA": cfg.MODEL.RPN.SMOOTH_L1_BETA,
            "RPN.BBOX_REG_WEIGHTS": list(cfg.MODEL.RPN.BBOX_REG_WEIGHTS),
            "RPN.BOUNDARY_THRESH": cfg.MODEL.RPN.BOUNDARY_THRESH,
            "ROI_HEADS.BATCH_SIZE_PER_IMAGE": cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
            "ROI_HEADS.POSITIVE_FRACTION": cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION,
            "ROI_HEADS.IOU_THRESHOLDS": list(cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS),
            "ROI_HEADS.PROPOSAL_APPEND_GT": cfg.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT,
            "ROI_BOX_HEAD.SMOOTH_L1_BETA": cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA,
            "ROI_BOX_HEAD.BBOX_REG_WEIGHTS": list(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
            "ROI_BOX_HEAD.POOLER_TYPE": cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            "ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            "ROI_BOX_HEAD.POOLER_RESOLUTION": cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            "ANCHOR_GENERATOR.OFFSET": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        },
        "losses": {name: float(value) for name, value in losses.items()},
        "gradients": gradients,
        "sampled": {
            "num_anchors": int(labels.size),
            "positive_anchors": int((labels == 1).sum()),
            "negative_anchors": int((labels == 0).sum()),
            "ignored_anchors": int((labels == -1).sum()),
            "proposals": np.round(captured["proposals"], 4).tolist(),
            "rois": int(len(classes)),
            "foreground_rois": int((classes < recipe.NUM_CLASSES).sum()),
            "rois_true_class_prob_below_1e-7": int((true_log_prob < math.log(1e-7)).sum()),
            "class_logit_std": float(logits.std()),
        },
        "margins": _margins(cfg, captured),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(json.dumps({k: doc[k] for k in ("losses", "sampled", "margins")}, indent=1)[:6000])
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
