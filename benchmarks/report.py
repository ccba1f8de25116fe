"""The report: figures per variant from the timings and FLOP counts, a printed text (header, main table, per-stage
table, notes) and the JSON file. Pure formatting: no Keras, no timing."""

import json

from benchmarks.workload import STAGES, TRAIN_STAGES

# (key, header) of the main table, in order.
COLUMNS = (
    ("name", "variant"),
    ("infer_s", "infer s/img"),
    ("infer_gflops", "infer GFLOP/s"),
    ("train_s", "train s/step"),
    ("train_gflops", "train GFLOP/s"),
    ("matmul_gflops", "matmul GFLOP/s"),
    ("infer_vs_matmul", "infer/matmul"),
    ("train_vs_matmul", "train/matmul"),
    ("peak_infer_mb", "peak RSS MB infer"),
    ("peak_train_mb", "peak RSS MB train"),
)


def summarize(variant, timings, flops, batch, matmul):
    """One variant's row from ``timings`` (``{task: measure.interleaved result}`` of its tasks), ``flops``
    (:func:`benchmarks.flops.count`), the batch size and its precision's matmul timing ``(result, flops)``."""
    infer, train = timings.get("infer"), timings.get("train")
    row = {"name": variant.name, "precision": variant.precision, "xla": variant.xla,
           "speed_paths": variant.speed_paths, "status": None}
    row["infer_s"] = infer["median"] / batch if infer else None
    row["train_s"] = train["median"] if train else None
    row["infer_gflops"] = _rate(flops["inference"]["total"], infer)
    row["train_gflops"] = _rate(flops["train"]["total"], train)
    row["matmul_gflops"] = _rate(matmul[1], matmul[0])
    row["infer_vs_matmul"] = _ratio(row["infer_gflops"], row["matmul_gflops"])
    row["train_vs_matmul"] = _ratio(row["train_gflops"], row["matmul_gflops"])
    row["peak_infer_mb"] = _peak(infer, "rss_mb")
    row["peak_train_mb"] = _peak(train, "rss_mb")
    row["peak_device_infer_mb"] = _peak(infer, "device_mb")
    row["peak_device_train_mb"] = _peak(train, "device_mb")
    row["split"] = {stage: timings[stage]["median"] for stage in STAGES if stage in timings} or None
    row["train_split"] = {stage: timings[f"train:{stage}"]["median"] for stage in TRAIN_STAGES
                          if f"train:{stage}" in timings} or None
    row["runs"] = {task: t["runs"] for task, t in timings.items()}
    row["first_call_s"] = {task: t["warmup"][0] for task, t in timings.items() if t["warmup"]}
    return row


def _rate(flop, timing):
    return flop / timing["median"] / 1e9 if timing and timing.get("median") else None


def _ratio(a, b):
    return a / b if a and b else None


def _peak(timing, key):
    return (timing.get("peak") or {}).get(key) if timing else None


def fmt(value):
    """Numbers to 3 significant figures (thousands separated), ``-`` for missing, strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(headers, rows):
    """A Markdown-style table of already formatted cells."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main_table(rows):
    cells = []
    for row in rows:
        if row.get("status"):
            cells.append([row["name"], row["status"]] + [""] * (len(COLUMNS) - 2))
            continue
        cells.append([f"{100 * row[k]:.0f}%" if k.endswith("_vs_matmul") and row.get(k) else fmt(row.get(k))
                      for k, _ in COLUMNS])
    return table([h for _, h in COLUMNS], cells)


def split_table(rows, flops, batch):
    """Per-stage seconds per image and GFLOP/s for every variant that has a split; ``None`` when none has."""
    rows = [r for r in rows if r.get("split")]
    if not rows:
        return None
    stage_flops = flops["inference"]
    headers = ["stage", "GFLOP/img"] + [h for r in rows for h in (f"{r['name']} s/img", "GFLOP/s")]
    cells = []
    for stage in STAGES:
        cell = [stage, fmt(stage_flops[stage] / 1e9 / batch) if stage in stage_flops else "-"]
        for r in rows:
            seconds = r["split"].get(stage)
            rate = stage_flops[stage] / seconds / 1e9 if seconds and stage in stage_flops else None
            cell += [fmt(seconds / batch if seconds else None), fmt(rate)]
        cells.append(cell)
    sums = ["sum of stages", fmt(stage_flops["total"] / 1e9 / batch)]
    whole = ["whole predict", ""]
    for r in rows:
        total = sum(r["split"].values())
        sums += [fmt(total / batch), fmt(stage_flops["total"] / total / 1e9)]
        whole += [fmt(r["infer_s"]), fmt(r["infer_gflops"])]
    return table(headers, cells + [sums, whole])


def train_split_table(rows, flops):
    """Per-stage seconds per training step (forward + backward of each part alone) and GFLOP/s for every variant
    that has a training split, with the rest of the step (targets, proposals, losses, update) by difference;
    ``None`` when none has."""
    rows = [r for r in rows if r.get("train_split")]
    if not rows:
        return None
    stage_flops = flops.get("train_stages", {})
    headers = ["stage", "GFLOP/step"] + [h for r in rows for h in (f"{r['name']} s/step", "GFLOP/s")]
    cells = []
    for stage in TRAIN_STAGES:
        cell = [stage, fmt(stage_flops[stage] / 1e9) if stage in stage_flops else "-"]
        for r in rows:
            seconds = r["train_split"].get(stage)
            rate = stage_flops[stage] / seconds / 1e9 if seconds and stage in stage_flops else None
            cell += [fmt(seconds), fmt(rate)]
        cells.append(cell)
    rest, whole = ["rest of the step (by difference)", ""], ["whole train step", fmt(flops["train"]["total"] / 1e9)]
    for r in rows:
        parts = sum(r["train_split"].values())
        rest += [fmt(r["train_s"] - parts if r.get("train_s") else None), ""]
        whole += [fmt(r.get("train_s")), fmt(r.get("train_gflops"))]
    return table(headers, cells + [rest, whole])


def render(results):
    m, s, flops = results["machine"], results["settings"], results.get("flops")
    cpu = m["cpu"]
    features = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in cpu["flags"].items())
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = m.get("load_average_start")
    out = [
        f"CPU: {cpu['model']}; {m['usable_cores']} usable cores ({cpu['logical_cpus']} logical CPUs listed); "
        f"{features}",
        f"GPU: {', '.join(m['gpus']) or 'none'}; Keras backend {m['backend']} ({versions})",
        f"config {s['config']}{' ' + ' '.join(s['overrides']) if s['overrides'] else ''}, random weights; "
        f"images {s['min_size']}x{s['max_size']} (padded {s['padded'][0]}x{s['padded'][1]}), batch {s['batch']}; "
        f"{s['proposals']} test proposals, {s['rois']} training ROIs per image",
        f"{s['warmup']} warm-up call(s) per task, then {s['repeats']} interleaved round(s) of every task of every "
        f"variant; medians" + (f"; 1-min load average {load:.1f} at start, {results['load_average_end']:.1f} at end"
                               if load is not None else ""),
        "",
        main_table(results["variants"]),
        "",
    ]
    if flops:
        inf, tr = flops["inference"], flops["train"]
        parts = ", ".join(f"{k} {inf[k] / 1e9:.1f}" for k in STAGES if k in inf)
        out.append(f"FLOPs (2 x multiply-adds, analytic from layer shapes): inference {inf['total'] / 1e9:.1f} G per "
                   f"batch ({parts}); train step {tr['total'] / 1e9:.1f} G (forward {tr['forward'] / 1e9:.1f}, "
                   f"backward {tr['backward'] / 1e9:.1f}); res4 map {'x'.join(map(str, flops['feature_shape']))}")
    out.append(f"matmul: {s['matmul_size']}x{s['matmul_size']} @ {s['matmul_size']}x{s['matmul_size']} in each "
               "variant's compute dtype (float32, bfloat16, float16), timed in the same rounds as the model")
    out.append(results["memory_note"])
    split = split_table(results["variants"], flops, s["batch"]) if flops else None
    if split:
        out += ["", "Inference by stage (each stage its own compiled function on the previous stage's outputs):",
                split]
    train_split = train_split_table(results["variants"], flops) if flops else None
    if train_split:
        out += ["", "Training step by stage (forward and backward of each part alone, in training mode, its own "
                    "compiled function):", train_split]
    for note in results.get("notes", []):
        out.append(f"note: {note}")
    out.append(f"wall time {results['wall_s']:.0f} s")
    return "\n".join(out)


def write_json(results, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=float)
