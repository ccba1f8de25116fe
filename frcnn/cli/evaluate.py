"""COCO-style (pycocotools) and Pascal VOC07 evaluation.

Evaluate a trained model on a dataset split:

    frcnn-evaluate --weights W [--config C] [--split val] [--out DIR] [--max-images N]
                   [--set key=value ...] [--quiet]

Score an existing COCO results file against a COCO annotation file (no model):

    frcnn-evaluate --results R.json --annotations GT.json [--out DIR]

In a checkout, ``python tools/evaluate.py`` takes the same arguments.

Prints the 12 COCOeval numbers and a per-class table (COCO AP, AP50, VOC07 11-point AP50) and writes metrics.json to
--out; a model evaluation also writes results.json (COCO results format) and gt.json (the ground truth as evaluated,
COCO format) so the detections can be scored again. The config defaults to the run's config.yaml beside the weights,
the split to data.val_split. Exit code 0 on success, 2 on an error.
"""

import os
import sys

from frcnn import cli


def parse_args(argv):
    parser = cli.make_parser(__doc__)
    cli.add_weights(parser, required=False, help_text="checkpoint to evaluate, e.g. "
                    "runs/voc/checkpoints/best.weights.h5, a Detectron2 model_final_*.pkl or detectron2:<zoo name> "
                    "(see README)")
    cli.add_config(parser)
    parser.add_argument("--split", help="dataset split (default: data.val_split of the config)")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    cli.add_overrides(parser, "data.root=/data/VOC2007")
    parser.add_argument("--results", help="a COCO results JSON to score (with --annotations, no model)")
    parser.add_argument("--annotations", help="the COCO annotation JSON to score --results against")
    parser.add_argument("--out", default=os.path.join("runs", "evaluate"),
                        help="output folder for metrics.json (and results.json, gt.json) (default: runs/evaluate)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.results or args.annotations:
        if not (args.results and args.annotations):
            parser.error("--results and --annotations go together")
        extra = [name for name in ("weights", "config", "split", "max_images") if getattr(args, name) is not None]
        if extra or args.overrides:
            parser.error("--results/--annotations score a file without a model; drop "
                         + ", ".join("--" + n.replace("_", "-") for n in extra + (["set"] if args.overrides else [])))
    elif not args.weights:
        parser.error("give --weights (evaluate a model) or --results and --annotations (score a results file)")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be positive, got {args.max_images}")
    return args


def _score_file(args):
    from frcnn import evaluation
    from frcnn.report import format_report

    try:
        metrics, class_names = evaluation.score_results_file(args.results, args.annotations)
    except ValueError as err:  # an unreadable or malformed file, named in the message
        return cli.error(err)
    metrics["results_file"] = os.path.abspath(args.results)
    metrics["annotation_file"] = os.path.abspath(args.annotations)
    path = os.path.join(args.out, "metrics.json")
    evaluation.save_json(metrics, path)
    print(format_report(metrics, class_names))
    print(f"metrics: {path}")
    return 0


def _evaluate_model(args):
    from frcnn import evaluation, loading
    from frcnn.config import ConfigError
    from frcnn.report import format_report

    model, cfg, _ = loading.load_trained_model(args.weights, args.config, args.overrides)
    split = args.split or cfg.data.val_split
    if not split:
        raise ConfigError("data.val_split is not set in the config; name the split with --split")
    metrics, files = evaluation.evaluate_split(model, cfg, split, args.out, args.max_images,
                                               verbose=0 if args.quiet else 1)
    print(format_report(metrics, model.class_names[1:]))
    print(f"split '{split}': {metrics['num_images']} images, {metrics['num_detections']} detections")
    unreadable = metrics.get("unreadable_images") or []
    if unreadable:
        print(f"{len(unreadable)} images could not be read; their objects count as missed: {', '.join(unreadable)}")
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    cli.setup_logging()
    # OSError: the output folder cannot be written.
    return cli.run(lambda: _score_file(args) if args.results else _evaluate_model(args), also=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
