"""Images per second of the two input pipelines: ``tf.data`` against the NumPy pipeline (``keras.utils.PyDataset``).

Training mode (shuffle, flip, resize, pad, ground truth) on a VOC-layout dataset (default: the raccoon photos beside
the project), at ``--min-size`` / ``--max-size``, batch ``--batch-size``. Each round times ``--batches`` batches
after ``--warmup`` untimed ones, from a freshly built dataset; the variants run interleaved, round after round, so
that a change in the machine's load hits all of them; the report gives the median and the spread of the rounds, the
median CPU time per image (all the process's threads, TensorFlow's included: less sensitive to a shared machine's
load than the wall-clock rate) and the 1-minute load average before and after.

Variants:
- ``tf.data``: ``frcnn.data.build_dataset(..., pipeline="tf")`` iterated as ``fit`` does on TensorFlow (tensors
  stay tensors).
- ``numpy iterate``: the NumPy pipeline iterated directly (its thread pool decodes image by image ahead), as the
  evaluation does.
- ``numpy fit``: the NumPy pipeline through Keras' own data adapter, the worker threads ``fit`` uses (one batch per
  worker), as training on JAX and PyTorch does.

    python benchmarks/input_pipeline.py                       # raccoon, 600/1000, batch 2
    python benchmarks/input_pipeline.py --rounds 7 --json pipelines.json
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _config(root, min_size, max_size):
    from frcnn.config import config_from_dict

    return config_from_dict({"data": {"format": "voc", "root": root, "train_split": "train", "val_split": None},
                             "input": {"min_size": min_size, "max_size": max_size}})


def _batches(variant, cfg, records, batch_size):
    """``(iterator, stop)`` over the variant's training batches."""
    from frcnn import data

    if variant == "tf.data":
        return iter(data.build_dataset(cfg, records, True, batch_size, pipeline="tf")), lambda: None
    dataset = data.build_dataset(cfg, records, True, batch_size, pipeline="numpy")
    if variant == "numpy iterate":
        iterator = iter(dataset)
        return iterator, iterator.close  # closing the generator shuts its thread pool down
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # what fit wraps it in

    adapter = PyDatasetAdapter(dataset)
    adapter.on_epoch_begin()
    return iter(adapter.get_numpy_iterator()), adapter.on_epoch_end  # stops the worker threads


def _round(variant, cfg, records, batch_size, warmup, batches):
    iterator, stop = _batches(variant, cfg, records, batch_size)
    try:
        for _ in itertools.islice(iterator, warmup):
            pass
        start, cpu = time.perf_counter(), time.process_time()
        for _ in itertools.islice(iterator, batches):
            pass
        images = batches * batch_size
        return images / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / images
    finally:
        stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "raccoon"))
    parser.add_argument("--min-size", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="tf.data,numpy iterate,numpy fit")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    import keras

    from frcnn import data
    from frcnn.data.records import decode_workers

    cfg = _config(args.root, args.min_size, args.max_size)
    cfg = data.resolve_classes(cfg)
    records, _, _ = data.load_records(cfg, "train")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    load_before = os.getloadavg()[0]
    rates, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            rate, cpu_ms = _round(variant, cfg, records, args.batch_size, args.warmup, args.batches)
            rates[variant].append(rate)
            cpu[variant].append(cpu_ms)
    load_after = os.getloadavg()[0]

    print(f"{len(records)} training images of {args.root}, {args.min_size}/{args.max_size}, batch {args.batch_size}, "
          f"{args.batches} timed batches x {args.rounds} interleaved rounds; {os.cpu_count()} cores, "
          f"NumPy workers {decode_workers(cfg.data.num_parallel_calls)}; Keras {keras.__version__} "
          f"({keras.backend.backend()}); load average {load_before:.2f} -> {load_after:.2f}")
    print(f"{'variant':<16} {'median img/s':>12} {'min':>8} {'max':>8} {'CPU ms/img':>11}")
    for variant, values in rates.items():
        print(f"{variant:<16} {statistics.median(values):>12.1f} {min(values):>8.1f} {max(values):>8.1f} "
              f"{statistics.median(cpu[variant]):>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "images": len(records), "cores": os.cpu_count(),
                       "load_average": [load_before, load_after], "images_per_second": rates,
                       "cpu_ms_per_image": cpu}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
