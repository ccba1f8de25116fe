"""Detect objects in images with a trained model.

    frcnn-infer IMAGE [IMAGE|FOLDER|GLOB ...] --weights W [--config C] [--out DIR]
                [--score-thresh T] [--batch-size N] [--set key=value ...]

In a checkout, ``python tools/infer.py`` takes the same arguments.

Writes each image with its detections drawn, and one detections.json (boxes in original pixels), to --out, and
prints a table. The config is the run's config.yaml found beside the weights (or in the folder above), unless
--config is given. An image that cannot be read is reported and skipped; the exit code is then 1 (0 when every image
was processed, 2 when the model cannot be loaded).
"""

import os
import sys

from frcnn import cli


def parse_args(argv):
    parser = cli.make_parser(__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, folders (their .jpg/.jpeg/.png/.bmp files) or glob patterns (quoted)")
    cli.add_weights(parser)
    cli.add_config(parser)
    parser.add_argument("--out", default=os.path.join("runs", "infer"),
                        help="output folder for annotated images and detections.json (default: runs/infer)")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="keep detections scoring at least this (default: 0.5); lowers roi_heads.score_thresh "
                             "when below it")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: "
                                                                     "eval.batch_size of the config)")
    cli.add_overrides(parser, "roi_heads.max_detections=50")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_thresh <= 1.0:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


def _infer(args):
    from frcnn import inference

    inference.check_output_dir(args.out)  # before the model and the images: fail in a second, not at the end
    with inference.own_output_dir(args.out):  # a second infer run into the same --out is refused
        return _infer_owned(args)


def _infer_owned(args):
    from frcnn import inference, loading
    from frcnn.report import format_table

    model, cfg, config_path = loading.load_trained_model(args.weights, args.config, args.overrides,
                                                         score_thresh=args.score_thresh)
    paths, problems = inference.expand_inputs(args.images)
    for _, message in problems:
        cli.error(message)

    def report(path, message):
        cli.error(f"{message} (skipped)")

    results, failures = inference.detect_files(model, paths, args.batch_size or cfg.eval.batch_size,
                                               args.score_thresh, args.out,
                                               on_error=report)
    json_path = inference.save_detections(
        os.path.join(args.out, "detections.json"), results, problems + failures,
        weights=args.weights if args.weights.startswith("detectron2:") else os.path.abspath(args.weights),
        config=config_path, score_thresh=args.score_thresh,
        classes=list(cfg.data.classes),
    )
    print(format_table(results))
    failed = len(problems) + len(failures)
    total = sum(len(r.scores) for r in results)
    print(f"{len(results)} images, {total} detections (score >= {args.score_thresh:g})"
          + (f", {failed} failed (see above)" if failed else ""))
    print(f"annotated images and {os.path.basename(json_path)}: {args.out}")
    return 1 if failed or not results else 0


def main(argv=None):
    args = parse_args(argv)
    cli.setup_logging()
    # OSError: the output folder cannot be created or written.
    return cli.run(lambda: _infer(args), also=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
