"""The detector's benchmark as a small package; run it with ``python benchmarks/benchmark.py`` (see README.md).

- :mod:`benchmarks.machine`: processor features from ``/proc/cpuinfo``, accelerators, the precisions to measure;
- :mod:`benchmarks.workload`: the config per variant, ``frcnn.build_model``, synthetic batches, the timed tasks;
- :mod:`benchmarks.measure`: interleaved timing with warm-up and medians, peak memory, compiled functions on any
  backend, the large-matmul reference;
- :mod:`benchmarks.flops`: analytic FLOPs per stage, per inference and per training step;
- :mod:`benchmarks.report`: the printed report and the JSON.
"""
