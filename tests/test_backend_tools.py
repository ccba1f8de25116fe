"""The tools end to end on the backends other than TensorFlow, where TensorFlow is not installed (a subprocess in
which ``import tensorflow`` fails): train (validation, checkpoints, TensorBoard logs, progress bar), resume, infer,
evaluate, and the NaN guard. JAX runs in CI; PyTorch where ``torch`` is installed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_tools_run_end_to_end_without_tensorflow(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if os.environ.get("FRCNN_TEST_DEVICE") != "gpu":  # benchmarks/gpu_check.sh runs it on the GPU
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "backend_tools_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print(backend, {tool: result[tool].get("seconds") for tool in ("train", "resume", "infer", "evaluate")})
    assert result["backend"] == backend and result["tensorflow_loaded"] == []
    train = result["train"]
    assert train["code"] == 0 and train["validated"] and train["progress_bar"]
    assert train["state"]["global_step"] == 4 and train["state"]["epoch"] == 2
    assert {"config.yaml", "checkpoints", "logs", "val_metrics.json", "prediction.jpg"} <= set(train["files"])
    assert {"train", "validation", "images"} <= set(train["events"])  # TensorBoard, without TensorFlow
    resume = result["resume"]
    assert resume["code"] == 0 and resume["resumed"] and resume["state"]["global_step"] == 6
    assert result["infer"]["code"] == 0 and result["infer"]["images"] == 2 and min(result["infer"]["boxes"]) > 0
    assert result["evaluate"]["code"] == 0 and result["evaluate"]["num_images"] == 2
    assert result["nan_guard"] == {"stopped": True, "checkpoint_step": 8}
