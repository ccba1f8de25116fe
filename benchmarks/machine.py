"""What the benchmark runs on: the processor's features, accelerators, the Keras backend, and from these the
precisions worth measuring.

Only the standard library and :mod:`frcnn.precision` (standard library only) are imported at module level, so that
the CPU-feature parser is testable without Keras.
"""

import importlib.util
import os
import platform
import sys

from frcnn.precision import BF16_CPU_FLAGS, cpu_flags

# /proc/cpuinfo flags that decide which precisions run natively on an x86 CPU.
FEATURE_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def parse_cpuinfo(text):
    """``/proc/cpuinfo`` text -> ``{"model": str, "logical_cpus": int, "flags": {flag: bool}}`` for
    :data:`FEATURE_FLAGS`. The model name and flags come from the first processor block that has them (ARM's
    ``Features`` line counts as flags)."""
    model, count = None, 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "processor":
            count += 1
        elif key == "model name" and model is None:
            model = value.strip()
    flags = cpu_flags(text)  # the flags as frcnn's train.mixed_precision=auto reads them
    return {"model": model or "unknown", "logical_cpus": count,
            "flags": {name: name in flags for name in FEATURE_FLAGS}}


def native_bfloat16(cpu):
    """True when the CPU computes bfloat16 natively (AVX512_BF16 dot products or AMX-BF16 tiles)."""
    return any(cpu["flags"].get(flag) for flag in BF16_CPU_FLAGS)


def default_precisions(cpu, gpus):
    """float32 always; ``mixed_bfloat16`` where the CPU has native bfloat16 or there is a GPU; ``mixed_float16`` on a
    GPU. Elsewhere bfloat16 is emulated and slower than float32 (docs/NOTES.md), so it is not measured unless asked."""
    chosen = ["float32"]
    if gpus or native_bfloat16(cpu):
        chosen.append("mixed_bfloat16")
    if gpus:
        chosen.append("mixed_float16")
    return chosen


def accelerators(backend):
    """Names of the GPUs the backend sees (empty on a CPU-only machine)."""
    if backend == "tensorflow":
        import tensorflow as tf

        return [tf.config.experimental.get_device_details(d).get("device_name", d.name)
                for d in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def _importable(module):
    """Whether ``module`` can be imported (installed, and not hidden by a ``None`` in ``sys.modules``)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def load_average():
    """The 1-minute load average: other work on the machine shows here and slows every figure."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def describe():
    """The machine and software, as the report prints them."""
    import keras

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = parse_cpuinfo(f.read())
    except OSError:
        cpu = parse_cpuinfo("")
        cpu["model"] = platform.processor() or "unknown"
    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__}
    for module in ("tensorflow", "jax", "torch"):
        # The backend's library, and TensorFlow wherever it is installed (tf.data feeds every backend there).
        if module == backend or (module == "tensorflow" and _importable(module)):
            versions[module] = __import__(module).__version__
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "usable_cores": usable, "backend": backend, "gpus": accelerators(backend),
            "versions": versions, "load_average_start": load_average()}
