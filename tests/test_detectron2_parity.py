"""frcnn's training losses and gradients against numbers Detectron2's own code computed (no PyTorch needed).

``tests/detectron2_parity/recipe.py`` rebuilds, from a seed, a Detectron2 R50-C4 state dict, an image, three
ground-truth boxes and sampling settings that take every candidate (nothing random remains).
``tests/detectron2_parity/make_reference.py`` ran Detectron2 (commit 02b5c4e) on them once and stored its four
training losses and gradient summaries in ``tests/detectron2_parity/reference.json``. Here frcnn builds the same
detector from ``configs/detectron2_base.yaml``, loads the same weights through its own Detectron2 conversion
(:func:`frcnn.pretrained.load_detector_weights`), computes the four losses and the gradients of their sum
(TensorFlow backend, ``tf.GradientTape``), maps the gradients to Detectron2's layouts (convolutions ``(kh, kw, in,
out)`` -> ``(out, in, kh, kw)``, Dense ``(in, out)`` -> ``(out, in)``, class columns with background first -> rows
with background last) and compares everything to :data:`TOLERANCE` relative.

``python tests/test_detectron2_parity.py`` prints the parity table (docs/NOTES.md, session 8).
"""

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from detectron2_parity import recipe  # noqa: E402

REFERENCE = os.path.join(HERE, "detectron2_parity", "reference.json")
TOLERANCE = 1e-4
# frcnn's loss names -> Detectron2's
LOSS_NAMES = {"rpn_cls": "loss_rpn_cls", "rpn_box": "loss_rpn_loc", "roi_cls": "loss_cls", "roi_box": "loss_box_reg"}


def load_reference():
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)


def overrides():
    """configs/detectron2_base.yaml with the recipe's classes and take-everything sampling."""
    s = recipe.SETTINGS
    return [
        "data.classes=[" + ",".join(recipe.CLASS_NAMES) + "]",
        "model.backbone_weights=none",
        f"rpn.batch_size_per_image={s['rpn_batch_size_per_image']}",
        f"rpn.positive_fraction={s['rpn_positive_fraction']}",
        f"rpn.post_nms_topk_train={s['rpn_post_nms_topk_train']}",
        f"roi_heads.num_rois={s['roi_batch_size_per_image']}",
        f"roi_heads.positive_fraction={s['roi_positive_fraction']}",
        # Test-time proposals: not used by the losses, but build_model's first (inference) call runs res5 on every
        # one of them; Detectron2's 1000 would take most of a minute here.
        "rpn.post_nms_topk_test=8",
        "train.mixed_precision=off",
    ]


def build_model():
    import frcnn
    from frcnn import pretrained
    from frcnn.config import load_config

    cfg = load_config("detectron2_base.yaml", overrides())
    model = frcnn.build_model(cfg, load_weights=False)
    checkpoint = pretrained.Checkpoint(path="<tests/detectron2_parity/recipe.py>", format="detectron2",
                                       tensors=recipe.state_dict(), origin={}, ignored=[])
    pretrained.load_detector_weights(model, checkpoint)
    return model


def make_batch():
    return {
        "images": recipe.make_image()[None],
        "image_sizes": np.array([[recipe.IMAGE_HEIGHT, recipe.IMAGE_WIDTH]], np.int32),
        "gt_boxes": recipe.GT_BOXES[None],
        "gt_classes": (recipe.GT_CLASSES + 1).astype(np.int32)[None],  # frcnn: 0 is the background
        "gt_valid": np.ones((1, len(recipe.GT_BOXES)), bool),
    }


def gradient_variables(model):
    """Detectron2 name -> ``(keras variable, to_detectron2)``: the function maps the Keras gradient to Detectron2's
    layout."""
    from frcnn import pretrained

    head = model.roi_heads.head
    k = recipe.NUM_CLASSES
    perm = pretrained.class_permutation(k)  # frcnn column j <- Detectron2 row perm[j]

    def conv(g):
        return np.transpose(g, (3, 2, 0, 1))

    def dense(g):
        return np.transpose(g, (1, 0))

    def cls_kernel(g):
        out = np.empty((k + 1, g.shape[0]), g.dtype)
        out[perm] = g.T
        return out

    def cls_bias(g):
        out = np.empty_like(g)
        out[perm] = g
        return out

    def identity(g):
        return g

    convs = {module: (part, keras_name) for module, keras_name, _, part in pretrained.resnet_plan()}
    owners = {"trunk": model.trunk, "res5": head.res5.layer}
    variables = {
        "roi_heads.box_predictor.cls_score.weight": (head.cls.layer.kernel, cls_kernel),
        "roi_heads.box_predictor.cls_score.bias": (head.cls.layer.bias, cls_bias),
        "roi_heads.box_predictor.bbox_pred.weight": (head.box.layer.kernel, dense),
        "roi_heads.box_predictor.bbox_pred.bias": (head.box.layer.bias, identity),
        "proposal_generator.rpn_head.conv.weight": (model.rpn.head.conv.kernel, conv),
        "proposal_generator.rpn_head.conv.bias": (model.rpn.head.conv.bias, identity),
    }
    for name in recipe.GRADIENT_VARIABLES:
        if name not in variables:
            part, keras_name = convs[name[: -len(".weight")]]
            variables[name] = (owners[part].get_layer(keras_name).kernel, conv)
    return {name: variables[name] for name in recipe.GRADIENT_VARIABLES}


def frcnn_numbers(model):
    """frcnn's four losses (Detectron2's names) and the gradients of their sum in Detectron2's layouts."""
    import tensorflow as tf

    variables = gradient_variables(model)
    with tf.GradientTape() as tape:
        losses = model(make_batch(), training=True)
        total = tf.add_n([losses[name] for name in LOSS_NAMES])
    grads = tape.gradient(total, [v.value for v, _ in variables.values()])
    out_losses = {LOSS_NAMES[name]: float(losses[name]) for name in LOSS_NAMES}
    out_grads = {name: to_d2(np.asarray(g)) for (name, (_, to_d2)), g in zip(variables.items(), grads)}
    return out_losses, out_grads


def parity_rows(reference, losses, grads):
    """``(quantity, frcnn, Detectron2, relative difference)`` for every compared number."""
    rows = []
    for name in LOSS_NAMES.values():
        rows.append((name, losses[name], reference["losses"][name],
                     recipe.relative_difference(losses[name], reference["losses"][name])))
    for name, grad in grads.items():
        ref = reference["gradients"][name]
        mine = recipe.summarize_gradient(name, grad)
        assert mine["shape"] == ref["shape"], name
        rows.append((f"grad {name}: norm", mine["norm"], ref["norm"],
                     recipe.relative_difference(mine["norm"], ref["norm"])))
        rows.append((f"grad {name}: {len(ref['probes'])} projections", mine["probes"][0], ref["probes"][0],
                     recipe.relative_difference(mine["probes"], ref["probes"])))
        rows.append((f"grad {name}: first {len(ref['slice'])} values", mine["slice"][0], ref["slice"][0],
                     recipe.relative_difference(mine["slice"], ref["slice"])))
    return rows


def format_table(rows):
    lines = ["| quantity | frcnn | Detectron2 | relative difference |", "| --- | --- | --- | --- |"]
    for name, mine, ref, rel in rows:
        lines.append(f"| {name} | {mine:.7g} | {ref:.7g} | {rel:.1e} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def parity():
    """``(model, parity rows, reference)``."""
    model = build_model()
    losses, grads = frcnn_numbers(model)
    reference = load_reference()
    return model, parity_rows(reference, losses, grads), reference


def test_reference_was_made_from_this_recipe():
    ref = load_reference()
    r = ref["recipe"]
    assert r["seed"] == recipe.SEED and r["image_size"] == [recipe.IMAGE_HEIGHT, recipe.IMAGE_WIDTH]
    np.testing.assert_allclose(r["gt_boxes"], recipe.GT_BOXES, rtol=0, atol=1e-5)
    assert r["gt_classes"] == recipe.GT_CLASSES.tolist() and r["settings"] == recipe.SETTINGS
    assert (r["num_probes"], r["slice"]) == (recipe.NUM_PROBES, recipe.SLICE)
    assert sorted(ref["gradients"]) == sorted(recipe.GRADIENT_VARIABLES)
    # Every discrete decision cleared its threshold in Detectron2's numbers by far more than float32 round-off.
    margins = ref["margins"]
    for key in ("rpn_iou_from_thresholds", "rpn_best_anchor_gap", "rpn_nms_iou_from_threshold",
                "roi_iou_from_threshold", "roialign_grid_from_whole"):
        assert margins[key] > 1e-4, key
    for key in ("rpn_topk_cut_gap", "rpn_nms_score_gap", "rpn_l1_from_zero", "roi_l1_from_zero"):
        assert margins[key] > 1e-3, key
    # The case the classification loss must not cap is present: ROIs whose true class has probability < 1e-7.
    assert ref["sampled"]["rois_true_class_prob_below_1e-7"] > 0
    assert ref["sampled"]["foreground_rois"] > len(recipe.GT_BOXES)  # proposals, not only the appended gt


def test_proposals_match_detectron2(parity):
    """The 48 training proposals (decode, clip, NMS, top-k) are Detectron2's, in its order."""
    import keras

    model, _, ref = parity
    batch = make_batch()
    sizes = keras.ops.convert_to_tensor(batch["image_sizes"])
    features = model.trunk(model.transform.normalize(batch["images"], sizes), training=True)
    proposals, valid, _ = model.rpn(features, sizes, None, training=True)
    mine = np.asarray(proposals)[0][np.asarray(valid)[0]]
    np.testing.assert_allclose(mine, np.asarray(ref["sampled"]["proposals"]), rtol=0, atol=2e-3)


def test_losses_match_detectron2(parity):
    _, rows, _ = parity
    bad = [row for row in rows[: len(LOSS_NAMES)] if not row[3] <= TOLERANCE]
    assert not bad, "\n" + format_table(rows)


def test_gradients_match_detectron2(parity):
    _, rows, _ = parity
    assert len(rows) == len(LOSS_NAMES) + 3 * len(recipe.GRADIENT_VARIABLES)
    bad = [row for row in rows[len(LOSS_NAMES):] if not row[3] <= TOLERANCE]
    assert not bad, "\n" + format_table(rows)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(HERE))
    model = build_model()
    losses, grads = frcnn_numbers(model)
    print(format_table(parity_rows(load_reference(), losses, grads)))
