"""One shapes training (by default the default recipe, configs/shapes.yaml) with its wall time, AP and AP50.

    KERAS_BACKEND=jax python benchmarks/shapes_run.py --workdir /tmp/shapes --json shapes.json
    KERAS_BACKEND=jax python benchmarks/shapes_run.py --workdir /tmp/shapes --steps 1000    # half the steps

``--steps`` changes only ``train.steps_per_epoch`` (it must be a multiple of ``train.epochs``), so the learning-rate
decay and the validations stay at the same fractions of the run. The data is generated first (under ``--data-root``,
default ``<workdir>/data``) and timed apart, then ``frcnn.engine.train`` runs as ``tools/train.py`` runs it
(validation, checkpoints, TensorBoard logs), timed as a whole. A SIGTERM or Ctrl-C stops the training as it stops
``tools/train.py`` (checkpoint saved); the JSON then says how far it got (``completed: false``, the step and the best
validation AP of the last checkpoint).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def log(message):
    print(f"[shapes_run {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes.yaml", help="config (default shapes.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--steps", type=int, help="training steps in all (default: the config's epochs x "
                                                  "steps_per_epoch); a multiple of train.epochs")
    parser.add_argument("--workdir", required=True, help="the run's work directory (must not hold another run)")
    parser.add_argument("--data-root", help="where the shapes data is generated (default <workdir>/data)")
    parser.add_argument("--json", help="write the result to this JSON file")
    return parser.parse_args(argv)


def resolve_config(args):
    """The config of the run: ``--config`` + ``--set`` + the data root + the steps."""
    from frcnn.config import load_config

    overrides = [f"data.root={args.data_root or os.path.join(args.workdir, 'data')}"] + list(args.overrides)
    cfg = load_config(args.config, overrides)
    epochs = cfg.train.epochs
    if args.steps is not None:
        if args.steps < epochs or args.steps % epochs:
            raise SystemExit(f"--steps {args.steps} must be a multiple of train.epochs={epochs}")
        overrides.append(f"train.steps_per_epoch={args.steps // epochs}")
        cfg = load_config(args.config, overrides)
    if not cfg.train.steps_per_epoch:
        raise SystemExit("the config must set train.steps_per_epoch (or pass --steps)")
    return cfg, overrides


def device_of(backend):
    from benchmarks import machine

    gpus = machine.accelerators(backend)
    return ", ".join(gpus) if gpus else "cpu"


def run(args):
    import keras

    from frcnn import engine
    from frcnn.checkpoints import read_state
    from frcnn.data.shapes import ensure_shapes

    cfg, overrides = resolve_config(args)
    backend = keras.backend.backend()
    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    result = {"config": args.config, "overrides": overrides, "backend": backend, "device": device_of(backend),
              "steps": steps, "batch_size": cfg.train.batch_size, "mixed_precision": cfg.train.mixed_precision,
              "num_rois": cfg.roi_heads.num_rois, "completed": False}
    start = time.perf_counter()
    result["generate_s"] = result["train_s"] = 0.0
    try:
        ensure_shapes(cfg)
    except KeyboardInterrupt:
        result["generate_s"] = time.perf_counter() - start
        result.update(stopped="interrupted while generating the data", steps_done=0, best_val_AP=None,
                      wall_s=result["generate_s"])
        return result
    result["generate_s"] = time.perf_counter() - start
    log(f"data ready in {result['generate_s']:.1f} s; training {steps} steps on {backend} ({result['device']})")
    start = time.perf_counter()
    try:
        _, out = engine.train(cfg, os.path.join(args.workdir, "run"), verbose=0)
    except KeyboardInterrupt as err:
        result["stopped"] = str(err.args[0]) if err.args else "interrupted"
        state = read_state(os.path.join(args.workdir, "run", "checkpoints")) or {}
        result["steps_done"] = state.get("global_step")
        result["best_val_AP"] = state.get("best")
    else:
        metrics = out["metrics"] or {}
        result.update(completed=True, steps_done=steps, AP=metrics.get("AP"), AP50=metrics.get("AP50"),
                      voc07_mAP50=metrics.get("voc07_mAP50"), last_loss=(out["history"].get("loss") or [None])[-1])
    result["train_s"] = time.perf_counter() - start
    result["wall_s"] = result["generate_s"] + result["train_s"]
    return result


def render(result):
    if result["completed"]:
        figures = f"AP {result['AP']:.4f}, AP50 {result['AP50']:.4f}"
    else:
        figures = (f"stopped ({result.get('stopped')}) at step {result.get('steps_done')}, best validation AP "
                   f"so far {result.get('best_val_AP')}")
    return (f"shapes training {result['config']} ({result['steps']} steps of batch {result['batch_size']}, "
            f"{result['num_rois']} ROIs, mixed_precision {result['mixed_precision']}) on {result['backend']} "
            f"({result['device']}): {figures}; training {result['train_s']:.1f} s (validation, checkpoints and "
            f"compilation included), data generation {result['generate_s']:.1f} s")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    print(render(result), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
