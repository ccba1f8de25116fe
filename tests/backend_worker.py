"""Runs the detector on the Keras backend of the environment (KERAS_BACKEND) and writes what it computed as JSON.

Used by tests/test_backends.py, which runs it once per backend in a subprocess (Keras picks its backend at import)
and compares the results. usage: python backend_worker.py WORKDIR [--make-weights]

WORKDIR holds ``batch.npz`` (a training batch in the docs/CONTRACTS.md format) and ``images.npz`` written by the
test, and ``model.weights.h5``, which the reference backend's run writes first (``--make-weights``: the model built
with seed 3) and the others load. Matrix products and convolutions run in full float32 (no TF32 on a GPU: the
backends are compared to 1e-4). The worker writes ``result_<backend>.json``:
- ``losses``: the four losses of the batch (sampling made deterministic by the config: every candidate sampled);
- ``detections``: ``frcnn.inference.detect`` on the images;
- ``roi_align``: the largest difference between RoIAlign (fixed and adaptive sampling) and the NumPy reference;
- ``nms``: whether the padded NMS keeps exactly the reference NMS's boxes on random cases;
- ``custom_gradients``: the largest relative error of the hand-written gradients (group norm against finite
  differences of a float64 NumPy group norm, the matrix-product kernel gradient against the backend's convolution);
- ``fit``: the losses of two training steps of ``model.fit`` (finite, the weights move);
- ``device``: where the backend computed (``cpu``, or the GPU's name).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import reference as ref  # noqa: E402
import frcnn.inference  # noqa: E402
from frcnn import build_model, load_config  # noqa: E402
from frcnn.checkpoints import load_weights  # noqa: E402
from frcnn.ops import conv_with_matmul_kernel_grad, group_norm, non_max_suppression, roi_align  # noqa: E402

# Every anchor and every proposal is sampled (positive fraction 1, samples >= candidates), so the four losses do
# not depend on the backend's random numbers.
OVERRIDES = ["data.classes=[circle,square,triangle]", "rpn.batch_size_per_image=100000",
             "rpn.positive_fraction=1.0", "roi_heads.num_rois=72", "roi_heads.positive_fraction=1.0",
             "roi_heads.score_thresh=0.0", "train.optimizer=sgd", "train.lr=0.01", "train.warmup_steps=0"]


def check_roi_align():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)
    rois = np.stack([np.sort(rng.uniform(-20, 160, size=(6, 2, 2)), axis=1).reshape(6, 4)[:, [0, 2, 1, 3]]
                     for _ in range(2)]).astype(np.float32)
    worst = 0.0
    for ratio in (2, 0):
        out = ops.convert_to_numpy(roi_align(features, rois, 4, 16, ratio))
        want = np.stack([ref.roi_align(features[b], rois[b], 4, 16, ratio) for b in range(2)])
        worst = max(worst, float(np.abs(out - want).max()))
    return worst


def check_nms():
    rng = np.random.default_rng(1)
    for _ in range(5):
        xy = rng.uniform(0, 80, size=(2, 40, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, size=(2, 40, 2))], -1).astype(np.float32)
        scores = rng.uniform(size=(2, 40)).astype(np.float32)
        valid = rng.uniform(size=(2, 40)) > 0.2
        index, kept = non_max_suppression(boxes, scores, valid, 12, 0.5)
        index, kept = ops.convert_to_numpy(index), ops.convert_to_numpy(kept)
        for b in range(2):
            live = np.flatnonzero(valid[b])
            want = live[ref.nms(boxes[b][live], scores[b][live], 0.5)][:12]
            if list(index[b][kept[b]]) != list(want):
                return False
    return True


def _gradients(f, args):
    """Gradients of the scalar ``f(*args)`` with respect to every argument, with the backend's own autodiff."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(f, argnums=tuple(range(len(args))))(*args)]
    if backend == "torch":
        # On the device Keras computes on (a GPU where there is one).
        tensors = [ops.convert_to_tensor(a).detach().clone().requires_grad_(True) for a in args]
        f(*tensors).backward()
        return [t.grad.cpu().numpy() for t in tensors]
    import tensorflow as tf

    tensors = [tf.constant(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        value = f(*tensors)
    return [g.numpy() for g in tape.gradient(value, tensors)]


def check_custom_gradients():
    rng = np.random.default_rng(2)
    x = rng.normal(0.5, 2.0, (2, 4, 5, 8)).astype(np.float32)
    gamma, beta = rng.normal(1, 0.3, 8).astype(np.float32), rng.normal(0, 0.3, 8).astype(np.float32)
    weights = rng.standard_normal(x.shape)
    w = weights.astype(np.float32)
    got = _gradients(lambda x, g, b: ops.sum(ops.multiply(group_norm(x, g, b, 4, 1e-5), ops.convert_to_tensor(w))),
                     [x, gamma, beta])

    def loss(x, g, b):
        return float(np.sum(ref.group_norm(x, g, b, 4) * weights))

    worst = 0.0
    args = [a.astype(np.float64) for a in (x, gamma, beta)]
    for which, grad in enumerate(got):
        flat_indices = rng.choice(args[which].size, size=min(8, args[which].size), replace=False)
        for flat in flat_indices:
            index = np.unravel_index(flat, args[which].shape)
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][index] += 1e-4
            minus[which][index] -= 1e-4
            numeric = (loss(*plus) - loss(*minus)) / 2e-4
            worst = max(worst, abs(float(grad[index]) - numeric) / max(1.0, abs(numeric)))
    # The kernel gradient as patches^T dy against the backend's own convolution gradient.
    image = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    upstream = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
    up = ops.convert_to_tensor(upstream)
    mine = _gradients(lambda x, k: ops.sum(ops.multiply(conv_with_matmul_kernel_grad(x, k), up)), [image, kernel])
    theirs = _gradients(lambda x, k: ops.sum(ops.multiply(ops.conv(x, k, padding="same"), up)), [image, kernel])
    for a, b in zip(mine, theirs):
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst


def full_float32():
    """No TF32 in matrix products and convolutions on a GPU (a no-op on a CPU), so that backends agree to 1e-4;
    returns where the backend computes."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        device = jax.devices()[0]
        return "cpu" if device.platform == "cpu" else device.device_kind
    if backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "cpu"


def main(workdir, make_weights=False):
    device = full_float32()
    cfg = load_config("test.yaml", OVERRIDES)
    weights = os.path.join(workdir, "model.weights.h5")
    if make_weights:
        keras.utils.set_random_seed(3)
        build_model(cfg, load_weights=False).save_weights(weights)
    model = build_model(cfg, load_weights=False)
    load_weights(model, weights)
    batch = dict(np.load(os.path.join(workdir, "batch.npz")))
    losses = {k: float(ops.convert_to_numpy(v)) for k, v in model(batch, training=True).items()}
    images = list(np.load(os.path.join(workdir, "images.npz")).values())
    detections = [{k: np.asarray(v).tolist() for k, v in d.items()} for d in frcnn.inference.detect(model, images)]

    from frcnn import optim

    model.compile(optimizer=optim.make_optimizer(cfg, steps_per_epoch=10))
    before = ops.convert_to_numpy(model.rpn.head.conv.kernel).copy()
    history = model.fit(_repeat(batch), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    moved = float(np.abs(ops.convert_to_numpy(model.rpn.head.conv.kernel) - before).max())
    result = {
        "backend": keras.backend.backend(),
        "device": device,
        "losses": losses,
        "detections": detections,
        "roi_align": check_roi_align(),
        "nms": check_nms(),
        "custom_gradients": check_custom_gradients(),
        "fit": {"loss": history.history["loss"], "rpn_cls": history.history["rpn_cls"], "moved": moved},
    }
    with open(os.path.join(workdir, f"result_{keras.backend.backend()}.json"), "w") as f:
        json.dump(result, f)


def _repeat(batch):
    """The batch again and again: a ``tf.data`` dataset on TensorFlow (its input library), a Python generator on
    the other backends (which need no TensorFlow)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.data.Dataset.from_tensors(batch).repeat()

    def forever():  # Keras takes a generator's items as (inputs,) tuples
        while True:
            yield (batch,)

    return forever()


if __name__ == "__main__":
    main(sys.argv[1], make_weights="--make-weights" in sys.argv[2:])
