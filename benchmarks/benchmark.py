"""Speed, FLOPs and memory of the detector: one table, one row per variant (fp32, XLA, mixed precision).

    python benchmarks/benchmark.py                          # VOC config, 600x1000 input, 300 test proposals
    python benchmarks/benchmark.py --quick                  # smaller sizes, one repetition: a smoke run
    python benchmarks/benchmark.py --variants fp32 --json bench.json

What is measured (random weights, ``model.backbone_weights=none``, so nothing is downloaded):

- inference: seconds per image of ``model.predict_on_batch`` (Keras' compiled predict function) on one prepared
  ``min_size x max_size`` image, ``--rois`` test proposals; warm-up runs excluded, median of the timed runs;
- training: seconds per step of Keras' compiled train function (what ``fit`` runs) on a synthetic batch of ONE
  image in the ``docs/CONTRACTS.md`` format (random boxes), ``model.num_rois = --train-rois``, optimizer from
  ``frcnn.training.make_optimizer``; warm-up excluded;
- FLOPs per image for inference: 2 x the multiply-adds of every Conv2D and Dense layer at the actual shapes (trunk
  at the padded input size, RPN head, res5 and the Dense heads once per proposal), and TensorFlow's profiler count
  of the same graph as a cross-check;
- the achieved FLOP rate (FLOPs / inference time) next to the rate of a large fp32 matmul measured in the same
  process just before the inference, and their ratio;
- the input pipeline's images per second (``frcnn.data.build_dataset``, training mode, one image per batch) on the
  raccoon data when it is present, next to the model's training images per second;
- peak memory: the process's maximum resident set size (CPU) or TensorFlow's peak allocation on ``GPU:0``.

Variants: ``fp32``; ``xla``: XLA on the whole predict and train steps (``compile(jit_compile=True)``, what
``train.jit_compile`` does); ``mixed``: ``mixed_float16``
on a GPU, ``mixed_bfloat16`` on a CPU. By default each variant runs in its own process (``--no-isolate`` runs them
in this one), so that its peak memory is its own and no global state (dtype policy, XLA caches) carries over.
"""

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

VARIANTS = ("fp32", "xla", "mixed")
DEFAULT_DATA_ROOT = os.path.join(os.path.dirname(ROOT), "shared", "data", "raccoon")
# Wall-clock time (time.time()) after which no measurement is repeated beyond its first timed run; see --time-limit.
_DEADLINE = [None]

# (key, header): the table's columns, in order.
COLUMNS = (
    ("variant", "variant"),
    ("policy", "dtype policy"),
    ("infer_s", "infer s/img"),
    ("gflop", "GFLOP/img"),
    ("gflop_profiler", "GFLOP/img (TF profiler)"),
    ("gflops", "achieved GFLOP/s"),
    ("matmul_gflops", "fp32 matmul GFLOP/s"),
    ("matmul_ratio", "achieved / matmul"),
    ("train_s", "train s/step"),
    ("train_img_s", "train img/s"),
    ("input_img_s", "input img/s"),
    ("peak_infer_mb", "peak MB (infer)"),
    ("peak_train_mb", "peak MB (+train)"),
)

# Sizes and repetitions: (default mode, --quick). Explicit options override either.
DEFAULTS = {
    "min_size": (600, 320),
    "max_size": (1000, 512),
    "rois": (300, 64),
    "train_rois": (128, 32),
    "repeats": (3, 1),
    "budget": (30.0, 0.0),
    "matmul_size": (4096, 1024),
    "pipeline_batches": (100, 5),
}


def log(message):
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="voc.yaml", help="config name in configs/ or a path (default voc.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override (repeatable); model.backbone_weights is always none")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of fp32,xla,mixed (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one repetition: a smoke run")
    parser.add_argument("--min-size", type=int, help="image height = input.min_size (default 600; quick 320)")
    parser.add_argument("--max-size", type=int, help="image width = input.max_size (default 1000; quick 512)")
    parser.add_argument("--rois", type=int, help="test proposals per image (default 300; quick 64)")
    parser.add_argument("--train-rois", type=int, help="model.num_rois in training (default 128; quick 32)")
    parser.add_argument("--repeats", type=int, help="at most this many timed runs per measurement (default 3)")
    parser.add_argument("--budget", type=float,
                        help="stop repeating a measurement once its timed runs took this many seconds (at least "
                             "one run is always timed; default 30, quick 0)")
    parser.add_argument("--time-limit", type=float, default=540.0,
                        help="seconds for the whole run: past this point every measurement keeps only its first "
                             "timed run (warm-ups and sizes are never cut; default 540, 0 = none)")
    parser.add_argument("--matmul-size", type=int, help="N of the N x N fp32 matmul reference (default 4096)")
    parser.add_argument("--pipeline-batches", type=int, help="input-pipeline batches timed (default 100)")
    parser.add_argument("--data-root", default=os.environ.get("FRCNN_RACCOON", DEFAULT_DATA_ROOT),
                        help="VOC-layout data for the input-pipeline measure (default: the shared raccoon data)")
    parser.add_argument("--no-split", dest="split", action="store_false",
                        help="skip the per-stage split of the fp32 inference time")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every variant in this process (peak memory is then cumulative)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    # Internal: one variant in a child process, results written as JSON.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--with-flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, (normal, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else normal)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.min_size > args.max_size:
        parser.error("--min-size must not exceed --max-size")
    return args


# ------------------------------------------------------------------------------------------------ environment


def device_info():
    import keras
    import tensorflow as tf

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(details.get("device_name", gpu.name))
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "cpu": cpu or "unknown",
        "cpu_cores": usable,
        "gpus": gpus,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 Linux builds)"),
        "tf32": bool(gpus) and tf.config.experimental.tensor_float_32_execution_enabled(),
        "load_average_start": load_average(),
    }


def load_average():
    """1-minute load average: other work on the machine shows here and makes every figure slower."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def has_gpu():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def memory_reset():
    import tensorflow as tf

    if has_gpu():
        tf.config.experimental.reset_memory_stats("GPU:0")


def memory_peak_mb():
    """Peak since the last :func:`memory_reset` on a GPU; the process's maximum RSS so far on a CPU."""
    import tensorflow as tf

    if has_gpu():
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def timed(fn, repeats, budget, warmup=1):
    """Run ``fn`` (which must block until its result exists) ``warmup`` times, then time up to ``repeats`` runs,
    stopping early once the timed runs add up to ``budget`` seconds or another run would end past the run's
    deadline (``--time-limit``). Returns the median and every time."""
    warm = []
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    runs = []
    while len(runs) < max(1, repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
        if sum(runs) >= budget:
            break
        if _DEADLINE[0] is not None and time.time() + runs[-1] > _DEADLINE[0]:
            break
    return {"median": statistics.median(runs), "runs": runs, "warmup": warm}


def short_reason(err):
    """A one-line reason from a TensorFlow error: missing XLA kernels, a dtype an op does not take, or line one."""
    text = str(getattr(err, "message", None) or err)
    missing = sorted(set(re.findall(r"No registered '(\w+)' OpKernel for XLA_", text)))
    if missing:
        return "no XLA kernel for " + ", ".join(missing)
    dtype = re.search(r"Value for attr 'T' of (\w+) is not in the list of allowed values", text)
    node = re.search(r"\{\{node (\w+)\}\}", text)
    if dtype and node:
        return f"op {node.group(1)} has no {dtype.group(1)} kernel"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return f"{type(err).__name__}: {first[:160]}"


# --------------------------------------------------------------------------------------------------- config


def make_config(args, variant_policy=None):
    """The config under test: ``--config`` + sizes, proposals, ROIs, random weights, one image per step."""
    from frcnn import data as data_lib
    from frcnn.config import load_config

    overrides = [
        "model.backbone_weights=none",
        f"input.min_size={args.min_size}",
        f"input.max_size={args.max_size}",
        f"model.rpn_post_nms_topk_test={args.rois}",
        f"model.num_rois={args.train_rois}",
        "train.batch_size=1",
        "eval.batch_size=1",
    ]
    base = load_config(args.config, args.overrides + overrides)
    # The test-time pre-NMS top-k must be at least the number of proposals kept.
    overrides.append(f"model.rpn_pre_nms_topk_test={max(args.rois, base.model.rpn_pre_nms_topk_test)}")
    if variant_policy and variant_policy != "float32":
        # build_model sets the global dtype policy from this key, before any layer is created.
        overrides.append(f"train.mixed_precision={variant_policy}")
    cfg = load_config(args.config, args.overrides + overrides)
    if cfg.data.classes is None:
        try:
            cfg = data_lib.resolve_classes(cfg)
        except (data_lib.DataError, OSError):
            # Speed does not depend on which classes; their number matters only for the tiny Dense heads.
            import dataclasses

            names = tuple(f"class{i}" for i in range(1, 21))
            cfg = cfg.replace(data=dataclasses.replace(cfg.data, classes=names))
    return cfg


def synthetic_images(args, seed=0):
    import numpy as np

    return [np.random.RandomState(seed).randint(0, 256, (args.min_size, args.max_size, 3), dtype=np.uint8)]


def training_batch(model, args, num_gt=3, seed=0):
    """One image in the ``docs/CONTRACTS.md`` batch format with ``num_gt`` random ground-truth boxes."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(seed)
    prepared = model.prepare_batch(synthetic_images(args, seed))
    height, width = (int(v) for v in prepared["image_sizes"][0])
    max_gt = model.cfg.input.max_gt
    boxes = np.zeros((1, max_gt, 4), np.float32)
    classes = np.zeros((1, max_gt), np.int32)
    valid = np.zeros((1, max_gt), bool)
    for i in range(min(num_gt, max_gt)):
        w = rng.uniform(0.15, 0.6) * width
        h = rng.uniform(0.15, 0.6) * height
        x1 = rng.uniform(0, width - w)
        y1 = rng.uniform(0, height - h)
        boxes[0, i] = (x1, y1, x1 + w, y1 + h)
        classes[0, i] = rng.randint(1, model.num_classes)
        valid[0, i] = True
    return {
        "images": tf.constant(prepared["images"]),
        "image_sizes": tf.constant(prepared["image_sizes"]),
        "scales": tf.constant(prepared["scales"]),
        "gt_boxes": tf.constant(boxes),
        "gt_classes": tf.constant(classes),
        "gt_valid": tf.constant(valid),
        "image_ids": tf.constant([0], tf.int64),
    }


# ---------------------------------------------------------------------------------------------------- FLOPs


def _conv_dense_macs(layer, output_shape):
    """Multiply-adds of one Conv2D (per output position, all output channels) or Dense layer, per sample."""
    import keras

    kernel_size = int(math.prod(layer.kernel.shape))  # (kh, kw, cin / groups, cout) or (cin, cout)
    if isinstance(layer, keras.layers.Conv2D):
        return int(output_shape[1]) * int(output_shape[2]) * kernel_size
    return kernel_size


def _functional_macs(functional, input_shape):
    """Multiply-adds of every Conv2D / Dense layer of a functional model at ``input_shape`` (shape inference only)."""
    import keras

    layers = [l for l in functional.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    probe = keras.Model(functional.inputs, [l.output for l in layers])
    specs = probe.compute_output_spec(keras.KerasTensor(input_shape))
    return sum(_conv_dense_macs(l, s.shape) for l, s in zip(layers, specs)), len(layers)


def analytic_flops(model, image_shape, num_rois):
    """FLOPs (2 x multiply-adds of Conv2D and Dense layers) of one inference at padded ``image_shape`` (H, W).

    Everything else (BatchNorm, ReLU, adds, RoIAlign's interpolation, NMS) is left out: it is a small fraction of
    the arithmetic, and the point is to compare with a matmul rate.
    """
    import keras

    height, width = image_shape
    trunk_macs, trunk_layers = _functional_macs(model.trunk, (1, height, width, 3))
    feature_shape = model.trunk.compute_output_shape((1, height, width, 3))
    rpn = model.rpn.head
    rpn_hidden = rpn.conv.compute_output_shape(feature_shape)
    rpn_macs = _conv_dense_macs(rpn.conv, rpn_hidden)
    rpn_macs += _conv_dense_macs(rpn.objectness, rpn.objectness.compute_output_shape(rpn_hidden))
    rpn_macs += _conv_dense_macs(rpn.deltas, rpn.deltas.compute_output_shape(rpn_hidden))
    pool = model.cfg.model.pool_size
    res5 = model.roi_heads.head.res5.layer
    res5_macs, res5_layers = _functional_macs(res5, (1, pool, pool, int(feature_shape[-1])))
    dense_macs = sum(
        _conv_dense_macs(td.layer, None) for td in (model.roi_heads.head.cls, model.roi_heads.head.box)
        if isinstance(td.layer, keras.layers.Dense)
    )
    parts = {
        "trunk": 2 * trunk_macs,
        "rpn_head": 2 * rpn_macs,
        "res5_per_roi": 2 * res5_macs,
        "res5": 2 * res5_macs * num_rois,
        "dense_heads": 2 * dense_macs * num_rois,
    }
    parts["total"] = parts["trunk"] + parts["rpn_head"] + parts["res5"] + parts["dense_heads"]
    parts["feature_shape"] = [int(d) for d in feature_shape[1:]]
    parts["layers_counted"] = trunk_layers + 3 + res5_layers + 2
    return parts


def profiler_flops(model, batch):
    """TensorFlow's profiler count of the inference graph: ``(total float ops, {op type: float ops})``.

    The profiler counts only ops whose shapes are static in the graph and that its registry knows (here Conv2D;
    the Dense heads' MatMul follows a reshape to ``(-1, ...)`` and is not counted, nor anything in NMS loops).
    """
    import tensorflow as tf

    images = tf.constant(batch["images"])
    sizes = tf.constant(batch["image_sizes"])
    concrete = tf.function(lambda x, s: model({"images": x, "image_sizes": s}, training=False)).get_concrete_function(
        tf.TensorSpec(images.shape, images.dtype), tf.TensorSpec(sizes.shape, sizes.dtype)
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the profiler's flops registry uses a deprecated TF1 helper and says so
    try:
        by_op = tf.compat.v1.profiler.profile(graph=concrete.graph, cmd="op", options=options)
    finally:
        logger.setLevel(level)
    return int(by_op.total_float_ops), {c.name: int(c.total_float_ops) for c in by_op.children}


# ------------------------------------------------------------------------------------------------ reference


def measure_matmul(n, repeats, budget, dtype="float32"):
    """GFLOP/s of an ``n x n @ n x n`` matmul in a tf.function (the reduction makes the result come back cheaply)."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32, seed=1)
    b = tf.random.normal((n, n), dtype=tf.float32, seed=2)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y), tf.float32)))
    result = timed(lambda: matmul(a, b).numpy(), max(repeats, 3), budget, warmup=1)
    result["gflops"] = 2 * n**3 / result["median"] / 1e9
    result["size"] = n
    return result


def measure_pipeline(args, cfg):
    """Images per second of ``build_dataset(training=True)`` on VOC-layout data at the benchmark's sizes."""
    import dataclasses

    from frcnn import data as data_lib

    root = args.data_root
    if not (root and os.path.isdir(os.path.join(root, "Annotations"))):
        return {"status": f"n/a (no VOC-layout data at {root})"}
    data_cfg = dataclasses.replace(cfg.data, format="voc", root=root, train_split="train", val_split=None,
                                   classes=None)
    pipe_cfg = cfg.replace(data=data_cfg)
    records, _, _ = data_lib.load_records(pipe_cfg, "train")
    dataset = data_lib.build_dataset(pipe_cfg, records, training=True, batch_size=1)
    iterator = iter(dataset)
    warmup = min(10, args.pipeline_batches)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    return {"img_s": args.pipeline_batches / elapsed, "images": args.pipeline_batches, "seconds": elapsed,
            "records": len(records), "root": root}


# -------------------------------------------------------------------------------------------------- variants


def _predict_fn(model, batch):
    return lambda: model.predict_on_batch(batch)


def _train_fn(model, batch):
    model.make_train_function()
    return lambda: float(model.train_function([batch])["loss"])  # float(): wait for the step to finish


def compile_model(model, cfg):
    from frcnn import training

    model.compile(optimizer=training.make_optimizer(cfg, steps_per_epoch=1000), jit_compile=False)
    # Create the optimizer's variables now, outside any tf.function (as fit() does before its first step).
    model.optimizer.build(model.trainable_variables)


def inference_split(model, batch, repeats, budget):
    """Seconds per stage of one inference, each stage a separate tf.function fed the previous stage's outputs."""
    import tensorflow as tf

    from frcnn.transform import normalize

    i = model.cfg.input
    images = tf.constant(batch["images"])
    sizes = tf.constant(batch["image_sizes"])
    rpn, roi_heads = model.rpn, model.roi_heads

    def proposals(features, logits, deltas, image_sizes):
        shape = tf.shape(features)
        return rpn.proposals([logits, deltas, rpn.anchors(shape[1], shape[2]), image_sizes], training=False)

    def trunk(x, s):
        return model.trunk(normalize(x, s, i.pixel_mean, i.pixel_std, i.channel_order), training=False)

    stages = [
        ("trunk", tf.function(trunk)),
        ("rpn_head", tf.function(lambda f: rpn.head(f))),
        ("proposals", tf.function(proposals)),
        ("roi_align", tf.function(lambda f, p: roi_heads.pooler([f, p]))),
        ("roi_head", tf.function(lambda x: roi_heads.head(x, training=False))),
        ("detections", tf.function(lambda c, b, p, v, s: roi_heads.decoder([c, b, p, v, s]))),
    ]
    values = {}

    def inputs(name):
        return {
            "trunk": (images, sizes),
            "rpn_head": (values.get("features"),),
            "proposals": (values.get("features"), values.get("rpn_logits"), values.get("rpn_deltas"), sizes),
            "roi_align": (values.get("features"), values.get("proposals")),
            "roi_head": (values.get("pooled"),),
            "detections": (values.get("class_probs"), values.get("box_deltas"), values.get("proposals"),
                           values.get("proposal_valid"), sizes),
        }[name]

    seconds = {}
    for name, fn in stages:
        args = inputs(name)
        fn.get_concrete_function(*args)  # trace outside the timing
        last = []

        def run(fn=fn, args=args, last=last):
            out = fn(*args)
            tf.nest.map_structure(lambda t: t.numpy(), out)  # wait for the stage to finish
            last[:] = [out]

        # No untimed warm-up: the whole model's predict function has just run, and an extra run would double the
        # cost of the slow stages.
        seconds[name] = timed(run, repeats, budget, warmup=0)["median"]
        out = last[0]
        if name == "trunk":
            values["features"] = out
        elif name == "rpn_head":
            values["rpn_logits"], values["rpn_deltas"] = out
        elif name == "proposals":
            values["proposals"], values["proposal_valid"] = out
        elif name == "roi_align":
            values["pooled"] = out
        elif name == "roi_head":
            values["class_probs"], values["box_deltas"] = out
    seconds["sum"] = sum(seconds.values())
    return seconds


def run_variant(args, variant, with_flops=False, split=False):
    """Measure one variant in this process. Returns ``{"rows": [...], "flops": ..., "split": ..., "notes": [...]}``."""
    import keras
    import tensorflow as tf

    from frcnn.model import build_model

    gpu = has_gpu()
    result = {"rows": [], "flops": None, "split": None, "notes": []}
    policy = {"fp32": "float32", "xla": "float32", "mixed": "mixed_float16" if gpu else "mixed_bfloat16"}[variant]
    cfg = make_config(args, policy)
    keras.utils.set_random_seed(0)
    memory_reset()
    try:
        log(f"{variant}: building the model ({policy})")
        start = time.perf_counter()
        with warnings.catch_warnings():
            # When the build's forward pass fails, Keras first warns about "unbuilt state" with the same error.
            warnings.filterwarnings("ignore", message=".*unbuilt state")
            model = build_model(cfg)
        log(f"{variant}: built in {time.perf_counter() - start:.1f} s")
    except (tf.errors.OpError, ValueError, TypeError) as err:
        keras.mixed_precision.set_global_policy("float32")
        name = variant if variant != "xla" else "xla (whole step)"
        result["rows"].append({"variant": name, "policy": policy, "status": f"n/a ({short_reason(err)})"})
        return result
    try:
        compile_model(model, cfg)
        batch = model.prepare_batch(synthetic_images(args))
        train_batch = training_batch(model, args)
        if with_flops:
            result["flops"] = flops_figures(model, batch, args.rois)
        if variant == "xla":
            # train.jit_compile: Keras compiles the whole predict and train steps with XLA.
            model.compile(optimizer=model.optimizer, jit_compile=True)
            name = "xla (whole step)"
        else:
            name = variant
        row = {"variant": name, "policy": policy, "status": None}
        # The matmul reference runs right before this variant's inference, in the same process, so that both see
        # the same machine (other work on a shared machine slows both alike).
        log(f"{name}: fp32 matmul {args.matmul_size}x{args.matmul_size}")
        matmul = measure_matmul(args.matmul_size, args.repeats, args.budget / 4)
        row.update(matmul_gflops=matmul["gflops"], matmul_runs=matmul["runs"])
        memory_reset()
        log(f"{name}: inference (warm-up, then up to {args.repeats} timed runs)")
        try:
            infer = timed(_predict_fn(model, batch), args.repeats, args.budget)
        except (tf.errors.OpError, ValueError, TypeError) as err:
            row["status"] = f"n/a (inference: {short_reason(err)})"
            result["rows"].append(row)
            return result
        row.update(infer_s=infer["median"], infer_runs=infer["runs"], infer_warmup=infer["warmup"],
                   peak_infer_mb=memory_peak_mb())
        log(f"{name}: inference {infer['median']:.3f} s/img (runs {fmt_runs(infer['runs'])})")
        if split:
            log(f"{name}: per-stage split of the inference")
            result["split"] = inference_split(model, batch, 1, 0.0)
        memory_reset()
        log(f"{name}: training (warm-up, then up to {args.repeats} timed steps)")
        losses = []
        try:
            step = _train_fn(model, train_batch)
            train = timed(lambda: losses.append(step()), args.repeats, args.budget)
        except (tf.errors.OpError, ValueError, TypeError) as err:
            result["notes"].append(f"{name}: training failed: {short_reason(err)}")
            result["rows"].append(row)
            return result
        row.update(train_s=train["median"], train_runs=train["runs"], train_warmup=train["warmup"],
                   train_loss=losses[-1], peak_train_mb=memory_peak_mb())
        log(f"{name}: training {train['median']:.3f} s/step (runs {fmt_runs(train['runs'])})")
        if not math.isfinite(losses[-1]):
            result["notes"].append(f"{name}: the training loss is {losses[-1]} with random weights "
                                   "(timing is still valid)")
        result["rows"].append(row)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return result


def flops_figures(model, batch, num_rois):
    import tensorflow as tf

    image_shape = batch["images"].shape[1:3]
    flops = {"analytic": analytic_flops(model, image_shape, num_rois), "padded_input": list(image_shape)}
    log("FLOPs: TensorFlow profiler on the inference graph")
    try:
        total, by_op = profiler_flops(model, batch)
        flops["profiler_total"] = total
        flops["profiler_by_op"] = by_op
        if total <= 0:
            flops["profiler_status"] = "n/a (the profiler counted no FLOPs)"
    except (tf.errors.OpError, ValueError, TypeError, AttributeError) as err:
        flops["profiler_status"] = f"n/a ({short_reason(err)})"
    return flops


def fmt_runs(runs):
    return ", ".join(f"{r:.2f}" for r in runs)


# ------------------------------------------------------------------------------------------------- the table


def fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if value < 1 else f"{value:.2f}"


def table_rows(results):
    """Rows of the table: the variant rows plus the shared figures (FLOPs, matmul, input pipeline)."""
    flops = results.get("flops") or {}
    gflop = flops["analytic"]["total"] / 1e9 if flops.get("analytic") else None
    gflop_prof = flops["profiler_total"] / 1e9 if flops.get("profiler_total") else None
    pipe = (results.get("pipeline") or {}).get("img_s")
    rows = []
    for row in results["rows"]:
        out = {"variant": row["variant"], "policy": row.get("policy"), "status": row.get("status")}
        infer, train = row.get("infer_s"), row.get("train_s")
        achieved = gflop / infer if gflop and infer else None
        matmul = row.get("matmul_gflops")
        out.update(
            infer_s=infer,
            gflop=gflop,
            gflop_profiler=gflop_prof if gflop_prof else flops.get("profiler_status"),
            gflops=achieved,
            matmul_gflops=matmul,
            matmul_ratio=achieved / matmul if achieved and matmul else None,
            train_s=train,
            train_img_s=1.0 / train if train else None,  # one image per step
            input_img_s=pipe if pipe else (results.get("pipeline") or {}).get("status"),
            peak_infer_mb=row.get("peak_infer_mb"),
            peak_train_mb=row.get("peak_train_mb"),
        )
        rows.append(out)
    return rows


def render_table(rows):
    headers = [h for _, h in COLUMNS]
    lines = []
    cells = []
    for row in rows:
        if row.get("status"):
            cells.append([row["variant"], row.get("policy") or "-", row["status"]] + [""] * (len(COLUMNS) - 3))
        else:
            formatted = []
            for key, _ in COLUMNS:
                value = row.get(key)
                if key == "matmul_ratio" and isinstance(value, float):
                    formatted.append(f"{100 * value:.0f}%")
                else:
                    formatted.append(fmt(value))
            cells.append(formatted)
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            if not (r[2].startswith("n/a") and i == 2):  # a long reason does not widen its column
                widths[i] = max(widths[i], len(c))
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def report(results):
    dev = results["device"]
    s = results["settings"]
    out = [
        f"TensorFlow {dev['tensorflow']}, Keras {dev['keras']}, Python {dev['python']}",
        f"CPU: {dev['cpu']} ({dev['cpu_cores']} usable cores); GPU: {', '.join(dev['gpus']) or 'none'}"
        + (f"; TF32 {'on' if dev['tf32'] else 'off'}" if dev["gpus"] else "")
        + (f"; 1-min load average {dev['load_average_start']:.1f} at start, {results['load_average_end']:.1f} "
           "at end" if dev.get("load_average_start") is not None else ""),
        f"config {s['config']} (random weights): image {s['min_size']}x{s['max_size']} "
        f"(padded {s.get('padded_input', '?')}), {s['rois']} test proposals, training 1 image/step with "
        f"{s['train_rois']} ROIs; median of up to {s['repeats']} timed runs after warm-up"
        + (" (quick mode)" if s["quick"] else ""),
        "",
        render_table(results["table"]),
        "",
    ]
    flops = results.get("flops") or {}
    a = flops.get("analytic")
    if a:
        out.append(
            f"FLOPs/img (2 x conv+dense MACs): trunk {a['trunk'] / 1e9:.1f} G (features {a['feature_shape']}), "
            f"RPN head {a['rpn_head'] / 1e9:.1f} G, res5 {a['res5_per_roi'] / 1e9:.2f} G x {s['rois']} ROIs = "
            f"{a['res5'] / 1e9:.1f} G, dense heads {a['dense_heads'] / 1e9:.2f} G; total {a['total'] / 1e9:.1f} G"
        )
        if flops.get("profiler_total"):
            by_op = ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops["profiler_by_op"].items())
            out.append(f"TF profiler (tf.compat.v1.profiler float_operation on the inference graph): {by_op}; it "
                       "counts only registered ops with static shapes")
    split = results.get("split")
    if split:
        parts = [f"{k} {v:.3f}" for k, v in split.items() if k != "sum"]
        whole = next((r.get("infer_s") for r in results["rows"] if r["variant"] == "fp32" and r.get("infer_s")),
                     None)
        line = "fp32 inference by stage (s): " + ", ".join(parts) + f"; sum {split['sum']:.3f}"
        if whole:
            line += f" (whole predict {whole:.3f})"
        out.append(line)
        if a:
            rates = []
            for stage, key in (("trunk", "trunk"), ("rpn_head", "rpn_head"), ("roi_head", "res5")):
                if split.get(stage):
                    rates.append(f"{stage} {a[key] / split[stage] / 1e9:.1f}")
            out.append("  stage GFLOP/s: " + ", ".join(rates))
    matmuls = [f"{r['variant']} {r['matmul_gflops']:.1f}" for r in results["rows"] if r.get("matmul_gflops")]
    if matmuls:
        out.append(f"fp32 matmul {s['matmul_size']}x{s['matmul_size']} GFLOP/s, measured in each variant's process "
                   f"just before its inference: " + ", ".join(matmuls))
    p = results.get("pipeline") or {}
    if p.get("img_s"):
        out.append(f"input pipeline: {p['img_s']:.1f} img/s over {p['images']} images of {p['root']} "
                   "(build_dataset training=True, batch 1, measured alone, not alongside training)")
    elif p.get("status"):
        out.append(f"input pipeline: {p['status']}")
    runs = []
    for r in results["rows"]:
        parts = [f"{what} {fmt_runs(r[key])}" for what, key in (("infer", "infer_runs"), ("train", "train_runs"))
                 if r.get(key)]
        if parts:
            runs.append(f"{r['variant']}: " + ", ".join(parts))
    if runs:
        out.append("timed runs (s): " + "; ".join(runs))
    mem = "GPU:0 peak allocation" if dev["gpus"] else "process max RSS"
    if not s["isolated"] and not dev["gpus"]:
        mem += " (cumulative: all variants ran in one process)"
    out.append(f"memory: {mem}; '+train' is the peak over inference and training")
    for note in results.get("notes", []):
        out.append(f"note: {note}")
    out.append(f"wall time {results['wall_s']:.0f} s")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ main


def _run_child(args, argv, variant, with_flops, split):
    fd, path = tempfile.mkstemp(prefix="frcnn-bench-", suffix=".json")
    os.close(fd)
    try:
        command = [sys.executable, os.path.abspath(__file__)] + list(argv) + ["--child", variant,
                                                                              "--child-out", path]
        if with_flops:
            command.append("--with-flops")
        if not split:
            command.append("--no-split")
        if _DEADLINE[0] is not None:
            command += ["--deadline", repr(_DEADLINE[0])]
        proc = subprocess.run(command, check=False)
        if proc.returncode != 0:
            return {"rows": [{"variant": variant, "status": f"n/a (its process exited with code "
                                                            f"{proc.returncode}; see the log above)"}],
                    "flops": None, "split": None, "notes": []}
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.remove(path)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        _DEADLINE[0] = args.deadline
        # One variant, in a process of its own; the parent prints the table.
        out = run_variant(args, args.child, with_flops=args.with_flops, split=args.split)
        with open(args.child_out, "w", encoding="utf-8") as f:
            json.dump(out, f)
        if args.isolate:
            # A child spawned by the parent: skip TensorFlow's slow interpreter teardown (seconds per variant).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return out

    start = time.perf_counter()
    _DEADLINE[0] = time.time() + args.time_limit if args.time_limit > 0 else None
    import tensorflow as tf  # noqa: F401  (after the environment variables above)

    dev = device_info()
    log(f"TensorFlow {dev['tensorflow']}, CPU {dev['cpu']} x{dev['cpu_cores']}, GPU {dev['gpus'] or 'none'}")
    cfg = make_config(args)
    results = {
        "device": dev,
        "settings": {
            "config": args.config, "min_size": args.min_size, "max_size": args.max_size, "rois": args.rois,
            "train_rois": args.train_rois, "repeats": args.repeats,
            "matmul_size": args.matmul_size, "budget": args.budget, "quick": args.quick,
            "isolated": args.isolate, "variants": args.variants, "overrides": args.overrides,
        },
        "rows": [], "flops": None, "split": None, "notes": [],
    }
    log("input pipeline")
    results["pipeline"] = measure_pipeline(args, cfg)

    for variant in args.variants:
        # FLOPs are counted in the first variant whose model builds; the per-stage split runs with fp32 (or, when
        # fp32 is not measured, with the first variant that gets that far).
        with_flops = results["flops"] is None
        split = args.split and results["split"] is None and (variant == "fp32" or "fp32" not in args.variants)
        if args.isolate:
            out = _run_child(args, argv, variant, with_flops, split)
        else:
            out = run_variant(args, variant, with_flops=with_flops, split=split)
        results["rows"].extend(out["rows"])
        results["notes"].extend(out.get("notes") or [])
        results["flops"] = results["flops"] or out.get("flops")
        results["split"] = results["split"] or out.get("split")
    if results["flops"]:
        results["settings"]["padded_input"] = "x".join(str(d) for d in results["flops"]["padded_input"])
    results["table"] = table_rows(results)
    results["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - start
    text = report(results)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=float)
    return results


if __name__ == "__main__":
    main()
