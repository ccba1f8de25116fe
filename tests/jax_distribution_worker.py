"""Trains the tiny detector for two steps on JAX, on one device and under ``keras.distribution.DataParallel``, and
writes what it computed as JSON. Run by tests/test_jax_distribution.py in a subprocess, with ``KERAS_BACKEND=jax``
and ``XLA_FLAGS`` (``--xla_force_host_platform_device_count=2`` for two CPU devices) in the environment: JAX reads
them when it is imported, so they cannot be set from inside a test process that has imported it.

    python jax_distribution_worker.py OUT.json
        one process: two steps on one device, then two steps under DataParallel over every device, from the same
        initial weights and on the same global batch of 2 images;
    python jax_distribution_worker.py OUT.json --process I --processes N --coordinator HOST:PORT
        process I of N (``keras.distribution.initialize``, i.e. ``jax.distributed.initialize``): DataParallel over
        the devices of all processes; each process feeds its own images of the same global batch.

The JSON holds, per run, the logged losses of each step, the number of devices, and digests of the trained
weights (per variable: sum and sum of squares); the one-process run also holds the largest difference between the
weights trained on one device and under DataParallel, and the largest change of any weight over the two steps.
"""

import argparse
import json
import time

import keras
import numpy as np

import frcnn
from frcnn.config import load_config

STEPS = 2
SEED = 7
OVERRIDES = ["data.classes=[circle,square,triangle]", "model.norm=group", "roi_heads.num_rois=16",
             "roi_heads.positive_fraction=0.5", f"train.seed={SEED}"]


def global_batch():
    """Two images with ground truth (tests/test_losses.py's golden batch): the second is 128 x 96, zero padded."""
    rng = np.random.default_rng(2024)
    images = rng.uniform(0, 255, size=(2, 128, 128, 3)).astype(np.float32)
    images[1, :, 96:] = 0.0
    return {
        "images": images,
        "image_sizes": np.array([[128, 128], [128, 96]], np.int32),
        "gt_boxes": np.array([[[10, 12, 60, 70], [64, 40, 120, 100], [0, 0, 0, 0]],
                              [[20, 30, 50, 90], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32),
        "gt_classes": np.array([[1, 3, 0], [2, 0, 0]], np.int32),
        "gt_valid": np.array([[True, True, False], [True, False, False]]),
    }


def _local(array):
    """This process's copy of a (replicated) variable value."""
    return np.asarray(array.addressable_data(0)) if hasattr(array, "addressable_data") else np.asarray(array)


def train(batch, distribution=None):
    """Build the detector from the fixed seed (under ``distribution`` if given), train ``STEPS`` steps on
    ``batch`` with ``train_on_batch``; returns (initial weights, losses per step, trained weights, details)."""
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(SEED)
    started = time.time()
    model = frcnn.build_model(load_config("test.yaml", OVERRIDES), load_weights=False)
    built = time.time()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=True)
    initial = [_local(v.value) for v in model.weights]
    losses = []
    for _ in range(STEPS):
        logs = model.train_on_batch(batch, return_dict=True)
        losses.append({name: float(value) for name, value in logs.items()})
    trained = [_local(v.value) for v in model.weights]
    sharding = model.weights[0].value.sharding
    details = {
        "losses": losses,
        "devices": len(getattr(sharding, "device_set", ())),
        "build_s": round(built - started, 1),
        "steps_s": round(time.time() - built, 1),
        "digest": [[float(w.sum(dtype=np.float64)), float(np.square(w, dtype=np.float64).sum())] for w in trained],
    }
    keras.distribution.set_distribution(None)
    return initial, trained, details


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--process", type=int)
    parser.add_argument("--processes", type=int)
    parser.add_argument("--coordinator")
    args = parser.parse_args()
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import jax

    if args.process is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        keras.distribution.initialize(args.coordinator, args.processes, args.process)
    devices = keras.distribution.list_devices()
    batch = global_batch()
    result = {"devices": len(devices), "local_devices": jax.local_device_count()}
    if args.process is None:
        initial, single, result["single"] = train(batch)
        initial_dp, parallel, result["data_parallel"] = train(batch, keras.distribution.DataParallel(devices=devices))
        result["same_initial_weights"] = all(np.array_equal(a, b) for a, b in zip(initial, initial_dp))
        result["max_weight_difference"] = max(float(np.abs(a - b).max()) for a, b in zip(single, parallel))
        result["max_update"] = max(float(np.abs(a - b).max()) for a, b in zip(single, initial))
    else:
        # Each process feeds its own rows of the global batch; Keras assembles the global arrays
        # (jax.make_array_from_process_local_data).
        per_process = len(batch["images"]) // args.processes
        rows = slice(args.process * per_process, (args.process + 1) * per_process)
        local = {name: value[rows] for name, value in batch.items()}
        _, _, result["data_parallel"] = train(local, keras.distribution.DataParallel(devices=devices))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
