"""The benchmark package (benchmarks/): its pieces on hand-made inputs, and one end-to-end run at a tiny size.

Nothing here asserts a timing: the benchmark prints figures, it does not judge them.
"""

import json
import math

import keras
import pytest

from benchmarks import benchmark, flops, machine, measure, report, workload

CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 amx_tile amx_bf16
bogomips\t: 5199.99

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 amx_tile amx_bf16
"""
AVX2_ONLY = "processor : 0\nmodel name : Old CPU\nflags : fpu sse2 avx2 fma\n"


def test_cpuinfo_parser_reads_model_count_and_bfloat16_flags():
    cpu = machine.parse_cpuinfo(CPUINFO)
    assert cpu["model"] == "AMD EPYC 9R14 96-Core Processor"
    assert cpu["logical_cpus"] == 2
    assert cpu["flags"] == {"avx512f": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}
    assert machine.default_precisions(cpu, gpus=[]) == ["float32", "mixed_bfloat16"]

    old = machine.parse_cpuinfo(AVX2_ONLY)
    assert old["flags"] == dict.fromkeys(machine.FEATURE_FLAGS, False) and old["model"] == "Old CPU"
    assert machine.default_precisions(old, gpus=[]) == ["float32"]  # bfloat16 would be emulated: not by default
    assert machine.default_precisions(old, gpus=["H200"]) == ["float32", "mixed_bfloat16", "mixed_float16"]
    assert machine.parse_cpuinfo("")["model"] == "unknown"


def test_flop_counter_matches_a_hand_count_for_conv_and_dense():
    inputs = keras.Input((10, 12, 4))
    frozen = keras.layers.Conv2D(8, 3, padding="same", name="frozen")
    frozen.trainable = False
    x = frozen(inputs)  # 10 x 12 x 8, 3x3x4 kernel
    x = keras.layers.Conv2D(6, 1, strides=2, name="strided")(x)  # 5 x 6 x 6, 1x1x8 kernel
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="dense")(x)  # 6 -> 5
    costs = flops.functional_costs(keras.Model(inputs, outputs), (1, 10, 12, 4))
    conv1, conv2, dense = 10 * 12 * 8 * (3 * 3 * 4), 5 * 6 * 6 * (1 * 1 * 8), 6 * 5
    assert costs == [(conv1, False), (conv2, True), (dense, True)]
    # Backward: nothing for the frozen first layer; the second has a weight gradient only (nothing trains before
    # it); the Dense layer both gradients.
    assert flops.backward_macs(costs, False) == (conv2 + 2 * dense, True)
    assert flops.backward_macs(costs, True) == (conv1 + 2 * conv2 + 2 * dense, True)
    # RoIAlign: contract the longer side (W = 6) first, then the shorter (H = 4): N P C H (W + P).
    assert flops.roi_align_macs(3, 2, 4, 6, 5) == 3 * 2 * 5 * 4 * 6 + 3 * 2 * 2 * 5 * 4


def test_interleaved_rounds_rotate_the_order_and_take_medians():
    order = []
    tasks = {name: (lambda name=name: order.append(name)) for name in "abc"}

    class FakeMemory:
        peaks = iter([{"rss_mb": v, "device_mb": None} for v in (5, 1, 2, 7, 3, 4)])

        def reset(self):
            pass

        def peak(self):
            return next(self.peaks)

    out = measure.interleaved(tasks, warmup=1, repeats=2, memory=FakeMemory())
    assert order == list("abc") + list("bca") + list("cab")  # warm-up in the given order, then rotated rounds
    for name in "abc":
        assert len(out[name]["warmup"]) == 1 and len(out[name]["runs"]) == 2
        assert out[name]["median"] == pytest.approx(sum(out[name]["runs"]) / 2)
    # Peaks are the maximum over a task's timed runs: the first timed round ran b, c, a; the second c, a, b.
    assert {n: out[n]["peak"]["rss_mb"] for n in "abc"} == {"a": 3, "b": 5, "c": 7}


def test_variant_changes_only_the_two_config_switches():
    cfg = workload.base_config("test.yaml", [], workload.Sizes(64, 96, 8, 4, 2))
    assert (cfg.input.min_size, cfg.input.max_size, cfg.rpn.post_nms_topk_test) == (64, 96, 8)
    assert (cfg.roi_heads.num_rois, cfg.train.batch_size, cfg.model.backbone_weights) == (4, 2, "none")
    bf16 = workload.variant_config(cfg, workload.Variant("mixed_bfloat16", True))
    assert (bf16.train.mixed_precision, bf16.train.jit_compile) == ("mixed_bfloat16", True)
    assert workload.variant_config(cfg, workload.Variant("float32", False)).train.mixed_precision == "off"
    assert bf16.replace(train=cfg.train) == cfg


def test_speed_paths_are_variants_and_inference_is_timed_once_where_it_cannot_differ():
    args = benchmark.parse_args(["--precisions", "float32,mixed_bfloat16", "--speed-paths", "off,on", "--xla", "on"])
    assert args.speed_paths == ["off", "on"]
    info = {"backend": "jax", "cpu": machine.parse_cpuinfo(AVX2_ONLY), "gpus": []}
    frozen = workload.base_config("voc.yaml", [], workload.Sizes())
    notes = []
    variants = benchmark.choose_variants(args, frozen, info, notes)
    assert [(v.precision, v.speed_paths, v.infer) for v in variants] == [
        ("float32", "off", True), ("mixed_bfloat16", "off", True),
        ("float32", "on", False), ("mixed_bfloat16", "on", False)]
    assert variants[2].name == "float32 +xla sp:on" and any("speed_paths=off only" in n for n in notes)
    assert workload.variant_config(frozen, variants[2]).train.speed_paths == "on"
    # GroupNorm's written gradient changes its forward pass too: inference is timed for every setting.
    group = workload.base_config("voc.yaml", ["model.norm=group"], workload.Sizes())
    assert all(v.infer for v in benchmark.choose_variants(args, group, info, []))
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--speed-paths", "fast"])


def _results():
    split = {stage: 0.1 for stage in workload.STAGES}
    return {
        "machine": {"cpu": machine.parse_cpuinfo(CPUINFO), "usable_cores": 2, "backend": "tensorflow", "gpus": [],
                    "versions": {"keras": "3"}, "load_average_start": 1.0},
        "settings": {"config": "voc.yaml", "overrides": [], "min_size": 600, "max_size": 1000, "proposals": 300,
                     "rois": 128, "batch": 1, "padded": [608, 1024], "warmup": 1, "repeats": 3,
                     "matmul_size": 2048},
        "flops": {"inference": {"trunk": 2e9, "rpn_head": 1e9, "roi_align": 1e9, "roi_head": 6e9, "total": 10e9},
                  "train": {"forward": 5e9, "backward": 10e9, "total": 15e9}, "feature_shape": [38, 64, 1024],
                  "train_stages": {"trunk": 3e9, "rpn_head": 2e9, "roi_align": 1e9, "roi_head": 8e9}},
        "variants": [
            {"name": "float32", "status": None, "infer_s": 2.0, "infer_gflops": 5.0, "train_s": 3.0,
             "train_gflops": 5.0, "matmul_gflops": 50.0, "infer_vs_matmul": 0.1, "train_vs_matmul": 0.1,
             "peak_infer_mb": 3100.0, "peak_train_mb": 3300.0, "split": split,
             "train_split": {stage: 0.5 for stage in workload.TRAIN_STAGES}},
            {"name": "mixed_float16", "status": "n/a (ValueError: no kernel)"},
        ],
        "memory_note": "memory: peak RSS", "notes": ["a note"], "load_average_end": 2.0, "wall_s": 12.0,
    }


def test_report_prints_header_table_split_and_notes():
    text = report.render(_results())
    lines = text.splitlines()
    assert lines[0].startswith("CPU: AMD EPYC 9R14") and "avx512_bf16 yes" in lines[0] and "amx_tile yes" in lines[0]
    header = next(line for line in lines if line.startswith("| variant"))
    assert [c.strip() for c in header.strip("|").split("|")] == [h for _, h in report.COLUMNS]
    row = next(line for line in lines if line.startswith("| float32 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["2", "5", "3"] and cells[6] == "10%" and cells[8] == "3,100"
    assert any(line.startswith("| mixed_float16 ") and "n/a (ValueError: no kernel)" in line for line in lines)
    assert "inference 10.0 G per batch" in text and "train step 15.0 G (forward 5.0, backward 10.0)" in text
    inference_part = text.split("Inference by stage")[1].split("Training step by stage")[0].splitlines()
    stage_rows = [line for line in inference_part
                  if line.split("|")[1:2] and line.split("|")[1].strip() in workload.STAGES]
    assert len(stage_rows) == len(workload.STAGES)
    assert "| roi_head " in text and "60" in next(line for line in stage_rows if "roi_head" in line)  # 6 G / 0.1 s
    train_rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
                  for line in text.split("Training step by stage")[1].splitlines() if line.startswith("| ")}
    assert train_rows["roi_head"][1:4] == ["8", "0.5", "16"]  # 8 GFLOP in 0.5 s
    assert train_rows["rest of the step (by difference)"][2] == "1"  # 3 s step - 4 x 0.5 s
    assert "note: a note" in text and lines[-1] == "wall time 12 s"
    assert report.fmt(None) == "-" and report.fmt(1234.5) == "1,234" and report.fmt(0.012345) == "0.0123"


def test_tiny_end_to_end_run_fills_every_field(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    results = benchmark.main(["--config", "test.yaml", "--min-size", "64", "--max-size", "64", "--proposals", "8",
                              "--rois", "4", "--precisions", "float32", "--repeats", "1", "--matmul-size", "128",
                              "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert "CPU: " in printed and "| variant" in printed and "Inference by stage" in printed

    (row,) = results["variants"]
    assert row["name"] == "float32" and row["status"] is None
    for key in ("infer_s", "infer_gflops", "train_s", "train_gflops", "matmul_gflops", "infer_vs_matmul",
                "train_vs_matmul", "peak_infer_mb", "peak_train_mb"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert set(row["split"]) == set(workload.STAGES) and all(v > 0 for v in row["split"].values())
    assert set(row["train_split"]) == set(workload.TRAIN_STAGES) and all(v > 0 for v in row["train_split"].values())
    assert "Training step by stage" in printed
    f = results["flops"]
    assert f["inference"]["total"] == sum(v for k, v in f["inference"].items() if k != "total")
    assert f["train"]["backward"] > f["train"]["forward"] > 0
    assert sum(f["train_stages"].values()) == f["train"]["total"]
    assert results["settings"]["padded"] == [64, 64]
    assert set(results["machine"]["cpu"]["flags"]) == set(machine.FEATURE_FLAGS)
    assert json.loads(out_json.read_text())["variants"][0]["name"] == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # nothing leaks into later tests


def test_a_failed_variant_is_reported_by_the_line_that_names_the_error():
    err = ValueError("in user code:\n\n    File \"x.py\", line 3, in call\n    ValueError: bad shape (1,)\n  more")
    assert benchmark.short_reason(err) == "ValueError: ValueError: bad shape (1,)"
    assert benchmark.short_reason(RuntimeError("plain")) == "RuntimeError: plain"
