"""JAX across devices: training under ``keras.distribution.DataParallel`` gives the losses and weights of training
on one device on the same global batch.

The training itself runs in tests/jax_distribution_worker.py, in a subprocess: JAX reads ``XLA_FLAGS`` (here: two
CPU devices) when it is imported, and Keras picks its backend at import. Both runs there use
``--xla_backend_optimization_level=0``, which only makes XLA compile faster (the two compilations are most of the
test's time).

Several processes (``keras.distribution.initialize``, i.e. ``jax.distributed.initialize``, two processes on
localhost with one CPU device each) are tested when ``FRCNN_TEST_MULTIPROCESS=1``: too slow for the suite on a
2-core CPU (docs/NOTES.md, session 8).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "jax_distribution_worker.py")
LOSSES = ("loss", "rpn_cls", "rpn_box", "roi_cls", "roi_box")
# Observed on the development CPU: losses within 3e-7 of each other, weights within 2e-7 (float32 sums added in
# another order across devices); the largest weight change over the two steps is about 2e-2.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _env(devices):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("XLA_", "JAX_"))}
    flags = ["--xla_backend_optimization_level=0"]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(KERAS_BACKEND="jax", XLA_FLAGS=" ".join(flags), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return env


def _read(path, proc_output):
    assert os.path.isfile(path), proc_output[-5000:]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The worker's one-process run: one device, then DataParallel over two CPU devices."""
    out = tmp_path_factory.mktemp("jax_dp") / "result.json"
    done = subprocess.run([sys.executable, WORKER, str(out)], env=_env(2), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return _read(out, done.stdout + done.stderr)


def _assert_same_losses(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for name in LOSSES:
            assert g[name] == pytest.approx(w[name], rel=LOSS_RTOL), (step, name)


def test_data_parallel_training_equals_one_device(one_process):
    single, parallel = one_process["single"], one_process["data_parallel"]
    assert one_process["devices"] == 2
    assert single["devices"] == 1 and parallel["devices"] == 2  # the variables live on both devices
    assert one_process["same_initial_weights"]
    _assert_same_losses(parallel["losses"], single["losses"])
    # The steps moved the weights, and both runs moved them alike.
    assert one_process["max_update"] > 1e-3
    assert one_process["max_weight_difference"] < WEIGHT_ATOL, one_process["max_weight_difference"]


@pytest.mark.skipif(os.environ.get("FRCNN_TEST_MULTIPROCESS") != "1",
                    reason="two JAX processes take minutes on a 2-core CPU; set FRCNN_TEST_MULTIPROCESS=1")
def test_two_processes_train_like_one_device(one_process, tmp_path):
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs, outputs = [], []
    for rank in range(2):
        out = tmp_path / f"process{rank}.json"
        log = open(tmp_path / f"process{rank}.log", "w+")
        procs.append((subprocess.Popen([sys.executable, WORKER, str(out), "--process", str(rank), "--processes", "2",
                                        "--coordinator", f"localhost:{port}"], env=_env(1), cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT), out, log))
    try:
        for proc, out, log in procs:
            proc.wait(timeout=900)
            log.seek(0)
            text = log.read()
            assert proc.returncode == 0, text[-5000:]
            outputs.append(_read(out, text))
    finally:
        for proc, _, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    single = one_process["single"]
    for result in outputs:
        assert result["devices"] == 2 and result["local_devices"] == 1
        assert result["data_parallel"]["devices"] == 2
        _assert_same_losses(result["data_parallel"]["losses"], single["losses"])
    # Every process holds the same trained weights, those of one device.
    for (s0, q0), (s1, q1), (s, q) in zip(outputs[0]["data_parallel"]["digest"], outputs[1]["data_parallel"]["digest"],
                                          single["digest"]):
        assert (s0, q0) == (s1, q1)
        assert s0 == pytest.approx(s, rel=1e-4, abs=1e-3) and q0 == pytest.approx(q, rel=1e-4)
