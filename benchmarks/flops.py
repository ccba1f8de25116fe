"""FLOPs of one inference and one training step, counted analytically from the layer shapes.

Convention: 2 x the multiply-adds of the matrix products (every ``Conv2D`` and ``Dense`` layer, and RoIAlign's two
interpolation-matrix products, :func:`frcnn.ops.roi_align`). Normalisation, activations, additions, box decoding,
NMS and target assignment are left out: they are a small fraction of the arithmetic, and the point is a rate to
set against a matmul's. Counted per stage:

- trunk (ResNet-50 to res4) at the padded input size, once per image;
- RPN head (3x3 conv + two 1x1 convs) on the res4 map, once per image;
- RoIAlign: ``N P C min(h, w) (max(h, w) + P)`` multiply-adds per image (contract the longer side first, then the
  shorter, as ``roi_align`` does), ``N`` ROIs on an ``h x w x C`` map, ``P`` pooled size;
- ROI head: res5 at ``P x P x C`` plus the two Dense layers, once per ROI.

A training step is the forward pass at the training ROI count plus the backward pass: for each layer, the weight
gradient (the forward multiply-adds again) when its weights train, and the input gradient (again the same) when
some layer before it trains, so frozen stages at the bottom of the trunk cost nothing backwards. "Before" is the
layer order of the functional model, exact for ResNet's chain of blocks up to the first trainable block's two
branches. RoIAlign's backward is one input gradient (the ROIs are constants).

Why not TensorFlow's profiler (``tf.compat.v1.profiler``): it counts only ops with static shapes and a registered
statistic, so it misses the Dense heads behind a dynamic reshape and anything inside a loop, it knows nothing of
the backward pass, and it exists on one backend. Its count of the convolutions agreed with this one to 0.2 %
(564 vs 563 GFLOP at the VOC size, docs/NOTES.md).
"""

import math

import keras


def layer_macs(layer, output_shape):
    """Multiply-adds of one ``Conv2D`` (all output positions and channels) or ``Dense`` layer for ONE sample, given
    its output shape ``(batch, ...)``."""
    kernel = int(math.prod(layer.kernel.shape))  # (kh, kw, cin / groups, cout) or (cin, cout)
    if isinstance(layer, keras.layers.Conv2D):
        return int(output_shape[1]) * int(output_shape[2]) * kernel
    positions = int(math.prod(output_shape[1:-1])) if len(output_shape) > 2 else 1
    return positions * kernel


def functional_costs(functional, input_shape):
    """``[(macs per sample, trains)]`` of every Conv2D / Dense layer of a functional model at ``input_shape``, in
    layer order (shape inference only, nothing runs)."""
    layers = [l for l in functional.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    probe = keras.Model(functional.inputs, [l.output for l in layers])
    specs = probe.compute_output_spec(keras.KerasTensor(input_shape))
    return [(layer_macs(l, s.shape), bool(l.trainable_weights)) for l, s in zip(layers, specs)]


def backward_macs(costs, upstream_trains):
    """Multiply-adds of the backward pass through ``costs`` (layer order) and whether anything up to its end trains:
    a weight gradient per training layer, an input gradient per layer with a training layer before it."""
    total = 0
    for macs, trains in costs:
        total += macs * (int(trains) + int(upstream_trains))
        upstream_trains = upstream_trains or trains
    return total, upstream_trains


def roi_align_macs(num_rois, pool, height, width, channels):
    short, long = min(height, width), max(height, width)
    return num_rois * pool * channels * short * (long + pool)


def count(model, padded_shape, batch, proposals, rois):
    """FLOPs of ``model`` (a built ``FasterRCNN``) for ``batch`` images padded to ``padded_shape = (H, W)``:
    inference with ``proposals`` ROIs per image and a training step with ``rois`` sampled ROIs per image.

    Returns ``{"inference": {stage: FLOPs, "total"}, "train": {"forward", "backward", "total"}, "train_stages":
    {stage: forward + backward FLOPs}, "per_roi": {...}, "feature_shape": [h, w, C]}``; all FLOPs for the whole
    batch."""
    height, width = (int(d) for d in padded_shape)
    trunk = functional_costs(model.trunk, (1, height, width, 3))
    feature = tuple(int(d) for d in model.trunk.compute_output_shape((1, height, width, 3))[1:])
    head = model.rpn.head
    hidden = head.conv.compute_output_shape((1,) + feature)
    rpn = [(layer_macs(conv, conv.compute_output_shape(shape)), bool(conv.trainable_weights))
           for conv, shape in ((head.conv, (1,) + feature), (head.objectness, hidden), (head.deltas, hidden))]
    pool = model.roi_heads.pooler.pool_size
    roi_head = model.roi_heads.head
    res5 = functional_costs(roi_head.res5.layer, (1, pool, pool, feature[-1]))
    dense = [(layer_macs(td.layer, (1, td.layer.kernel.shape[-1])), bool(td.layer.trainable_weights))
             for td in (roi_head.cls, roi_head.box)]
    per_roi = sum(m for m, _ in res5 + dense)

    def forward(num_rois):
        return {
            "trunk": 2 * batch * sum(m for m, _ in trunk),
            "rpn_head": 2 * batch * sum(m for m, _ in rpn),
            "roi_align": 2 * batch * roi_align_macs(num_rois, pool, *feature),
            "roi_head": 2 * batch * num_rois * per_roi,
        }

    inference = forward(proposals)
    inference["total"] = sum(inference.values())
    train_forward = sum(forward(rois).values())
    trunk_back, trunk_trains = backward_macs(trunk, False)
    rpn_back, _ = backward_macs(rpn, trunk_trains)
    align_back = roi_align_macs(rois, pool, *feature) if trunk_trains else 0
    head_back, _ = backward_macs(res5 + dense, trunk_trains)
    backward = {"trunk": trunk_back, "rpn_head": rpn_back, "roi_align": align_back, "roi_head": rois * head_back}
    backward = {stage: 2 * batch * macs for stage, macs in backward.items()}
    train_stages = {stage: flop + backward[stage] for stage, flop in forward(rois).items()}
    return {
        "inference": inference,
        "train": {"forward": train_forward, "backward": sum(backward.values()),
                  "total": train_forward + sum(backward.values())},
        "train_stages": train_stages,
        "per_roi": {"roi_head": 2 * per_roi, "res5": 2 * sum(m for m, _ in res5)},
        "feature_shape": list(feature),
    }
