"""Detect objects in images with a trained model.

    python tools/infer.py IMAGE [IMAGE|FOLDER|GLOB ...] --weights W [--config C] [--out DIR]
                          [--score-thresh T] [--batch-size N] [--set key=value ...]

Writes each image with its detections drawn, and one detections.json (boxes in original pixels), to --out, and
prints a table. The config is the run's config.yaml found beside the weights (or in the folder above), unless
--config is given. An image that cannot be read is reported and skipped; the exit code is then 1 (0 when every
image was processed, 2 when the model cannot be loaded).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, folders (their .jpg/.jpeg/.png/.bmp files) or glob patterns (quoted)")
    parser.add_argument("--weights", required=True,
                        help="checkpoint, e.g. runs/shapes/checkpoints/best.weights.h5, a Detectron2 "
                             "model_final_*.pkl or detectron2:COCO-Detection/faster_rcnn_R_50_C4_3x (see README)")
    parser.add_argument("--config", help="config name or path (default: the config.yaml saved with the weights)")
    parser.add_argument("--out", default=os.path.join("runs", "infer"),
                        help="output folder for annotated images and detections.json (default: runs/infer)")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="keep detections scoring at least this (default: 0.5); lowers model.score_thresh "
                             "when below it")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: "
                                                                     "eval.batch_size of the config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.max_detections=50 (repeatable)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_thresh <= 1.0:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from frcnn import inference
    from frcnn.config import ConfigError
    from frcnn.data import DataError
    from frcnn.training import TrainingError

    try:
        inference.check_output_dir(args.out)  # before the model and the images: fail in a second, not at the end
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        model, cfg, config_path = inference.load_trained_model(args.weights, args.config, args.overrides,
                                                               score_thresh=args.score_thresh)
    except (ConfigError, DataError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    paths, problems = inference.expand_inputs(args.images)
    for _, message in problems:
        print(f"error: {message}", file=sys.stderr)

    def report(path, message):
        print(f"error: {message} (skipped)", file=sys.stderr)

    try:
        results, failures = inference.detect_files(model, paths, args.batch_size, args.score_thresh, args.out,
                                                   on_error=report)
        json_path = inference.save_detections(
            os.path.join(args.out, "detections.json"), results, problems + failures,
            weights=args.weights if args.weights.startswith("detectron2:") else os.path.abspath(args.weights),
            config=config_path, score_thresh=args.score_thresh,
            classes=list(cfg.data.classes),
        )
    except OSError as err:  # the output folder cannot be created or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(inference.format_table(results))
    failed = len(problems) + len(failures)
    total = sum(len(r.scores) for r in results)
    print(f"{len(results)} images, {total} detections (score >= {args.score_thresh:g})"
          + (f", {failed} failed (see above)" if failed else ""))
    print(f"annotated images and {os.path.basename(json_path)}: {args.out}")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
