"""The GPU check (benchmarks/gpu_check.sh): its CPU dry run end to end, and its pieces on hand-made inputs.

The dry run is the script the GPU machine runs, at tiny sizes on the CPU: the JAX benchmark (speed paths off and on),
the PyTorch benchmark and the torchvision reference where torch is installed (skipped and said so where not), a
2-step shapes training, and the backend tests collected (not run: they have their own test files). Nothing here
asserts a timing.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from conftest import ROOT

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "torchvision"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("the GPU check runs its training and benchmark on JAX")
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("KERAS_BACKEND", None)  # each section names its own
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        return out, json.load(f), proc.stdout


def test_dry_run_runs_every_section(dry_run):
    out, results, printed = dry_run
    sections = results["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    expected_torch = "ok" if HAS_TORCH else "skipped: "
    for name, section in sections.items():
        want = expected_torch if name in ("bench_torch", "torchvision") else "ok"
        assert section["status"].startswith(want), (name, section)
    # What comes back from the GPU machine's $OUT: at most 8 files.
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "sections.log"]
    assert results["environment"]["keras"] and results["environment"]["jax"]
    assert "gpu_check.sh:" in printed and "| section | status | seconds |" in printed


def test_dry_run_benchmarks_both_speed_paths(dry_run):
    _, results, _ = dry_run
    backends = ["jax"] + (["torch"] if HAS_TORCH else [])
    for backend in backends:
        variants = results[f"bench_{backend}"]["variants"]
        assert [(v["precision"], v["speed_paths"]) for v in variants] == [("float32", "off"), ("float32", "on")]
        off, on = variants
        assert off["infer_s"] > 0 and on["infer_s"] is None  # frozen norms: inference is the same program
        assert all(v["train_s"] > 0 and math.isfinite(v["train_s"]) for v in variants)
    if HAS_TORCH:
        tv = results["torchvision"]
        assert [v["precision"] for v in tv["variants"]] == ["float32", "bfloat16"]
        assert all(v["infer_s"] > 0 and v["train_s"] > 0 and v["folded_norms"] > 0 for v in tv["variants"])
        assert results["torchvision"]["settings"]["min_size"] == results["bench_jax"]["settings"]["min_size"]


def test_dry_run_trains_shapes_and_collects_the_tests(dry_run):
    out, results, _ = dry_run
    shapes = results["shapes"]
    assert shapes["completed"] and shapes["steps"] == 2 and shapes["backend"] == "jax"
    assert shapes["config"] == "shapes.yaml" and -1 <= shapes["AP"] <= 1 and -1 <= shapes["AP50"] <= 1
    assert shapes["train_s"] > 0 and shapes["generate_s"] >= 0
    summary = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in summary and "Shapes training (shapes.yaml, 2 steps" in summary
    assert "| frcnn, jax | float32 | off |" in summary and "Speed paths, training step on / off" in summary
    assert "===== shapes =====" in (out / "sections.log").read_text()


def test_junit_summary_counts_outcomes(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_backends" name="test_reference_worker" time="12.5"/>'
        '<testcase classname="tests.test_backends" name="test_backend_matches_reference[torch]" time="3">'
        '<failure message="assert 1.0 == 2.0">long text</failure></testcase>'
        '<testcase classname="tests.test_backend_tools" name="test_tools[jax]" time="0">'
        '<skipped message="jax is not installed"/></testcase>'
        '</testsuite></testsuites>')
    got = gpu_check.junit_summary(str(xml))
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (1, 1, 1, 0)
    assert got["cases"][1] == {"name": "tests.test_backends.test_backend_matches_reference[torch]",
                               "outcome": "failed", "seconds": 3.0, "message": "assert 1.0 == 2.0"}
    assert gpu_check.junit_summary(str(tmp_path / "missing.xml")) is None


def test_summary_gives_ratios_to_torchvision_and_the_speed_paths_ratio():
    settings = {"config": "voc.yaml", "min_size": 600, "max_size": 1000, "padded": [608, 1024], "batch": 1,
                "proposals": 300, "rois": 128, "warmup": 2, "repeats": 5}

    def variant(precision, sp, infer, train):
        return {"precision": precision, "speed_paths": sp, "infer_s": infer, "train_s": train, "status": None,
                "peak_device_train_mb": 5000.0}

    results = {
        "started": "2026-12-07T10:00:00", "dry_run": False, "budget_s": 450, "wall_s": 400.0,
        "environment": {"nvidia_smi": "NVIDIA H100 80GB HBM3, 81559 MiB", "python": "3.12.3", "keras": "3.15.1"},
        "bench_jax": {"settings": settings, "notes": ["a note"], "variants": [
            variant("float32", "off", 0.05, 0.2), variant("float32", "on", None, 0.25),
            variant("mixed_bfloat16", "off", 0.03, 0.1), variant("mixed_bfloat16", "on", None, 0.08)]},
        "torchvision": {"machine": {"tf32": {"matmul": False, "cudnn": True}}, "notes": [], "variants": [
            {"precision": "float32", "infer_s": 0.025, "train_s": 0.1, "peak_device_train_mb": 3000.0},
            {"precision": "bfloat16", "infer_s": 0.02, "train_s": 0.05, "peak_device_train_mb": 2000.0}]},
        "shapes": {"completed": True, "AP": 0.61, "AP50": 0.92, "config": "shapes.yaml", "steps": 2000,
                   "batch_size": 2, "num_rois": 32, "mixed_precision": "auto", "backend": "jax", "device": "H100",
                   "train_s": 150.0, "generate_s": 20.0},
        "tests": {"passed": 3, "failed": 1, "skipped": 0, "errors": 0, "cases": [
            {"name": "t.test_x", "outcome": "failed", "seconds": 5.0, "message": "boom"}]},
        "sections": {"environment": {"status": "ok", "seconds": 3.0}},
    }
    text = gpu_check.summary(results)
    assert "| frcnn, jax | float32 | off | 0.05 | 0.2 | 2.00x | 2.00x | 5000 |" in text
    assert "| frcnn, jax | mixed_bfloat16 | on | - | 0.08 | - | 1.60x | 5000 |" in text
    assert "| torchvision parts | bfloat16 | - | 0.02 | 0.05 | 1x | 1x | 2000 |" in text
    assert "jax float32 1.250; jax mixed_bfloat16 0.800" in text
    assert "AP **0.6100**, AP50 **0.9200**" in text and "**150.0 s**" in text
    assert "3 passed, 1 failed" in text and "- failed: t.test_x (5 s): boom" in text
    assert "- bench_jax: a note" in text and "| environment | ok | 3.0 |" in text


def test_command_line_refuses_unknown_sections():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "bench_jax,nonsense"])
    args = gpu_check.parse_args(["--sections", "shapes,tests", "--shapes-steps", "1000", "--out", "x"])
    assert args.sections == ["shapes", "tests"] and args.shapes_steps == 1000 and not args.dry_run
    status = lambda *s: {"sections": {str(i): {"status": v} for i, v in enumerate(s)}}  # noqa: E731
    assert gpu_check.exit_code(status("ok", "skipped: torch is not installed")) == 0
    assert gpu_check.exit_code(status("ok", "timed out after 30 s")) == 1
    assert gpu_check.exit_code(status("failed (exit code 2)")) == 1
