"""The GPU check: every figure issue 23 asks of a lent GPU, in one run of bounded time. benchmarks/gpu_check.sh
installs the carried wheels and runs this; see benchmarks/README.md, "The GPU check".

    python benchmarks/gpu_check.py --out OUT              # on the GPU machine (through gpu_check.sh)
    python benchmarks/gpu_check.py --out OUT --dry-run    # the same sections at tiny sizes, on a CPU

Sections, each a subprocess with its own time limit (the limits shrink to what is left of ``--budget``, so the
whole run ends in time; a section that fails or runs out of time is reported and the others still run). On the GPU
they run in this order, the timed ones (2-4) alone; the shapes training and the tests run side by side after them
(unless ``--serial``), since one after the other they would not fit in 8 minutes:

1. ``environment``: the GPU (nvidia-smi) and the versions of Python, Keras, JAX, PyTorch and torchvision.
2. ``bench_jax`` and 3. ``bench_torch``: benchmarks/benchmark.py on the JAX and the PyTorch backend at VOC size
   (voc.yaml, random weights, 600x1000, 300 test proposals, 128 training ROIs), float32 and mixed_bfloat16, each with
   ``train.speed_paths`` off and on (interleaved, medians; inference once per precision, since the speed paths
   change training kernels only).
4. ``torchvision``: benchmarks/torchvision_c4.py, the same detector from torchvision's parts, same sizes and timing.
5. ``shapes``: benchmarks/shapes_run.py, the default shapes recipe (configs/shapes.yaml, ``--shapes-steps``) on
   JAX: wall time, AP, AP50.
6. ``tests``: tests/test_backends.py and tests/test_backend_tools.py on the GPU (``FRCNN_TEST_DEVICE=gpu``).

The exit code is 1 when a section failed or ran out of time. Everything lands in ``--out`` (four files: what comes
back from the device machine's ``$OUT`` is at most 8): ``gpu_check.json`` (every figure of every section, each
section's status and time), ``gpu_check.md`` (the summary, ready for docs/NOTES.md) and ``sections.log`` (every
section's output), plus ``gpu_check.log`` (this script's own, written by gpu_check.sh). They are rewritten after
every section, so a run cut short still leaves what it measured.

``--dry-run`` (what tests/test_gpu_check.py runs on a CPU): test.yaml's model with voc.yaml's frozen norms at 64 x 64
pixels, 8 proposals, 4 ROIs, one timed round, float32 only; a 2-step float32 shapes training at 64 pixels; the tests
only collected (``pytest --collect-only``), not run; the JAX sections side by side, then the PyTorch ones. Sections
that need a library that is not installed (PyTorch, torchvision) are skipped and say so.
"""

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GPU run. "limits": what each section may take at most, in seconds; "budget": all of them together (with the
# wheels' installation and the start-up, under 8 minutes). The shapes training and the tests run side by side
# after the timed sections and share what is left.
FULL = {
    "sizes": ["--config", "voc.yaml", "--min-size", "600", "--max-size", "1000", "--proposals", "300",
              "--rois", "128"],
    "batch": 1,
    "precisions": "float32,mixed_bfloat16",
    "speed_paths": "off,on",
    "bench": ["--warmup", "2", "--repeats", "5", "--matmul-size", "8192", "--no-split"],
    "torchvision": ["--precisions", "float32,bfloat16", "--warmup", "2", "--repeats", "5"],
    "shapes": ["--config", "shapes.yaml"],
    "shapes_steps": 2000,
    "tests": ["tests/test_backends.py", "tests/test_backend_tools.py"],
    # Sections run group by group, the sections of a group side by side: the timed ones alone (nothing else on
    # the GPU meanwhile), the shapes training beside the tests (one after the other they would not fit).
    "groups": [["bench_jax"], ["bench_torch"], ["torchvision"], ["shapes", "tests"]],
    "limits": {"environment": 30, "bench_jax": 170, "bench_torch": 60, "torchvision": 30, "shapes": 200,
               "tests": 200},
    "budget": 430,
}
DRY = {
    # voc.yaml's norm and freezing on test.yaml's small model
    "sizes": ["--config", "test.yaml", "--set", "model.norm=frozen", "--set", "model.freeze_at=2",
              "--min-size", "64", "--max-size", "64", "--proposals", "8", "--rois", "4"],
    "batch": 1,
    "precisions": "float32",
    "speed_paths": "off,on",
    "bench": ["--warmup", "1", "--repeats", "1", "--matmul-size", "128", "--no-split"],
    "torchvision": ["--precisions", "float32,bfloat16", "--warmup", "1", "--repeats", "1"],
    "shapes": ["--config", "shapes.yaml", "--set", "data.synthetic.num_train=4", "--set",
               "data.synthetic.num_val=2", "--set", "data.synthetic.image_size=64", "--set",
               "data.synthetic.object_size=[16,40]", "--set", "input.min_size=64", "--set", "input.max_size=64",
               "--set", "anchors.sizes=[16.0,32.0,64.0]", "--set", "roi_heads.num_rois=4", "--set",
               "rpn.pre_nms_topk_train=100", "--set", "rpn.post_nms_topk_train=16", "--set",
               "rpn.pre_nms_topk_test=50", "--set", "rpn.post_nms_topk_test=8", "--set", "train.epochs=1",
               "--set", "train.lr_decay_epochs=[]", "--set", "train.val_every=1", "--set",
               "train.checkpoint_every=0", "--set", "train.warmup_steps=0", "--set", "train.mixed_precision=off"],
    "shapes_steps": 2,
    "tests": ["tests/test_backends.py", "tests/test_backend_tools.py"],
    # Nothing is timed for real here: side by side, so that the suite's test takes less wall time on 2 cores.
    "groups": [["bench_jax", "shapes", "tests"], ["bench_torch", "torchvision"]],
    "limits": {"environment": 60, "bench_jax": 240, "bench_torch": 240, "torchvision": 120, "shapes": 240,
               "tests": 120},
    "budget": 900,
}
SECTIONS = ("environment", "bench_jax", "bench_torch", "torchvision", "shapes", "tests")
GRACE_S = 30  # after SIGINT at a section's limit, before SIGKILL (a training saves its checkpoint)


def log(message):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="where the results go (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on a CPU (the suite's test)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all sections together (default 430; 900 with --dry-run); a section over its "
                             f"limit gets SIGINT, then SIGKILL {GRACE_S} s later")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of " + ",".join(SECTIONS) + " (default: all)")
    parser.add_argument("--shapes-steps", type=int, default=None,
                        help="steps of the shapes training (default 2000: the recipe; a multiple of its 20 epochs)")
    parser.add_argument("--serial", action="store_true",
                        help="run the shapes training and the tests one after the other (default: together, after "
                             "the timed sections, to fit the budget)")
    parser.add_argument("--batch", type=int, default=None, help="images per benchmark call and step (default 1)")
    parser.add_argument("--workdir", default=None,
                        help="scratch space for data and runs (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def installed(module):
    return importlib.util.find_spec(module) is not None


class Runner:
    """Runs the sections as subprocesses within the budget and keeps every result."""

    def __init__(self, args, workdir):
        self.args = args
        self.plan = DRY if args.dry_run else FULL
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        # Each section's own JSON and log: kept apart, since what comes back from the GPU machine's $OUT is at
        # most 8 files; gpu_check.json embeds the JSONs and sections.log joins the logs.
        self.scratch = os.path.join(workdir, "sections")
        os.makedirs(self.scratch, exist_ok=True)
        self.budget = args.budget if args.budget is not None else self.plan["budget"]
        self.start = time.monotonic()
        self.results = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                        "dry_run": bool(args.dry_run), "budget_s": self.budget, "sections": {}}

    def left(self):
        return self.budget - (time.monotonic() - self.start)

    def env(self, **extra):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONUNBUFFERED"] = "1"
        if self.args.dry_run:  # a CPU run: never touch a GPU that happens to be there
            env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, name, command, env, json_path=None):
        """Run ``command`` as section ``name``; returns its JSON (or None) and records status and time."""
        return self.run_together([(name, command, env, json_path)])[name]

    def run_together(self, jobs):
        """Run the sections of ``jobs`` (``[(name, command, env, json_path)]``) at the same time, each within its
        own limit (cut to what is left of the budget); returns ``{name: its JSON or None}``."""
        running, data = {}, {}
        for name, command, env, json_path in jobs:
            limit = min(self.plan["limits"][name], self.left())
            section = {"command": " ".join(command), "status": None, "seconds": 0.0}
            self.results["sections"][name] = section
            data[name] = None
            if limit < 5:
                section["status"] = "skipped: no time left in the budget"
                log(f"{name}: {section['status']}")
                continue
            log(f"{name}: starting (limit {limit:.0f} s): {section['command']}")
            log_path = os.path.join(self.scratch, f"{name}.log")
            out = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            running[name] = (proc, out, time.monotonic(), limit, log_path, json_path)
        while running:
            time.sleep(0.5)
            for name, (proc, out, start, limit, log_path, json_path) in list(running.items()):
                code = proc.poll()
                if code is None and time.monotonic() - start < limit:
                    continue
                if code is None:  # over its limit: INT (a training saves its checkpoint, pytest writes its
                    # report), then KILL
                    os.killpg(proc.pid, signal.SIGINT)
                    try:
                        proc.wait(timeout=GRACE_S)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                out.close()
                del running[name]
                section = self.results["sections"][name]
                section["seconds"] = round(time.monotonic() - start, 1)
                section["status"] = ("ok" if code == 0 else f"timed out after {limit:.0f} s" if code is None
                                     else f"failed (exit code {code})")
                if code != 0:
                    section["log_tail"] = _tail(log_path, 25)
                if json_path and os.path.isfile(json_path):
                    with open(json_path, encoding="utf-8") as f:
                        data[name] = json.load(f)
                log(f"{name}: {section['status']} in {section['seconds']} s")
        return data

    def skip(self, name, reason):
        """Record section ``name`` as skipped; returns None (no job)."""
        self.results["sections"][name] = {"status": f"skipped: {reason}", "seconds": 0.0}
        log(f"{name}: skipped: {reason}")
        return None

    def save(self):
        self.results["wall_s"] = round(time.monotonic() - self.start, 1)
        sections = self.results["sections"]
        self.results["sections"] = {name: sections[name] for name in SECTIONS if name in sections}
        with open(os.path.join(self.out, "gpu_check.json"), "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=2, default=float)
        text = summary(self.results)
        with open(os.path.join(self.out, "gpu_check.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(os.path.join(self.out, "sections.log"), "w", encoding="utf-8") as joined:
            for name in SECTIONS:
                path = os.path.join(self.scratch, f"{name}.log")
                if os.path.isfile(path):
                    joined.write(f"\n===== {name} =====\n")
                    with open(path, encoding="utf-8", errors="replace") as f:
                        shutil.copyfileobj(f, joined)
        return text


def _roomy(path, need):
    """Whether ``path`` is a writable folder with at least ``need`` bytes free (a container's /dev/shm can be
    64 MB)."""
    try:
        return os.access(path, os.W_OK) and shutil.disk_usage(path).free >= need
    except OSError:
        return False


def _tail(path, lines):
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


ENVIRONMENT_PROBE = r"""
import importlib.metadata as md, json, platform
info = {"python": platform.python_version()}
for name, dist in (("numpy", "numpy"), ("keras", "keras"), ("jax", "jax"), ("jaxlib", "jaxlib"), ("torch", "torch"),
                   ("torchvision", "torchvision"), ("cv2", "opencv-python-headless"), ("pycocotools", "pycocotools"),
                   ("h5py", "h5py"), ("tensorflow", "tensorflow")):
    try:
        info[name] = md.version(dist)
    except md.PackageNotFoundError:
        info[name] = None
if info["jax"]:
    try:
        import jax
        info["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception as err:
        info["jax_devices"] = f"{type(err).__name__}: {err}"
if info["torch"]:
    try:
        import torch
        info["torch_cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["torch_cuda_version"] = torch.version.cuda
    except Exception as err:
        info["torch_cuda"] = f"{type(err).__name__}: {err}"
print("ENV " + json.dumps(info))
"""


def environment(runner):
    """GPU and library versions (a subprocess: nothing imported here)."""
    section = {"status": None, "seconds": 0.0}
    runner.results["sections"]["environment"] = section
    start = time.monotonic()
    info = {}
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                   "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"{type(err).__name__}: {err}"
    try:
        done = subprocess.run([sys.executable, "-c", ENVIRONMENT_PROBE], env=runner.env(KERAS_BACKEND="jax"),
                              capture_output=True, text=True, timeout=runner.plan["limits"]["environment"])
        lines = [line for line in done.stdout.splitlines() if line.startswith("ENV ")]
        info.update(json.loads(lines[-1][4:]) if lines else {"error": done.stderr[-2000:]})
    except subprocess.TimeoutExpired:
        info["error"] = "the version probe timed out"
    info["cpu_count"] = os.cpu_count()
    section.update(status="ok" if "error" not in info else "failed", seconds=round(time.monotonic() - start, 1))
    runner.results["environment"] = info
    log(f"environment: {json.dumps(info)}")


def benchmark_job(runner, backend):
    name = f"bench_{backend}"
    if not installed(backend):
        return runner.skip(name, f"{backend} is not installed")
    plan = runner.plan
    path = os.path.join(runner.scratch, f"{name}.json")
    # No new variant after 60% of the section's time: the last one started still has time to compile and all
    # prepared ones are timed (variants come speed paths off first, so "on" is what a tight budget drops).
    limit = min(plan["limits"][name], runner.left())
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "benchmark.py"), *plan["sizes"],
               "--batch", str(runner.args.batch or plan["batch"]), "--precisions", plan["precisions"],
               "--speed-paths", plan["speed_paths"], *plan["bench"], "--time-limit", f"{0.6 * limit:.0f}",
               "--json", path]
    return name, command, runner.env(KERAS_BACKEND=backend), path


def torchvision_job(runner):
    if not (installed("torch") and installed("torchvision")):
        return runner.skip("torchvision", "torch or torchvision is not installed")
    plan = runner.plan
    path = os.path.join(runner.scratch, "torchvision.json")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "torchvision_c4.py"), *plan["sizes"],
               "--batch", str(runner.args.batch or plan["batch"]), *plan["torchvision"], "--json", path]
    if runner.args.dry_run:
        command += ["--device", "cpu"]
    return "torchvision", command, runner.env(), path


def shapes_job(runner, workdir, beside_tests):
    if not installed("jax"):
        return runner.skip("shapes", "jax is not installed")
    plan = runner.plan
    path = os.path.join(runner.scratch, "shapes.json")
    steps = runner.args.shapes_steps or plan["shapes_steps"]
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "shapes_run.py"), *plan["shapes"],
               "--steps", str(steps), "--workdir", os.path.join(workdir, "shapes"), "--json", path]
    # Beside the tests, half of the GPU's memory (JAX takes 75% at its start unless told otherwise).
    extra = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"} if beside_tests else {}
    return "shapes", command, runner.env(KERAS_BACKEND="jax", **extra), path


def tests_job(runner):
    if not installed("pytest"):
        return runner.skip("tests", "pytest is not installed")
    xml = os.path.join(runner.scratch, "tests.xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *runner.plan["tests"],
               f"--junitxml={xml}", "-rA"]
    if runner.args.dry_run:
        command.append("--collect-only")
    # The pytest process (on JAX) stays alive while the workers of both backends run: no JAX preallocation. The
    # tools' worker builds the same model in each tool (train, resume, infer, evaluate): JAX's persistent cache
    # lets the later ones reuse the first one's compiled programs.
    env = runner.env(KERAS_BACKEND="jax", FRCNN_TEST_DEVICE="cpu" if runner.args.dry_run else "gpu",
                     XLA_PYTHON_CLIENT_PREALLOCATE="false",
                     JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(runner.scratch), "jax-cache"),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="2")
    return "tests", command, env, None


def junit_summary(path):
    """``{"passed", "failed", "skipped", "errors", "cases": [{"name", "outcome", "seconds", "message"}]}`` from
    pytest's JUnit XML (None when there is none: the run stopped before writing it, or collected only)."""
    import xml.etree.ElementTree as ET

    if not os.path.isfile(path):
        return None
    cases, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, (found.get("message") or "")[:300]
                break
        counts[outcome] += 1
        cases.append({"name": f"{case.get('classname')}.{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return {**counts, "cases": cases}


# ----------------------------------------------------------------------------------------------------- summary


def _f(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"


def _bench_rows(results):
    """``[(backend, precision, speed_paths, infer_s, train_s, peak_train_mb)]`` of both benchmark sections."""
    rows = []
    for backend in ("jax", "torch"):
        bench = results.get(f"bench_{backend}")
        for v in (bench or {}).get("variants", []):
            if v.get("status"):
                rows.append((backend, v["precision"], v.get("speed_paths"), v["status"], None, None))
                continue
            rows.append((backend, v["precision"], v.get("speed_paths"), v.get("infer_s"), v.get("train_s"),
                         v.get("peak_device_train_mb")))
    return rows


def _reference(results, precision):
    """torchvision's ``(infer_s, train_s)`` in ``precision`` (frcnn's name or torch's)."""
    name = {"mixed_bfloat16": "bfloat16"}.get(precision, precision)
    for v in (results.get("torchvision") or {}).get("variants", []):
        if v["precision"] == name:
            return v["infer_s"], v["train_s"]
    return None, None


def summary(results):
    """The Markdown summary, for docs/NOTES.md."""
    env = results.get("environment") or {}
    gpu = env.get("nvidia_smi") or ", ".join(env.get("torch_cuda") or []) or "no GPU"
    kind = ("DRY RUN on a CPU, tiny sizes: no figure here means anything" if results["dry_run"]
            else "benchmarks/gpu_check.sh")
    out = [f"### GPU check ({kind}), {results['started']}",
           "",
           f"Machine: {gpu}; {env.get('cpu_count')} CPUs; Python {env.get('python')}, Keras {env.get('keras')}, "
           f"JAX {env.get('jax')} ({env.get('jax_devices')}), PyTorch {env.get('torch')} (CUDA "
           f"{env.get('torch_cuda_version')}), torchvision {env.get('torchvision')}, TensorFlow "
           f"{env.get('tensorflow') or 'absent'}. Wall time {results.get('wall_s')} s of a {results['budget_s']:.0f} s "
           "budget.", ""]
    bench = results.get("bench_jax") or results.get("bench_torch")
    if bench:
        s = bench["settings"]
        out += [f"Detector speed ({s['config']}, random weights, images {s['min_size']}x{s['max_size']} padded to "
                f"{s['padded'][0]}x{s['padded'][1]}, batch {s['batch']}, {s['proposals']} test proposals, "
                f"{s['rois']} training ROIs per image; {s['warmup']} warm-up calls, then medians of {s['repeats']} "
                "interleaved rounds; frcnn through Keras' compiled predict and train steps: XLA on JAX, eager on "
                "PyTorch; torchvision in the same sizes, eager):", ""]
    rows = _bench_rows(results)
    tv = results.get("torchvision")
    if rows or tv:
        out += ["| model | precision | speed paths | infer s/img | train s/step | infer vs torchvision | "
                "train vs torchvision | peak GPU MB (train) |",
                "|---|---|---|---|---|---|---|---|"]
        for backend, precision, sp, infer, train, peak in rows:
            if isinstance(infer, str):
                out.append(f"| frcnn, {backend} | {precision} | {sp or 'config'} | {infer} | | | | |")
                continue
            ref_infer, ref_train = _reference(results, precision)
            ratio_i = f"{infer / ref_infer:.2f}x" if infer and ref_infer else "-"
            ratio_t = f"{train / ref_train:.2f}x" if train and ref_train else "-"
            out.append(f"| frcnn, {backend} | {precision} | {sp or 'config'} | {_f(infer)} | {_f(train)} | "
                       f"{ratio_i} | {ratio_t} | {_f(peak, 5)} |")
        for v in (tv or {}).get("variants", []):
            out.append(f"| torchvision parts | {v['precision']} | - | {_f(v['infer_s'])} | {_f(v['train_s'])} | "
                       f"1x | 1x | {_f(v.get('peak_device_train_mb'), 5)} |")
        out += ["", "(ratios: frcnn's seconds over torchvision's, same precision; above 1x frcnn is slower)", ""]
        sp_lines = []
        for backend in ("jax", "torch"):
            by = {(p, sp): t for b, p, sp, _, t, _ in rows if b == backend and isinstance(t, float)}
            for precision in dict.fromkeys(p for p, _ in by):
                on, off = by.get((precision, "on")), by.get((precision, "off"))
                if on and off:
                    sp_lines.append(f"{backend} {precision} {on / off:.3f}")
        if sp_lines:
            out += ["Speed paths, training step on / off (below 1: the speed paths are faster here): "
                    + "; ".join(sp_lines) + ".", ""]
        for key in ("bench_jax", "bench_torch"):
            for note in (results.get(key) or {}).get("notes", []):
                out.append(f"- {key}: {note}")
        for note in (tv or {}).get("notes", []):
            out.append(f"- torchvision: {note}")
        if tv:
            m = tv["machine"]
            out.append(f"- torchvision: torch TF32 for matmuls {m['tf32']['matmul']}, for cuDNN convolutions "
                       f"{m['tf32']['cudnn']} (torch's defaults, also in frcnn's PyTorch run)")
        out.append("")
    sh = results.get("shapes")
    if sh:
        if sh.get("completed"):
            what = f"AP **{sh['AP']:.4f}**, AP50 **{sh['AP50']:.4f}**"
        else:
            what = (f"stopped ({sh.get('stopped')}) at step {sh.get('steps_done')}, best validation AP so far "
                    f"{sh.get('best_val_AP')}")
        out += [f"Shapes training ({sh['config']}, {sh['steps']} steps of batch {sh['batch_size']}, "
                f"{sh['num_rois']} ROIs, mixed_precision {sh['mixed_precision']}, {sh['backend']} on "
                f"{sh['device']}): {what}; training wall time **{sh['train_s']:.1f} s** (model build, compilation, "
                f"validations and checkpoints included), data generation {sh['generate_s']:.1f} s."]
        tests_s = results["sections"].get("tests", {}).get("seconds")
        if results.get("shapes_beside_tests") and tests_s:
            out.append(f"The backend tests ran beside this training for its first {tests_s:.0f} s (same GPU and "
                       "CPUs), so the wall time is an upper bound; `--serial` runs them after it.")
        out.append("")
    t = results.get("tests")
    if t:
        failed = [c for c in t["cases"] if c["outcome"] in ("failed", "errors")]
        where = "collected only (dry run)" if results["dry_run"] else "on the GPU"
        out += [f"Backend tests {where} ({', '.join(FULL['tests'])}): {t['passed']} passed, {t['failed']} failed, "
                f"{t['errors']} errors, {t['skipped']} skipped."]
        out += [f"- {c['outcome']}: {c['name']} ({c['seconds']:.0f} s): {c['message']}" for c in failed]
        out.append("")
    out += ["| section | status | seconds |", "|---|---|---|"]
    out += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in results["sections"].items()]
    return "\n".join(out)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.workdir:
        workdir = args.workdir
        os.makedirs(workdir, exist_ok=True)
    else:
        # On the GPU machine in memory where it can be: the shapes recipe writes a checkpoint of about 300 MB at
        # each of its 20 epoch ends, and a throwaway machine's disk is not what the run should measure.
        shm = "/dev/shm" if not args.dry_run and _roomy("/dev/shm", 8 * 2**30) else None
        workdir = tempfile.mkdtemp(prefix="frcnn-gpu-check-", dir=shm)
    runner = Runner(args, workdir)
    runner.results["workdir"] = workdir
    wanted = set(args.sections)
    groups = [[name] for group in runner.plan["groups"] for name in group] if args.serial else runner.plan["groups"]
    makers = {"bench_jax": lambda: benchmark_job(runner, "jax"), "bench_torch": lambda: benchmark_job(runner, "torch"),
              "torchvision": lambda: torchvision_job(runner),
              "shapes": lambda together: shapes_job(runner, workdir, together), "tests": lambda: tests_job(runner)}
    try:
        if "environment" in wanted:
            environment(runner)
            runner.save()
        for group in groups:
            names = [name for name in group if name in wanted]
            beside = len(names) > 1
            jobs = [makers[name](beside) if name == "shapes" else makers[name]() for name in names]
            data = runner.run_together([job for job in jobs if job])
            for name, value in data.items():
                runner.results[name] = value
            if "tests" in data:
                runner.results["tests"] = junit_summary(os.path.join(runner.scratch, "tests.xml"))
            if "shapes" in names and "tests" in names:
                runner.results["shapes_beside_tests"] = True
            runner.save()
    finally:
        text = runner.save()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text, flush=True)
    return runner.results


def exit_code(results):
    """1 when a section failed or ran out of time (skipped ones do not count), else 0."""
    bad = [s for s in results["sections"].values() if s["status"].startswith(("failed", "timed out"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(exit_code(main()))
