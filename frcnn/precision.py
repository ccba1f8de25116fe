"""What the machine offers, and the choices that follow from it: the precision to compute in, and the speed paths.

Precision: ``train.mixed_precision`` (``off``, ``mixed_float16``, ``mixed_bfloat16``,
``auto``) turned into a Keras dtype policy, and what the machine offers natively.

``auto`` picks ``mixed_bfloat16`` where the hardware computes bfloat16 natively, ``float32`` elsewhere:

- x86 CPUs with ``avx512_bf16`` or ``amx_bf16`` (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and
  later): oneDNN runs bfloat16 convolutions and matrix products there several times faster than float32;
- NVIDIA GPUs of compute capability 8.0 or more (A100, H100, RTX 30xx and later) under TensorFlow or JAX.

Without native support bfloat16 is emulated and SLOWER than float32 (measured in docs/NOTES.md), so ``auto`` never
picks it there. It never picks ``mixed_float16`` either: float16 needs loss scaling and has no CPU kernels.

Speed paths (``train.speed_paths``): kernels chosen by measurement on a CPU (res5 and the RPN's 3x3 convolution as
matrix products in training, fused optimizer kernels on TensorFlow). ``auto`` turns them on only where the model
computes on a CPU, the one place they were measured; ``on`` and ``off`` force them.

Owns: device and precision questions. Imports no backend at import time (each is asked only under itself).
"""

import functools
import logging

log = logging.getLogger(__name__)

POLICIES = {"off": "float32", "mixed_float16": "mixed_float16", "mixed_bfloat16": "mixed_bfloat16"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo_text=None):
    """The feature flags of the first processor in ``/proc/cpuinfo`` (or of ``cpuinfo_text``); empty where the
    file does not exist (macOS, Windows)."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo_text = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | ARM
            return frozenset(value.split())
    return frozenset()


def _gpu_capabilities():
    """Compute capabilities ``(major, minor)`` of the visible NVIDIA GPUs, for the current Keras backend."""
    import keras

    caps = []
    try:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                cap = tf.config.experimental.get_device_details(gpu).get("compute_capability")
                if cap:
                    caps.append(tuple(cap))
        elif keras.backend.backend() == "jax":
            import jax

            for device in jax.devices():
                cap = getattr(device, "compute_capability", None)
                if device.platform == "gpu" and cap:
                    caps.append(tuple(int(v) for v in str(cap).split(".")[:2]))
        elif keras.backend.backend() == "torch":
            import torch

            if torch.cuda.is_available():
                caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception as err:  # a broken driver must not stop the run: fall back to the CPU answer
        log.warning("could not query the GPUs (%s: %s)", type(err).__name__, err)
    return caps


def accelerator_present():
    """Whether the current Keras backend computes on an accelerator (a GPU or TPU) rather than the CPU."""
    import keras

    try:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
        if keras.backend.backend() == "jax":
            import jax

            return jax.default_backend() != "cpu"
        if keras.backend.backend() == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception as err:  # a broken driver must not stop the run: fall back to the CPU answer
        log.warning("could not query the accelerators (%s: %s)", type(err).__name__, err)
    return False


def speed_paths_on(setting):
    """``train.speed_paths`` (``auto``, ``on``, ``off``) -> whether to use the speed paths measured on a CPU."""
    if setting == "auto":
        return not _accelerator_cached()
    return setting == "on"


@functools.lru_cache(maxsize=None)
def _accelerator_cached():
    return accelerator_present()


def native_bfloat16(flags=None, gpu_capabilities=None):
    """``(True/False, reason)``: whether the device that will compute has native bfloat16 arithmetic."""
    caps = _gpu_capabilities() if gpu_capabilities is None else gpu_capabilities
    if caps:
        ok = all(cap >= (8, 0) for cap in caps)
        names = ", ".join(f"{a}.{b}" for a, b in caps)
        return ok, f"GPU compute capability {names} ({'>=' if ok else '<'} 8.0)"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, f"CPU has none of {', '.join(BF16_CPU_FLAGS)}"


@functools.lru_cache(maxsize=None)
def _auto_policy():
    ok, reason = native_bfloat16()
    policy = "mixed_bfloat16" if ok else "float32"
    # Printed, not logged: the choice must be seen also where no logging is set up (the tools log at INFO, where a
    # log line as well would say it twice).
    print(f"precision: auto -> {policy} ({reason})")
    return policy


def resolve_policy(mixed_precision):
    """The Keras dtype policy name for a ``train.mixed_precision`` value (``auto`` decided once per process)."""
    if mixed_precision == "auto":
        return _auto_policy()
    return POLICIES[mixed_precision]
