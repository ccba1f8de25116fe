"""benchmarks/benchmark.py: its --quick logic run in this process on tiny sizes. A smoke test, not a timing test."""

import importlib.util
import json
import math
import os

import keras

from conftest import RACCOON_ROOT, ROOT

TINY = ["--quick", "--no-isolate", "--variants", "fp32", "--min-size", "64", "--max-size", "96", "--rois", "16",
        "--train-rois", "8", "--repeats", "1", "--budget", "0", "--matmul-size", "256", "--pipeline-batches", "3"]
NUMERIC = ("infer_s", "gflop", "gflop_profiler", "gflops", "matmul_gflops", "matmul_ratio", "train_s",
           "train_img_s", "peak_infer_mb", "peak_train_mb")


def load_benchmark():
    path = os.path.join(ROOT, "benchmarks", "benchmark.py")
    spec = importlib.util.spec_from_file_location("frcnn_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_one_table_with_positive_figures(tmp_path, capsys):
    bench = load_benchmark()
    data_root = os.environ.get("FRCNN_RACCOON", RACCOON_ROOT)
    out_json = tmp_path / "bench.json"
    results = bench.main(TINY + ["--data-root", data_root, "--json", str(out_json)])
    printed = capsys.readouterr().out

    header = next(line for line in printed.splitlines() if line.startswith("| variant"))
    assert [c.strip() for c in header.strip("|").split("|")] == [h for _, h in bench.COLUMNS]
    assert "TensorFlow" in printed and "CPU:" in printed  # device information at the top

    (row,) = results["table"]
    assert row["variant"] == "fp32" and not row["status"]
    for key in NUMERIC:
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    # The analytic count (conv + dense layer shapes) and TensorFlow's profiler agree to within 1 %.
    assert abs(row["gflop"] - row["gflop_profiler"]) <= 0.01 * row["gflop"]
    if os.path.isdir(os.path.join(data_root, "Annotations")):
        assert isinstance(row["input_img_s"], float) and row["input_img_s"] > 0
    assert set(results["split"]) >= {"trunk", "rpn_head", "proposals", "roi_align", "roi_head", "detections"}

    saved = json.loads(out_json.read_text())
    assert saved["table"][0]["variant"] == "fp32"
    assert keras.mixed_precision.global_policy().name == "float32"  # nothing leaks into later tests


def test_table_shows_a_variant_that_cannot_run():
    bench = load_benchmark()
    rows = [
        {"variant": "fp32", "policy": "float32", "status": None, "infer_s": 1.5, "train_s": 3.0},
        {"variant": "mixed", "policy": "mixed_bfloat16", "status": "n/a (op CropAndResize has no bfloat16 kernel)"},
    ]
    text = bench.render_table(rows)
    assert "| mixed " in text and "n/a (op CropAndResize has no bfloat16 kernel)" in text
    assert len(text.splitlines()) == 4  # header, rule, two rows
