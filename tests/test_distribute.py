"""Distributed training, mixed precision and XLA (README, "Multiple GPUs and machines"), on a CPU.

TensorFlow fixes its devices, and a multi-worker strategy its cluster, when it starts, so the strategy tests run in
child processes (``tests/distribute_worker.py``):

- ``MirroredStrategy`` over two logical CPU devices, with ``train.jit_compile``: one step on a global batch of 2
  (one image per replica) gives the losses and weights of one single-device step without XLA on the same 2 images;
  checkpoints (model + optimizer) move between the two and training goes on identically; evaluation predicts each
  image once. This child starts with the module and runs while the in-process mixed-precision test does (the
  machine has two cores).
- ``MultiWorkerMirroredStrategy``: two worker processes on 127.0.0.1 run ``frcnn.engine.train`` with
  ``mixed_bfloat16``, resuming from the mirrored run's checkpoint; both end with the same weights, only the chief
  writes and evaluates.

Every model costs 20-40 s to trace; the file builds five (two in the mirrored child, one per worker, one here).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distribute_worker.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))

from distribute_worker import MIRRORED_JIT, MIRRORED_OVERRIDES  # noqa: E402

MIRRORED_TIMEOUT = 420  # seconds; about 90 s on 2 cores
WORKERS_TIMEOUT = 420  # about 60 s (two processes)


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    # CPU only, whatever the machine: the mirrored test needs exactly its two logical CPU devices.
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class _Children:
    """Child processes with their output in files; ``wait`` kills whatever is still running at the deadline."""

    def __init__(self):
        self.procs = []

    def start(self, args, log_path, env):
        log = open(log_path, "w", encoding="utf-8")
        proc = subprocess.Popen([sys.executable] + args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append((proc, log, log_path))
        return proc

    def wait(self, proc, deadline):
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            return None

    def kill_all(self):
        for proc, log, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()

    @staticmethod
    def tail(log_path, lines=40):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = [line for line in f.read().splitlines() if not line.startswith(("W0000", "I0000"))]
        return "\n".join(text[-lines:])


@pytest.fixture(scope="module")
def children():
    running = _Children()
    yield running
    running.kill_all()


@pytest.fixture(scope="module", autouse=True)
def mirrored_child(children, tmp_path_factory):
    """Starts the mirrored comparison at the beginning of the module (in the background)."""
    out = tmp_path_factory.mktemp("mirrored")
    log = str(out / "log.txt")
    proc = children.start([WORKER, "mirrored", str(out)], log, _child_env())
    return {"proc": proc, "out": out, "log": log, "deadline": time.monotonic() + MIRRORED_TIMEOUT}


@pytest.fixture(scope="module")
def mirrored(children, mirrored_child):
    """The mirrored child's results (waits for it)."""
    code = children.wait(mirrored_child["proc"], mirrored_child["deadline"])
    tail = children.tail(mirrored_child["log"])
    assert code is not None, f"the mirrored comparison did not finish in {MIRRORED_TIMEOUT} s:\n{tail}"
    assert code == 0, f"the mirrored comparison failed (exit {code}):\n{tail}"
    with open(mirrored_child["out"] / "result.json", encoding="utf-8") as f:
        result = json.load(f)
    result["checkpoint"] = str(mirrored_child["out"] / "mirrored_step1.weights.h5")
    print("mirrored child, seconds per phase:", result["seconds"])
    return result


# ------------------------------------------------------------------------------------------ helpers in process


def test_strategy_settings_fail_clearly_and_pick_the_chief(monkeypatch):
    import tensorflow as tf

    from frcnn import tf_distribute as training
    from frcnn.errors import TrainingError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(TrainingError, match="TF_CONFIG"):
        training.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(TrainingError, match="TF_CONFIG is not valid"):
        training.make_strategy("multi_worker")
    with pytest.raises(TrainingError, match="unknown train.strategy"):
        training.make_strategy("parameter_server")
    assert training.make_strategy("default").num_replicas_in_sync == 1
    assert training.is_chief(training.make_strategy("default"))

    class FakeStrategy:
        def __init__(self, cluster, task_type, task_id):
            self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
                tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)

    workers = {"worker": ["a:1", "b:1"]}
    assert training.is_chief(FakeStrategy(workers, "worker", 0))
    assert not training.is_chief(FakeStrategy(workers, "worker", 1))
    assert training.num_workers(FakeStrategy(workers, "worker", 1)) == 2
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert training.is_chief(FakeStrategy(with_chief, "chief", 0))
    assert not training.is_chief(FakeStrategy(with_chief, "worker", 0))
    assert training.num_workers(FakeStrategy(with_chief, "worker", 0)) == 3


def test_mixed_float16_trains_a_step_on_cpu_with_loss_scaling_and_float32_outputs():
    """mixed_float16 (it runs on a CPU): Keras wraps the optimizer in a LossScaleOptimizer, the heads keep float32
    outputs (the decoders cast to float32 themselves), one training step gives finite losses. (mixed_bfloat16 and
    XLA: the strategy tests.)"""
    import keras
    import tensorflow as tf

    from frcnn.transform import normalize

    from distribute_worker import _batch
    from frcnn import optim
    from frcnn.config import load_config
    from frcnn.model import build_model

    cfg = load_config("test.yaml", list(MIRRORED_OVERRIDES) + ["train.mixed_precision=mixed_float16"])
    try:
        model = build_model(cfg, load_weights=False)
        model.compile(optimizer=optim.make_optimizer(cfg, 10), jit_compile=False)
        assert model.dtype_policy.name == "mixed_float16"
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        batch = _batch()
        images, sizes = tf.constant(batch["images"]), tf.constant(batch["image_sizes"])
        i = cfg.input
        features = model.trunk(normalize(images, sizes, i.pixel_mean, i.pixel_std, i.channel_order))
        rpn_logits, rpn_deltas = model.rpn.head(features)
        anchors = model.rpn.anchors(features.shape[1], features.shape[2])
        assert features.dtype == tf.float16  # the backbone computes in float16 ...
        # ... while everything that feeds losses, box decoding and NMS is float32.
        assert (rpn_logits.dtype, rpn_deltas.dtype, anchors.dtype) == (tf.float32,) * 3
        pooled = model.roi_heads.pooler([features, tf.constant(batch["gt_boxes"])])
        assert pooled.dtype == tf.float16
        class_probs, box_deltas = model.roi_heads.head(pooled)
        assert (class_probs.dtype, box_deltas.dtype) == (tf.float32, tf.float32)
        assert all(v.dtype == "float32" for v in model.trainable_variables)  # float32 master weights

        before = [v.numpy() for v in model.trainable_variables]
        history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=1, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        changed = any(not np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))
        skipped = float(model.optimizer.dynamic_scale.numpy()) < model.optimizer.initial_scale
        # Either the step was applied, or its float16 gradients overflowed and it was skipped at a lower scale.
        assert changed != skipped
        assert int(model.optimizer.iterations.numpy()) == int(changed)
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ------------------------------------------------------------------------------------ MirroredStrategy (child)


def test_mirrored_xla_step_on_a_split_batch_equals_the_single_device_step(mirrored):
    assert mirrored["replicas"] == 2
    assert mirrored["mirrored_jit_compile"] == MIRRORED_JIT  # XLA as the worker asked for
    assert mirrored["per_replica_images"] == [1, 1]  # fit gives each replica its half of the global batch
    assert mirrored["replica_images_are_the_two_images"]
    for step in (1, 2):
        single, dist = mirrored[f"single_losses_{step}"], mirrored[f"mirrored_losses_{step}"]
        assert set(single) == {"loss", "rpn_cls", "rpn_box", "roi_cls", "roi_box"}
        for name, value in single.items():
            assert dist[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, name, single, dist)
    # Same update: a missing (or double) division by the number of replicas would be a 100% difference.
    assert mirrored["update_size_1"] > 1e-4
    assert mirrored["weights_rel_diff_1"] < 1e-3
    assert mirrored["weights_rel_diff_2"] < 1e-3


def test_checkpoints_move_between_mirrored_and_single_device_training(mirrored):
    assert mirrored["restored_exactly"]  # model and optimizer state restored inside strategy.scope()
    assert mirrored["iterations_after_restore"] == [1, 1]
    assert mirrored["iterations_2"] == [2, 2]


def test_evaluation_under_a_mirrored_strategy_predicts_each_image_once(mirrored):
    # Keras' own predict_on_batch would give 4 rows (the batch once per replica); in and out of strategy.scope().
    assert mirrored["predict_rows"] == [2, 2, 2]
    assert mirrored["predict_scores_max_diff"] < 1e-5


def test_replicas_agree_on_loss_scale_overflow_and_on_the_clipped_global_gradient(mirrored):
    # Replica 1's gradient overflows: the step is skipped everywhere and the loss scale halves.
    assert mirrored["overflow_kernel"] == [1.0, 1.0]
    assert mirrored["overflow_scale"] == 512.0
    # A finite step: the mean gradient over the global batch (rows [1, 2] and [3, 4]) times lr 0.1.
    assert mirrored["finite_kernel"] == pytest.approx([0.8, 0.7])
    assert mirrored["finite_scale"] == 1024.0
    # global_clipnorm clips the global gradient (2, 2) to norm 0.5, as on one device.
    assert mirrored["clip_single_kernel"] == pytest.approx([1 - 0.5 / np.sqrt(2)] * 2)
    assert mirrored["clip_mirrored_kernel"] == pytest.approx(mirrored["clip_single_kernel"])


# --------------------------------------------------------------------------- MultiWorkerMirroredStrategy (children)


def _free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _h5_arrays(path):
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_two_workers_resume_train_in_bfloat16_and_end_with_identical_weights(mirrored, children, tmp_path):
    from frcnn import data as data_lib
    from frcnn.config import load_config

    shapes_root = tmp_path / "shapes"
    overrides = list(MIRRORED_OVERRIDES) + [
        f"data.root={shapes_root}", "data.val_split=val", "train.val_every=0", "train.val_max_images=2",
        "train.epochs=1", "train.steps_per_epoch=3", "train.checkpoint_every=0",
        "train.mixed_precision=mixed_bfloat16",
    ]
    cfg = load_config("test.yaml", overrides)
    for split in ("train", "val"):  # generate the data once, before the workers read it
        data_lib.load_records(cfg, split)

    # Both work directories hold the mirrored run's step-1 checkpoint (hard links: the chief replaces its file by
    # renaming a new one over it, so the non-chief's link keeps pointing at the original).
    workdirs = [tmp_path / "worker0", tmp_path / "worker1"]
    state = {"epoch": 0, "global_step": 1, "best": None, "monitor": "val_AP", "steps_per_epoch": 3}
    for workdir in workdirs:
        (workdir / "checkpoints").mkdir(parents=True)
        target = workdir / "checkpoints" / "last.weights.h5"
        try:
            os.link(mirrored["checkpoint"], target)
        except OSError:
            shutil.copy(mirrored["checkpoint"], target)
        (workdir / "checkpoints" / "state.json").write_text(json.dumps(state))
    non_chief_before = {p: os.stat(p) for p in map(str, workdirs[1].rglob("*")) if os.path.isfile(p)}

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    deadline = time.monotonic() + WORKERS_TIMEOUT
    procs = []
    for index, workdir in enumerate(workdirs):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        args = [WORKER, "worker", str(workdir), str(tmp_path / f"weights{index}.weights.h5"),
                str(tmp_path / f"result{index}.json")] + overrides
        procs.append(children.start(args, str(tmp_path / f"log{index}.txt"), _child_env(TF_CONFIG=tf_config)))
    codes = [children.wait(proc, deadline) for proc in procs]
    logs = "\n".join(f"--- worker {i}:\n{children.tail(tmp_path / f'log{i}.txt')}" for i in range(2))
    assert None not in codes, f"the workers did not finish in {WORKERS_TIMEOUT} s:\n{logs}"
    assert codes == [0, 0], f"exit codes {codes}:\n{logs}"

    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    assert [r["chief"] for r in results] == [True, False]
    for r in results:
        assert r["replicas"] == 2
        assert r["iterations"] == 3  # resumed at step 1, trained steps 2 and 3
        assert r["policy"] == "mixed_bfloat16"
        assert np.isfinite(r["loss"]).all()
    assert results[0]["loss"] == results[1]["loss"]  # logged losses are averaged over the workers
    # Evaluation: on the chief only, on one device (FasterRCNN.predict_on_batch's local function).
    assert results[0]["metrics"] == {"num_images": 2} and results[1]["metrics"] is None
    assert results[0]["local_predict"] and not results[1]["local_predict"]

    w0, w1 = _h5_arrays(tmp_path / "weights0.weights.h5"), _h5_arrays(tmp_path / "weights1.weights.h5")
    assert w0.keys() == w1.keys() and len(w0) > 100
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    start = _h5_arrays(mirrored["checkpoint"])
    assert any(not np.array_equal(start[k], w0[k]) for k in w0 if k in start)  # and they trained

    # Only the chief wrote: its checkpoint moved on, the non-chief's directory is exactly as it was.
    chief_state = json.loads((workdirs[0] / "checkpoints" / "state.json").read_text())
    assert (chief_state["global_step"], chief_state["epoch"]) == (3, 1)
    assert (workdirs[0] / "config.yaml").is_file() and (workdirs[0] / "val_metrics.json").is_file()
    non_chief_after = {p: os.stat(p) for p in map(str, workdirs[1].rglob("*")) if os.path.isfile(p)}
    assert non_chief_after.keys() == non_chief_before.keys()
    for path, before in non_chief_before.items():
        after = non_chief_after[path]
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
