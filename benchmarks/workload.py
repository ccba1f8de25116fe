"""What is timed: one model per variant, built by ``frcnn.build_model`` from a config, and its tasks.

A variant is a precision (``train.mixed_precision``), an XLA setting (``train.jit_compile``) and optionally a
``train.speed_paths`` setting; nothing else differs between variants, and each reaches the model only through the
config, as it does in training. Tasks of one variant:

- ``infer``: ``model.predict_on_batch`` (Keras' compiled predict function) on prepared synthetic images;
- ``train``: ``model.train_on_batch`` (Keras' compiled train step, what ``fit`` runs) on the same images with random
  ground-truth boxes, optimizer from ``frcnn.optim.make_optimizer``;
- one task per inference stage (:data:`STAGES`): the model's own parts called on the previous stage's outputs,
  each compiled on its own (:func:`benchmarks.measure.compile_fn`, XLA when the variant has it);
- one task per training stage (:data:`TRAIN_STAGES`, named ``train:<stage>``): that part's forward and backward
  pass in training mode (:func:`benchmarks.measure.gradient_fn`), on the training batch's features and
  ``sizes.rois`` random ROIs per image.
"""

import dataclasses

import numpy as np

from benchmarks import measure

STAGES = ("trunk", "rpn_head", "proposals", "roi_align", "roi_head", "detections")
# Parts of a training step timed alone, forward and backward (the rest of a step: anchor and ROI targets, proposals,
# losses and the optimizer update).
TRAIN_STAGES = ("trunk", "rpn_head", "roi_align", "roi_head")
COMPUTE_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Image ``min_size x max_size`` (before padding), test proposals and training ROIs per image, batch size."""

    min_size: int = 600
    max_size: int = 1000
    proposals: int = 300
    rois: int = 128
    batch: int = 1


@dataclasses.dataclass(frozen=True)
class Variant:
    """``speed_paths``: ``train.speed_paths`` (``None``: the config's); ``infer``: whether inference is timed too
    (a variant that differs from another only in training kernels leaves it out)."""

    precision: str
    xla: bool
    speed_paths: str = None
    infer: bool = True

    @property
    def name(self):
        return (self.precision + (" +xla" if self.xla else "")
                + (f" sp:{self.speed_paths}" if self.speed_paths else ""))


def base_config(config, overrides, sizes):
    """The config under test (without the variant's keys): ``config`` + user ``overrides`` + the sizes, random
    weights, a vanishing learning rate (see below). When the config lists no classes, 20 placeholder names stand in
    (only their number costs time)."""
    from frcnn.config import load_config

    # Before the user's overrides, so that --set can change it: a learning rate that leaves the random weights where
    # they are (the arithmetic of a step does not depend on it). With a real one the loss of a random ResNet-50-C4
    # grows step by step into inf, the weights become NaN, and proposals and NMS then have nothing to do.
    defaults = ["train.lr=1.0e-20"]
    settings = [
        "model.backbone_weights=none",
        f"input.min_size={sizes.min_size}",
        f"input.min_size_test={sizes.min_size}",
        f"input.max_size={sizes.max_size}",
        f"rpn.post_nms_topk_test={sizes.proposals}",
        f"roi_heads.num_rois={sizes.rois}",
        f"train.batch_size={sizes.batch}",
        f"eval.batch_size={sizes.batch}",
    ]
    cfg = load_config(config, defaults + list(overrides) + settings)
    # The pre-NMS top-k at test time must be at least the number of proposals kept.
    topk = max(sizes.proposals, cfg.rpn.pre_nms_topk_test)
    cfg = load_config(config, defaults + list(overrides) + settings + [f"rpn.pre_nms_topk_test={topk}"])
    if cfg.data.classes is None:
        names = tuple(f"class{i}" for i in range(1, 21))
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, classes=names))
    return cfg


def variant_config(cfg, variant):
    """``cfg`` with the variant's switches, the same keys a training run reads."""
    train = dataclasses.replace(cfg.train, jit_compile=variant.xla,
                                mixed_precision="off" if variant.precision == "float32" else variant.precision)
    if variant.speed_paths:
        train = dataclasses.replace(train, speed_paths=variant.speed_paths)
    return cfg.replace(train=train)


def synthetic_batches(cfg, sizes, seed=0):
    """``(inference batch, training batch)`` of ``sizes.batch`` random ``min_size x max_size`` images, prepared as
    ``model.detect`` prepares them; the training batch adds 3 random ground-truth boxes per image
    (docs/CONTRACTS.md format)."""
    from frcnn import transform

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (sizes.min_size, sizes.max_size, 3), dtype=np.uint8) for _ in range(sizes.batch)]
    batch = transform.ImageTransform.from_input_config(cfg.input).prepare_batch(images)
    max_gt, num_gt = cfg.input.max_gt, min(3, cfg.input.max_gt)
    boxes = random_boxes(rng, batch["image_sizes"], max_gt, 0.15, 0.6)
    valid = np.arange(max_gt)[None, :] < num_gt
    train = dict(
        batch,
        gt_boxes=np.where(valid[..., None], boxes, 0.0).astype(np.float32),
        gt_classes=np.where(valid, rng.integers(1, cfg.num_classes, (sizes.batch, max_gt)), 0).astype(np.int32),
        gt_valid=np.repeat(valid, sizes.batch, axis=0),
        image_ids=np.arange(sizes.batch, dtype=np.int64),
    )
    return batch, train


def random_boxes(rng, image_sizes, count, low, high):
    """``(B, count, 4)`` float32 ``(x1, y1, x2, y2)`` boxes inside each image of ``image_sizes`` (``(B, 2)`` height,
    width), each side a uniform ``low..high`` fraction of the image's."""
    heights, widths = (np.asarray(image_sizes)[:, k, None].astype(np.float32) for k in (0, 1))
    w = rng.uniform(low, high, (len(widths), count)) * widths
    h = rng.uniform(low, high, (len(heights), count)) * heights
    x1 = rng.uniform(0.0, 1.0, w.shape) * (widths - w)
    y1 = rng.uniform(0.0, 1.0, h.shape) * (heights - h)
    return np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32)


def build(cfg):
    """``frcnn.build_model(cfg)`` compiled as ``engine.train`` compiles it (``train.jit_compile``)."""
    import frcnn
    from frcnn import optim

    model = frcnn.build_model(cfg)
    model.compile(optimizer=optim.make_optimizer(cfg, steps_per_epoch=1000), jit_compile=cfg.train.jit_compile)
    return model


def inference_model(model, cfg):
    """The model as ``tools/infer.py``, ``evaluate.py`` and ``export.py`` run it (``frcnn.loading``): a copy with
    the trained model's weights and its frozen BatchNorms folded into the convolutions (a no-op for other norms)."""
    import frcnn

    copy = frcnn.build_model(cfg, load_weights=False)
    copy.set_weights(model.get_weights())
    copy.fold_batchnorm()
    copy.compile(jit_compile=cfg.train.jit_compile)
    return copy


def stage_tasks(model, batch, jit_compile):
    """``{stage: task}`` for :data:`STAGES`: each stage calls the model's part on the tensors the stage before it
    left in a shared dict, so the tasks must run in this order (once) before any of them is timed alone."""
    from keras import ops

    rpn, heads = model.rpn, model.roi_heads

    def trunk(images, image_sizes):
        return model.trunk(model.transform.normalize(images, image_sizes), training=False)

    def proposals(features, logits, deltas, image_sizes):
        shape = ops.shape(features)
        return rpn.proposals([logits, deltas, rpn.anchors(shape[1], shape[2]), image_sizes], training=False)

    # (stage, function, input names, output names)
    spec = (
        ("trunk", trunk, ("images", "image_sizes"), ("features",)),
        ("rpn_head", rpn.head, ("features",), ("rpn_logits", "rpn_deltas")),
        ("proposals", proposals, ("features", "rpn_logits", "rpn_deltas", "image_sizes"),
         ("proposals", "proposal_valid")),
        ("roi_align", lambda f, p: heads.pooler([f, p]), ("features", "proposals"), ("pooled",)),
        ("roi_head", lambda x: heads.head(x, training=False), ("pooled",), ("class_logits", "box_deltas")),
        ("detections", lambda logits, *t: heads.decoder([ops.softmax(ops.cast(logits, "float32"), axis=-1), *t]),
         ("class_logits", "box_deltas", "proposals", "proposal_valid", "image_sizes"), ("detections",)),
    )
    values = {"images": ops.convert_to_tensor(batch["images"]),
              "image_sizes": ops.convert_to_tensor(batch["image_sizes"].astype(np.int32))}

    def task(fn, inputs, outputs):
        compiled = measure.compile_fn(fn, model.variables, jit_compile)

        def run():
            out = compiled(*(values[name] for name in inputs))
            measure.block(out)
            values.update(zip(outputs, out if len(outputs) > 1 else (out,)))

        return run

    return {name: task(fn, inputs, outputs) for name, fn, inputs, outputs in spec}


def train_stage_tasks(model, train_batch, rois_per_image, jit_compile, seed=0):
    """``{"train:<stage>": task}`` for :data:`TRAIN_STAGES`: forward and backward of each part of ``model`` (in
    training mode) as a training step runs it: weight gradients of the part, and the gradient with respect to its
    input wherever the trunk trains (the images get none). Inputs are computed once: the normalised images, the
    trunk's features and ``rois_per_image`` random boxes per image (the ROI count of a training step)."""
    from keras import ops

    rpn, heads = model.rpn, model.roi_heads
    image_sizes = ops.convert_to_tensor(train_batch["image_sizes"].astype(np.int32))
    images = model.transform.normalize(ops.convert_to_tensor(train_batch["images"]), image_sizes)
    features = model.trunk(images, training=True)
    rng = np.random.default_rng(seed)
    rois = ops.convert_to_tensor(random_boxes(rng, train_batch["image_sizes"], rois_per_image, 0.05, 0.5))
    pooled = heads.pooler([features, rois])
    trunk_trains = bool(model.trunk.trainable_weights)
    # (stage, function, its first argument, further arguments, trainable variables)
    spec = (
        ("trunk", lambda x: model.trunk(x, training=True), images, (), model.trunk.trainable_weights),
        ("rpn_head", lambda f: rpn.head(f), features, (), rpn.head.trainable_weights),
        ("roi_align", lambda f, r: heads.pooler([f, r]), features, (rois,), ()),
        ("roi_head", lambda x: heads.head(x, training=True), pooled, (), heads.head.trainable_weights),
    )

    def task(name, fn, x, rest, variables):
        wrt_input = name != "trunk" and trunk_trains
        compiled = measure.gradient_fn(fn, variables, jit_compile, wrt_input=wrt_input)
        return lambda: measure.block(compiled(x, *rest))

    return {f"train:{name}": task(name, fn, x, rest, variables) for name, fn, x, rest, variables in spec}


def tasks(model, cfg, variant, sizes, split=True):
    """``({task: fn}, seen)`` of one variant, in running order: ``infer``, ``train``, then the inference stages and
    the training stages (without ``variant.infer``: ``train`` and the training stages only). ``seen``
    records the training loss of every step and the detections per image of every inference: with random weights
    the loss can become non-finite and the detections few, which says how much work NMS had."""
    batch, train_batch = synthetic_batches(cfg, sizes)
    seen = {"losses": [], "detections": []}

    def train():
        seen["losses"].append(float(model.train_on_batch(train_batch, return_dict=True)["loss"]))

    out = {}
    predictor = None
    if variant.infer:
        predictor = inference_model(model, cfg)  # inference and its stages: folded, as the tools run it

        def infer():
            seen["detections"].append(float(np.mean(predictor.predict_on_batch(batch)["num_detections"])))

        out["infer"] = infer
    out["train"] = train
    if split:
        if predictor is not None:
            out.update(stage_tasks(predictor, batch, variant.xla))
        out.update(train_stage_tasks(model, train_batch, sizes.rois, variant.xla))
    return out, seen
