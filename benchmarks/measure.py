"""Timing and memory: interleaved rounds, medians, peak memory per call, compiled functions on any backend, and the
large-matmul reference.

Habits (docs/NOTES.md): every task is warmed up before it is timed (the first call traces and compiles); the tasks
being compared run in interleaved rounds, so that a burst of other work on a shared machine slows all of them
alike instead of one; each figure is the median of its rounds, and every run is kept for the JSON.
"""

import statistics
import sys
import time

import numpy as np

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def block(outputs):
    """Wait until every tensor in ``outputs`` is computed (accelerators and JAX run asynchronously); the return
    value is for waiting only."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready(outputs)
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return outputs
    # TensorFlow: fetching one element of each output waits for it, without copying a large tensor off a GPU.
    import tensorflow as tf

    return keras.tree.map_structure(lambda t: tf.reshape(t, [-1])[:1].numpy() if tf.is_tensor(t) else t, outputs)


class PeakMemory:
    """Peak host memory (resident set) of this process during a call, and the accelerator's where the backend
    reports it.

    On Linux the kernel's high-water mark (``VmHWM``) is reset to the current RSS before each call (writing 5 to
    ``/proc/self/clear_refs``), so the peak belongs to that call. Elsewhere only the process's lifetime maximum
    exists (``ru_maxrss``); ``resettable`` says which one the figures are.
    """

    def __init__(self, backend):
        self.backend = backend
        self.resettable = self._reset_rss()

    @staticmethod
    def _reset_rss():
        try:
            with open(_CLEAR_REFS, "w", encoding="ascii") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def rss_mb(field="VmHWM"):
        try:
            with open(_PROC_STATUS, encoding="ascii") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux

    def reset(self):
        if self.resettable:
            self._reset_rss()
        if self.backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                tf.config.experimental.reset_memory_stats("GPU:0")
        elif self.backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    def peak(self):
        """``{"rss_mb": host peak, "device_mb": accelerator peak or None}`` since the last :meth:`reset`."""
        device = None
        if self.backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                device = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        elif self.backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform == "gpu" else None
            if stats and "peak_bytes_in_use" in stats:
                device = stats["peak_bytes_in_use"] / 2**20  # JAX keeps no resettable peak: lifetime maximum
        elif self.backend == "torch":
            import torch

            if torch.cuda.is_available():
                device = torch.cuda.max_memory_allocated() / 2**20
        return {"rss_mb": self.rss_mb(), "device_mb": device}


def interleaved(tasks, warmup=1, repeats=3, memory=None, log=None):
    """Time every task of ``tasks`` (``{name: fn}``, each ``fn()`` blocking until its result exists).

    ``warmup`` untimed rounds, then ``repeats`` timed rounds; each round runs every task once, and the starting task
    moves by one each round so that no task always runs first. Returns ``{name: {"median", "runs", "warmup",
    "peak"}}``, ``peak`` the largest :meth:`PeakMemory.peak` over the task's timed runs (``None`` without
    ``memory``)."""
    names = list(tasks)
    results = {name: {"runs": [], "warmup": [], "peak": None} for name in names}
    for round_ in range(warmup + repeats):
        timed = round_ >= warmup
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if memory is not None:
                memory.reset()
            start = time.perf_counter()
            tasks[name]()
            seconds = time.perf_counter() - start
            results[name]["runs" if timed else "warmup"].append(seconds)
            if memory is not None and timed:
                peak = memory.peak()
                old = results[name]["peak"]
                results[name]["peak"] = peak if old is None else {k: _max(old[k], peak[k]) for k in peak}
            if log:
                log(f"{'round' if timed else 'warm-up'} {round_ - warmup + 1 if timed else round_ + 1}: "
                    f"{name} {seconds:.3f} s")
    for result in results.values():
        result["median"] = statistics.median(result["runs"]) if result["runs"] else None
    return results


def _max(a, b):
    return b if a is None else a if b is None else max(a, b)


def compile_fn(fn, variables, jit_compile):
    """``fn(*tensors)`` (which calls Keras layers) as one compiled function of the current backend.

    TensorFlow: ``tf.function`` (XLA when ``jit_compile``). JAX: ``jax.jit`` (always XLA) of a pure version of
    ``fn`` that reads ``variables`` from its arguments through ``keras.StatelessScope``, as Keras' own JAX
    trainer does, so the weights are not baked into the program as constants. PyTorch: ``fn`` itself (eager).
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=bool(jit_compile))
    if backend == "jax":
        import jax

        pure, values = _stateless(fn, variables)
        jitted = jax.jit(pure)
        return lambda *args: jitted(values(), *args)
    return fn


def _stateless(fn, variables):
    """``(pure, values)`` for JAX: ``pure(values, *args)`` calls ``fn(*args)`` reading ``variables`` from its first
    argument through ``keras.StatelessScope`` (as Keras' own JAX trainer does, so that the weights are arguments of
    the compiled program, not constants baked into it); ``values()`` gives their current values."""
    import keras

    variables = list(variables)

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    return pure, lambda: [v.value for v in variables]


def gradient_fn(fn, variables, jit_compile, wrt_input=True):
    """The backward pass of ``fn(x, *rest)`` as one compiled function of the current backend: it returns the
    gradients of the float32 sum of ``fn``'s outputs with respect to ``variables`` and, when ``wrt_input``, ``x``.

    What a training step computes for one part of the model (its forward pass, its weight gradients and, when
    something before it trains, the gradient it sends back), compiled as :func:`compile_fn` compiles the forward
    pass: ``tf.function`` with ``tf.GradientTape`` (XLA when ``jit_compile``), ``jax.jit`` of ``jax.grad`` over the
    pure function of :func:`_stateless`, or eager ``torch.autograd.grad``.
    """
    import keras
    from keras import ops

    backend = keras.backend.backend()
    variables = list(variables)

    def total(out):
        return sum(ops.sum(ops.cast(o, "float32")) for o in keras.tree.flatten(out))

    if backend == "tensorflow":
        import tensorflow as tf

        def grads(x, *rest):
            with tf.GradientTape() as tape:
                if wrt_input:
                    tape.watch(x)
                loss = total(fn(x, *rest))
            return tape.gradient(loss, ([x] if wrt_input else []) + variables)

        return tf.function(grads, jit_compile=bool(jit_compile))
    if backend == "jax":
        import jax

        pure, values = _stateless(lambda *args: total(fn(*args)), variables)
        jitted = jax.jit(jax.grad(pure, argnums=(0, 1) if wrt_input else 0))
        return lambda x, *rest: jitted(values(), x, *rest)
    import torch

    def grads(x, *rest):
        if wrt_input:
            x = x.detach().requires_grad_(True)
        targets = ([x] if wrt_input else []) + [v.value for v in variables]
        return torch.autograd.grad(total(fn(x, *rest)), targets, allow_unused=True)

    return grads


def matmul_task(size, dtype, jit_compile=False):
    """A task timing ``size x size @ size x size`` in ``dtype`` (compiled, summed in float32 so that only a scalar
    comes back) and the FLOPs of one call, ``2 * size**3``."""
    from keras import ops

    rng = np.random.default_rng(0)
    a = ops.cast(ops.convert_to_tensor(rng.standard_normal((size, size), dtype=np.float32)), dtype)
    b = ops.cast(ops.convert_to_tensor(rng.standard_normal((size, size), dtype=np.float32)), dtype)
    product = compile_fn(lambda x, y: ops.sum(ops.cast(ops.matmul(x, y), "float32")), (), jit_compile)
    return (lambda: block(product(a, b))), 2 * size**3
