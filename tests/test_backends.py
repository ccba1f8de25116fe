"""One detector on every Keras backend: the same weights give the same losses and detections on every installed
backend, RoIAlign and NMS match the NumPy references there, and ``fit`` trains.

The reference is TensorFlow where it is installed (JAX and PyTorch, where installed, are compared with it); where
it is not (the lent GPU machine), JAX is the reference and PyTorch is compared with it. Keras picks its backend when
it is imported, so each backend runs tests/backend_worker.py in its own process; the reference's run makes the
weights. The workers compute on the CPU unless ``FRCNN_TEST_DEVICE=gpu`` (benchmarks/gpu_check.sh), which lets them
use the GPU and checks that they did.
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
REFERENCE = next((name for name in ("tensorflow", "jax") if importlib.util.find_spec(name)), None)
BACKENDS = [name for name in ("jax", "torch") if name != REFERENCE and importlib.util.find_spec(name)]
ON_GPU = os.environ.get("FRCNN_TEST_DEVICE") == "gpu"


def worker_env(backend):
    """The worker's environment: on the CPU (every GPU hidden) unless ``FRCNN_TEST_DEVICE=gpu``."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    if not ON_GPU:
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A batch and images, and the reference worker's results (it writes the weights the others load)."""
    if REFERENCE is None:
        pytest.skip("neither TensorFlow nor JAX is installed")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import backend_worker

    from frcnn import load_config

    path = tmp_path_factory.mktemp("backends")
    cfg = load_config("test.yaml", backend_worker.OVERRIDES)
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
    run_worker(path, REFERENCE, make_weights=True)
    return path


def run_worker(path, backend, make_weights=False):
    command = [sys.executable, WORKER, str(path)] + (["--make-weights"] if make_weights else [])
    done = subprocess.run(command, env=worker_env(backend), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(path / f"result_{backend}.json") as f:
        result = json.load(f)
    assert result["backend"] == backend
    # Where a GPU was asked for, the worker must have computed on it (not fallen back to the CPU unnoticed).
    assert (result["device"] != "cpu") == ON_GPU, result["device"]
    return result


def check_one(result):
    assert result["roi_align"] < 1e-4
    assert result["nms"]
    assert result["custom_gradients"] < 1e-3
    fit = result["fit"]
    assert all(np.isfinite(fit["loss"])) and fit["moved"] > 0


def test_reference_worker(workdir):
    with open(workdir / f"result_{REFERENCE}.json") as f:
        check_one(json.load(f))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(workdir, backend):
    with open(workdir / f"result_{REFERENCE}.json") as f:
        reference = json.load(f)
    result = run_worker(workdir, backend)
    check_one(result)
    for name, value in reference["losses"].items():
        assert result["losses"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert len(result["detections"]) == len(reference["detections"])
    for ours, theirs in zip(result["detections"], reference["detections"]):
        assert len(ours["scores"]) == len(theirs["scores"]) > 0
        np.testing.assert_allclose(ours["scores"], theirs["scores"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-3)
        assert ours["classes"] == theirs["classes"]
