"""Child processes of ``tests/test_distribute.py`` (each needs a fresh interpreter: TensorFlow fixes its devices, and a
multi-worker strategy its cluster, when it starts).

    python tests/distribute_worker.py mirrored OUT_DIR
        Splits the CPU into two logical devices and compares one ``MirroredStrategy`` training step (global batch 2,
        one image per replica, ``train.jit_compile`` on) with one single-device step on the same two images (XLA
        off), from the same weights; then
        swaps their checkpoints (model + optimizer) and compares a second step; then checks
        ``frcnn.tf_distribute.sync_replica_gradients`` on a toy model (loss-scale overflow on one replica, clipping of
        the global gradient). Writes ``OUT_DIR/result.json`` and the mirrored model's step-1 checkpoint
        ``OUT_DIR/mirrored_step1.weights.h5``.

    TF_CONFIG=... python tests/distribute_worker.py worker WORKDIR WEIGHTS_OUT RESULT_OUT KEY=VALUE...
        One worker of a ``train.strategy=multi_worker`` run of ``frcnn.engine.train`` on ``configs/test.yaml`` with
        the given overrides; saves the final weights to ``WEIGHTS_OUT`` and a JSON summary to ``RESULT_OUT``.
"""

import contextlib
import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The settings of the mirrored comparison: SGD (Adam's first step is blind to the gradient's scale), no warm-up,
# and a frozen trunk (RPN head, res5 and the Dense heads train), which halves the time to trace a training step.
MIRRORED_OVERRIDES = (
    "train.optimizer=sgd", "train.lr=0.01", "train.scale_lr=false", "train.warmup_steps=0",
    "train.weight_decay=0.0001", "train.batch_size=2", "data.classes=[circle, square, triangle]",
    "model.freeze_at=4",
)
# Whole-step XLA (train.jit_compile) under MirroredStrategy cannot run on the tests' two LOGICAL CPU devices: XLA
# refuses a step whose variables sit on another device (TensorFlow's known issue "tf.Variable on a different
# device"). Set True on a machine with two GPUs to compare XLA under several replicas with the plain single step.
MIRRORED_JIT = False


def _split_invariant_sampling():
    """Make anchor and ROI sampling deterministic AND independent of how the batch is split across replicas.

    ``frcnn.targets`` draws one uniform key per candidate from the global generator: a replica holding image 1 alone
    would draw other keys than a single device holding images 0 and 1. Here every image gets the same fixed keys,
    a function of the candidate's index only, so both runs sample exactly the same anchors and ROIs.
    """
    import tensorflow as tf

    from frcnn import targets

    def keys(shape, seed):
        row = tf.random.stateless_uniform(tf.reshape(shape[-1], [1]), seed=[12, 34])
        return tf.broadcast_to(row, shape)

    targets._uniform_keys = keys


def _batch():
    """Two different synthetic 128x128 images with two and three boxes (the batch format of docs/CONTRACTS.md)."""
    import numpy as np

    rng = np.random.default_rng(7)
    images = rng.uniform(0, 255, (2, 128, 128, 3)).astype(np.float32)
    images[0, 20:70, 30:90] = (220, 40, 40)
    images[1, 60:120, 10:50] = (40, 200, 60)
    images[1, 10:40, 80:125] = (30, 30, 230)
    gt_boxes = np.zeros((2, 3, 4), np.float32)
    gt_boxes[0, :2] = [[30, 20, 90, 70], [5, 90, 40, 126]]
    gt_boxes[1] = [[10, 60, 50, 120], [80, 10, 125, 40], [60, 70, 100, 100]]
    return {
        "images": images,
        "image_sizes": np.full((2, 2), 128, np.int32),
        "scales": np.ones(2, np.float32),
        "gt_boxes": gt_boxes,
        "gt_classes": np.array([[1, 2, 0], [2, 3, 1]], np.int32),
        "gt_valid": np.array([[True, True, False], [True, True, True]]),
        "image_ids": np.arange(2, dtype=np.int64),
    }


class _Clock:
    """Records the seconds each phase took in ``result["seconds"]`` (the test prints them when it fails)."""

    def __init__(self, result):
        import time

        self.time = time.perf_counter
        self.last = self.time()
        self.seconds = result.setdefault("seconds", {})

    def __call__(self, phase):
        now = self.time()
        self.seconds[phase] = round(now - self.last, 1)
        self.last = now


def _max_rel_diff(a_list, b_list, ref_list):
    """max |a - b| / max |ref| over all tensors (ref: the size of the update being compared)."""
    import numpy as np

    scale = max(float(np.max(np.abs(r))) for r in ref_list) or 1.0
    return max(float(np.max(np.abs(a - b))) for a, b in zip(a_list, b_list)) / scale


def mirrored(out_dir):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np

    from frcnn import checkpoints, optim, tf_distribute
    from frcnn.config import load_config
    from frcnn.model import LOSS_NAMES, build_model

    _split_invariant_sampling()
    result = {}
    clock = _Clock(result)
    cfg = load_config("test.yaml", list(MIRRORED_OVERRIDES))
    batch = _batch()
    dataset = tf.data.Dataset.from_tensors(batch).repeat()

    keras.utils.set_random_seed(0)
    single = build_model(cfg, load_weights=False)
    single.compile(optimizer=optim.make_optimizer(cfg, 10), jit_compile=False)
    initial = single.get_weights()
    clock("build single")

    strategy = tf_distribute.make_strategy("mirrored")
    result["replicas"] = strategy.num_replicas_in_sync
    # What fit will do with the dataset: each replica gets one of the two images.
    first = next(iter(strategy.experimental_distribute_dataset(dataset)))
    local = strategy.experimental_local_results(first["images"])
    result["per_replica_images"] = [int(x.shape[0]) for x in local]
    result["replica_images_are_the_two_images"] = bool(
        len(local) == 2 and np.array_equal(local[0][0], batch["images"][0])
        and np.array_equal(local[1][0], batch["images"][1])
    )
    with strategy.scope():
        dist = build_model(cfg.replace(train=dataclasses.replace(cfg.train, jit_compile=MIRRORED_JIT)),
                           load_weights=False)
        dist.compile(optimizer=optim.make_optimizer(cfg, 10), jit_compile=MIRRORED_JIT)
        dist.set_weights(initial)
    clock("build mirrored")

    def step(model):
        history = model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
        return {k: float(v[-1]) for k, v in history.history.items() if k in LOSS_NAMES + ("loss",)}

    result["single_losses_1"] = step(single)
    clock("single step 1")
    result["mirrored_losses_1"] = step(dist)
    clock("mirrored step 1")
    result["mirrored_jit_compile"] = bool(dist.jit_compile)
    w_single, w_dist = single.get_weights(), dist.get_weights()
    update = [a - b for a, b in zip(w_single, initial)]
    result["update_size_1"] = max(float(np.max(np.abs(u))) for u in update)
    result["weights_rel_diff_1"] = _max_rel_diff(w_single, w_dist, update)
    result["loss_scale_path_replicas"] = strategy.num_replicas_in_sync

    # Resume across strategies: each model restores the other's checkpoint (model + optimizer), then both step.
    single_ckpt = os.path.join(out_dir, "single_step1.weights.h5")
    dist_ckpt = os.path.join(out_dir, "mirrored_step1.weights.h5")
    checkpoints.atomic_save_weights(single, single_ckpt)
    checkpoints.atomic_save_weights(dist, dist_ckpt)
    with strategy.scope():
        checkpoints.load_checkpoint(dist, single_ckpt, with_optimizer=True)
    checkpoints.load_checkpoint(single, dist_ckpt, with_optimizer=True)
    result["restored_exactly"] = bool(
        all(np.array_equal(a, b) for a, b in zip(dist.get_weights(), w_single))
        and all(np.array_equal(a, b) for a, b in zip(single.get_weights(), w_dist))
    )
    result["iterations_after_restore"] = [int(single.optimizer.iterations.numpy()),
                                          int(dist.optimizer.iterations.numpy())]
    before = single.get_weights()
    result["single_losses_2"] = step(single)
    result["mirrored_losses_2"] = step(dist)
    update = [a - b for a, b in zip(single.get_weights(), before)]
    result["weights_rel_diff_2"] = _max_rel_diff(single.get_weights(), dist.get_weights(), update)
    result["iterations_2"] = [int(single.optimizer.iterations.numpy()), int(dist.optimizer.iterations.numpy())]
    clock("checkpoint swap and step 2")

    # Evaluation under the strategy: one copy of each image, the same detections as the single-device model.
    dist.set_weights(single.get_weights())
    with strategy.scope():
        in_scope = dist.predict_on_batch(batch)
    out_single, out_dist = single.predict_on_batch(batch), dist.predict_on_batch(batch)
    result["predict_rows"] = [int(len(out_single["num_detections"])), int(len(out_dist["num_detections"])),
                              int(len(in_scope["num_detections"]))]
    result["predict_scores_max_diff"] = float(np.max(np.abs(out_single["scores"] - out_dist["scores"])))
    clock("predict")

    result.update(_toy_gradient_sync(strategy))
    clock("toy gradient sync")
    os.remove(single_ckpt)  # 200 MB; the mirrored one seeds the multi-worker test
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


def _toy_gradient_sync(strategy):
    """``sync_replica_gradients`` on a one-weight model, where the right answer is known."""
    import keras
    import numpy as np
    import tensorflow as tf

    from frcnn.tf_distribute import sync_replica_gradients

    class Toy(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")

        def call(self, x):
            return self.dense(x)

        def train_step(self, x):
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(self(x)) / replicas
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, self.trainable_variables)
            self.optimizer.apply(sync_replica_gradients(grads, self.optimizer), self.trainable_variables)
            return {"loss": loss}

    def run(optimizer, rows, distributed):
        with strategy.scope() if distributed else contextlib.nullcontext():
            toy = Toy()
            toy(tf.zeros((1, 2)))
            toy.compile(optimizer=optimizer())
        toy.fit(tf.data.Dataset.from_tensors(np.asarray(rows, np.float32)).repeat(), steps_per_epoch=1, verbose=0)
        scale = float(toy.optimizer.dynamic_scale.numpy()) if hasattr(toy.optimizer, "dynamic_scale") else None
        return toy.dense.kernel.numpy().ravel().tolist(), scale

    out = {}
    # Loss scaling: replica 1's gradient overflows; every replica must skip the step and halve the scale.
    lso = lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=1024.0)  # noqa: E731
    out["overflow_kernel"], out["overflow_scale"] = run(lso, [[1.0, 1.0], [np.inf, 1.0]], True)
    out["finite_kernel"], out["finite_scale"] = run(lso, [[1.0, 2.0], [3.0, 4.0]], True)
    # Clipping: the mirrored update must be the single-device update with the GLOBAL gradient clipped.
    clipped = lambda: keras.optimizers.SGD(1.0, global_clipnorm=0.5)  # noqa: E731
    rows = [[3.0, 4.0], [1.0, 0.0]]
    out["clip_single_kernel"], _ = run(clipped, rows, False)
    out["clip_mirrored_kernel"], _ = run(clipped, rows, True)
    return out


def worker(workdir, weights_out, result_out, overrides):
    from frcnn import engine, tf_distribute
    from frcnn.config import load_config

    cfg = load_config("test.yaml", ["train.strategy=multi_worker"] + list(overrides))
    model, result = engine.train(cfg, workdir, verbose=0)
    model.save_weights(weights_out)
    strategy = model.distribute_strategy
    summary = {
        "chief": tf_distribute.is_chief(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "iterations": int(model.optimizer.iterations.numpy()),
        "loss": result["history"].get("loss"),
        "metrics": None if result["metrics"] is None else {"num_images": result["metrics"].get("num_images")},
        "policy": model.dtype_policy.name,
        "local_predict": bool(model.__dict__.get("_local_predict")),
    }
    with open(result_out, "w", encoding="utf-8") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mirrored":
        mirrored(sys.argv[2])
    elif mode == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
