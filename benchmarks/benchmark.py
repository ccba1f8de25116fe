"""Speed, FLOPs and memory of the detector, per precision and XLA setting: one printed report (and JSON).

    python benchmarks/benchmark.py                                   # VOC config, 600x1000, 300 proposals
    python benchmarks/benchmark.py --precisions float32 --repeats 1 --json bench.json
    python benchmarks/benchmark.py --config test.yaml --min-size 64 --max-size 64 --proposals 8 --rois 8
    KERAS_BACKEND=jax python benchmarks/benchmark.py --xla on

Every variant is ``frcnn.build_model(cfg)`` with ``train.mixed_precision`` and ``train.jit_compile`` set in the
config, nothing else. Parts: :mod:`benchmarks.machine` (processor features, precisions), :mod:`benchmarks.workload`
(models and tasks), :mod:`benchmarks.measure` (interleaved timing, memory, matmul), :mod:`benchmarks.flops`
(analytic FLOPs), :mod:`benchmarks.report` (table, JSON). See benchmarks/README.md for what each figure means.
"""

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from benchmarks import flops as flops_lib  # noqa: E402
from benchmarks import machine, measure, report, workload  # noqa: E402


def log(message):
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = workload.Sizes()
    parser.add_argument("--config", default="voc.yaml", help="config name in configs/ or a path (default voc.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable); model.backbone_weights is always none")
    parser.add_argument("--precisions",
                        help="comma-separated subset of " + ",".join(machine.PRECISIONS) + " (default: float32, "
                             "plus mixed_bfloat16 where the CPU has native bfloat16 or on a GPU, plus mixed_float16 "
                             "on a GPU)")
    parser.add_argument("--xla", choices=("config", "off", "on", "both"), default="config",
                        help="train.jit_compile per variant (default: the config's value; on under JAX)")
    parser.add_argument("--speed-paths", default=None, metavar="LIST",
                        help="comma-separated train.speed_paths settings to compare, each its own variant, e.g. "
                             "off,on (default: the config's); inference is timed for the first only unless the "
                             "model's norm is group (the speed paths change the training kernels only)")
    parser.add_argument("--min-size", type=int, default=sizes.min_size, help="image height (default 600)")
    parser.add_argument("--max-size", type=int, default=sizes.max_size, help="image width (default 1000)")
    parser.add_argument("--proposals", type=int, default=sizes.proposals,
                        help="test proposals per image (default 300)")
    parser.add_argument("--rois", type=int, default=sizes.rois, help="training ROIs per image (default 128)")
    parser.add_argument("--batch", type=int, default=sizes.batch, help="images per call and per step (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per task first (default 1, min 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (default 3)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="N of the N x N matmul reference (2048)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="prepare no further variant once this many seconds have passed (those left are "
                             "reported as not measured); the timed rounds still run")
    parser.add_argument("--no-split", dest="split", action="store_false", help="skip the per-stage split")
    parser.add_argument("--json", help="also write every figure (and every timed run) to this JSON file")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1 (the first call traces and compiles)")
    if args.min_size > args.max_size:
        parser.error("--min-size must not exceed --max-size")
    if args.speed_paths is not None:
        args.speed_paths = [p.strip() for p in args.speed_paths.split(",") if p.strip()]
        unknown = sorted(set(args.speed_paths) - {"auto", "on", "off"})
        if unknown or not args.speed_paths:
            parser.error(f"--speed-paths takes auto, on and off, got {unknown or 'nothing'}")
    if args.precisions:
        args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        unknown = sorted(set(args.precisions) - set(machine.PRECISIONS))
        if unknown:
            parser.error(f"unknown precision(s) {unknown}; choose from {', '.join(machine.PRECISIONS)}")
    return args


def choose_variants(args, cfg, info, notes):
    precisions = args.precisions or machine.default_precisions(info["cpu"], info["gpus"])
    if not args.precisions and "mixed_bfloat16" not in precisions:
        notes.append("mixed_bfloat16 not measured: no native bfloat16 found (avx512_bf16 / amx_bf16 / GPU); "
                     "ask for it with --precisions")
    if args.xla == "config":
        xla = [cfg.train.jit_compile]
        if info["backend"] == "jax" and not cfg.train.jit_compile:
            xla = [True]
            notes.append("JAX backend: train.jit_compile=true (without it Keras runs the JAX model eagerly)")
    else:
        xla = {"off": [False], "on": [True], "both": [False, True]}[args.xla]
    if args.split and info["backend"] == "torch":
        notes.append("torch backend: the stage functions run eagerly (not compiled)")
    speed_paths = args.speed_paths or [None]
    # With frozen or batch norms the speed paths change only training kernels (matrix-product convolutions in
    # training, the optimizer): inference would time the same program again. GroupNorm's written gradient also
    # changes its forward pass.
    infer_each = cfg.model.norm == "group"
    if len(speed_paths) > 1 and not infer_each:
        notes.append(f"inference timed with train.speed_paths={speed_paths[0]} only: with model.norm="
                     f"{cfg.model.norm} the speed paths change the training step alone")
    # Speed-path-major: every precision with the first setting, then with the next (what --time-limit keeps).
    return [workload.Variant(p, x, s, infer=infer_each or i == 0)
            for i, s in enumerate(speed_paths) for p in precisions for x in xla]


def prepare_variant(cfg, variant, sizes, args):
    """Build, warm up (in the variant's dtype policy) and return ``(model, tasks, seen, warm-up timings)``
    (:func:`benchmarks.workload.tasks`). Keras' global dtype
    policy, which ``build_model`` sets from the config, is restored afterwards."""
    import keras

    previous = keras.mixed_precision.global_policy().name
    try:
        log(f"{variant.name}: building")
        variant_cfg = workload.variant_config(cfg, variant)
        model = workload.build(variant_cfg)
        tasks, seen = workload.tasks(model, variant_cfg, variant, sizes, split=args.split)
        log(f"{variant.name}: {args.warmup} warm-up call(s) per task (the first traces and compiles)")
        warm = measure.interleaved(tasks, warmup=args.warmup, repeats=0, log=lambda m: log(f"{variant.name}: {m}"))
        return model, tasks, seen, warm
    finally:
        keras.mixed_precision.set_global_policy(previous)


def short_reason(err):
    """One line: the first line of the message that names an error (TensorFlow's traced errors begin with
    "in user code:" and a traceback), else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line]
    return f"{type(err).__name__}: {(named or lines or [''])[0][:200]}"


def run(args):
    import keras

    start = time.perf_counter()
    info = machine.describe()
    log(f"{info['cpu']['model']} x{info['usable_cores']}, GPU {info['gpus'] or 'none'}, backend {info['backend']}")
    sizes = workload.Sizes(args.min_size, args.max_size, args.proposals, args.rois, args.batch)
    cfg = workload.base_config(args.config, args.overrides, sizes)
    notes = []
    variants = choose_variants(args, cfg, info, notes)
    # Once: setting TensorFlow's global seed again would make every traced function trace anew.
    keras.utils.set_random_seed(0)
    memory = measure.PeakMemory(info["backend"])
    batch, _ = workload.synthetic_batches(cfg, sizes)
    padded = batch["images"].shape[1:3]

    prepared, failed, flops = {}, {}, None
    for variant in variants:
        if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
            log(f"{variant.name}: not measured (--time-limit {args.time_limit:g} s reached)")
            failed[variant] = f"n/a (not measured: --time-limit {args.time_limit:g} s reached)"
            continue
        try:
            model, tasks, seen, warm = prepare_variant(cfg, variant, sizes, args)
        except Exception as err:  # noqa: BLE001 - a variant that cannot run is reported, the others still run
            log(f"{variant.name}: failed: {short_reason(err)}")
            failed[variant] = f"n/a ({short_reason(err)})"
            continue
        prepared[variant] = (tasks, seen, warm)
        if flops is None:  # the same for every variant: precision and XLA do not change the arithmetic
            flops = flops_lib.count(model, padded, sizes.batch, sizes.proposals, sizes.rois)

    # One matmul reference per compute dtype, timed in the same rounds as the models.
    matmuls = {}
    for precision in dict.fromkeys(v.precision for v in prepared):
        dtype = workload.COMPUTE_DTYPE[precision]
        matmuls[precision] = measure.matmul_task(args.matmul_size, dtype)
    everything = {f"matmul {workload.COMPUTE_DTYPE[p]}": fn for p, (fn, _) in matmuls.items()}
    measure.interleaved(everything, warmup=args.warmup, repeats=0)
    for variant, (tasks, _, _) in prepared.items():
        everything.update({f"{variant.name} | {task}": fn for task, fn in tasks.items()})
    log(f"{args.repeats} interleaved round(s) of {len(everything)} tasks")
    timings = measure.interleaved(everything, warmup=0, repeats=args.repeats, memory=memory, log=log)

    rows = []
    for variant in variants:
        if variant in failed:
            rows.append({"name": variant.name, "precision": variant.precision, "xla": variant.xla,
                         "speed_paths": variant.speed_paths, "status": failed[variant]})
            continue
        tasks, seen, warm = prepared[variant]
        own = {task: dict(timings[f"{variant.name} | {task}"], warmup=warm[task]["warmup"]) for task in tasks}
        matmul = (timings[f"matmul {workload.COMPUTE_DTYPE[variant.precision]}"],
                  matmuls[variant.precision][1])
        row = report.summarize(variant, own, flops, sizes.batch, matmul)
        losses = seen["losses"]
        row["last_loss"] = losses[-1] if losses else None
        row["detections_per_image"] = seen["detections"][-1] if seen["detections"] else None
        if not all(math.isfinite(loss) for loss in losses):
            notes.append(f"{variant.name}: a training loss is not finite with these random weights, so proposals and "
                         "NMS may have had less work than with trained weights")
        if row["detections_per_image"] is not None and row["detections_per_image"] < 10:
            notes.append(f"{variant.name}: {row['detections_per_image']:g} detections per image with random weights "
                         "(their class scores are near-uniform or saturated): the detections stage's NMS had "
                         "almost nothing to do")
        rows.append(row)
    results = {
        "machine": info,
        "settings": {"config": args.config, "overrides": args.overrides, **vars(sizes), "padded": list(padded),
                     "speed_paths": args.speed_paths,
                     "warmup": args.warmup, "repeats": args.repeats, "matmul_size": args.matmul_size},
        "flops": flops,
        "variants": rows,
        "memory_note": memory_note(memory, info),
        "notes": notes,
        "load_average_end": machine.load_average(),
        "wall_s": time.perf_counter() - start,
    }
    return results


def memory_note(memory, info):
    host = ("peak RSS of the process during each task's timed calls (the kernel's high-water mark, reset before "
            "each call); the other variants' models stay resident meanwhile" if memory.resettable else
            "peak RSS: the process's lifetime maximum (this system cannot reset it), so later figures include "
            "earlier ones")
    if info["gpus"]:
        host += "; accelerator peak in the JSON (peak_device_*_mb)"
    return "memory: " + host


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = run(args)
    print(report.render(results), flush=True)
    if args.json:
        report.write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
