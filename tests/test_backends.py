"""One detector on every Keras backend: the same weights give the same losses and detections on TensorFlow and JAX
(and PyTorch when it is installed), RoIAlign and NMS match the NumPy references there, and ``fit`` trains.

Keras picks its backend when it is imported, so each backend runs tests/backend_worker.py in its own process.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

WORKER = os.path.join(ROOT, "tests", "backend_worker.py")
BACKENDS = [name for name, module in (("jax", "jax"), ("torch", "torch")) if importlib.util.find_spec(module)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Weights, a batch and images made on TensorFlow, and the TensorFlow worker's results."""
    import keras

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import backend_worker

    from frcnn import build_model, load_config

    path = tmp_path_factory.mktemp("backends")
    cfg = load_config("test.yaml", backend_worker.OVERRIDES)
    keras.utils.set_random_seed(3)
    model = build_model(cfg, load_weights=False)
    model.save_weights(str(path / "model.weights.h5"))
    rng = np.random.default_rng(0)
    gt = np.zeros((2, cfg.input.max_gt, 4), np.float32)
    gt[0, :2] = [[10, 12, 60, 50], [70, 30, 120, 110]]
    gt[1, :1] = [[20, 40, 90, 100]]
    valid = np.zeros((2, cfg.input.max_gt), bool)
    valid[0, :2] = True
    valid[1, :1] = True
    classes = np.zeros((2, cfg.input.max_gt), np.int32)
    classes[0, :2] = [1, 3]
    classes[1, :1] = [2]
    np.savez(path / "batch.npz", images=rng.uniform(0, 255, (2, 128, 128, 3)).astype(np.float32),
             image_sizes=np.array([[128, 128], [112, 128]], np.int32), gt_boxes=gt, gt_classes=classes,
             gt_valid=valid)
    np.savez(path / "images.npz", a=rng.integers(0, 255, (90, 170, 3), dtype=np.uint8),
             b=rng.integers(0, 255, (128, 100, 3), dtype=np.uint8))
    run_worker(path, "tensorflow")
    return path


def run_worker(path, backend):
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, WORKER, str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(path / f"result_{backend}.json") as f:
        return json.load(f)


def check_one(result):
    assert result["roi_align"] < 1e-4
    assert result["nms"]
    assert result["custom_gradients"] < 1e-3
    fit = result["fit"]
    assert all(np.isfinite(fit["loss"])) and fit["moved"] > 0


def test_tensorflow_worker(workdir):
    with open(workdir / "result_tensorflow.json") as f:
        check_one(json.load(f))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_tensorflow(workdir, backend):
    with open(workdir / "result_tensorflow.json") as f:
        tf_result = json.load(f)
    result = run_worker(workdir, backend)
    assert result["backend"] == backend
    check_one(result)
    for name, value in tf_result["losses"].items():
        assert result["losses"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert len(result["detections"]) == len(tf_result["detections"])
    for ours, theirs in zip(result["detections"], tf_result["detections"]):
        assert len(ours["scores"]) == len(theirs["scores"]) > 0
        np.testing.assert_allclose(ours["scores"], theirs["scores"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-3)
        assert ours["classes"] == theirs["classes"]
