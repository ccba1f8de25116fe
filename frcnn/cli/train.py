"""Train Faster R-CNN: ``frcnn-train [--config shapes.yaml] [--set key=value ...] [--workdir DIR]``.

In a checkout, ``python tools/train.py`` takes the same arguments.

With no --config it trains on the synthetic ``shapes`` dataset (generated on first use, no download) and ends by
printing the validation mAP and the path of an annotated prediction image. Running the same command again resumes
from the work directory's last checkpoint.
"""

import os
import sys

from frcnn import cli


def parse_args(argv):
    parser = cli.make_parser(__doc__)
    cli.add_config(parser, "shapes.yaml", "config name in configs/ or a path (default: shapes.yaml)")
    cli.add_overrides(parser, "train.lr=0.01")
    parser.add_argument("--workdir", help="where checkpoints, logs and the resolved config go "
                                          "(default: runs/<config name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _train(args):
    from frcnn import engine, load_config
    from frcnn.report import format_report

    cfg = load_config(args.config, args.overrides)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    model, result = engine.train(cfg, workdir, verbose=0 if args.quiet else 1)
    if result["metrics"] is not None:
        print(format_report(result["metrics"], model.class_names[1:]))
        print(f"validation mAP: AP {result['metrics']['AP']:.4f}, AP50 {result['metrics']['AP50']:.4f}, "
              f"VOC07 mAP50 {result['metrics']['voc07_mAP50']:.4f}")
    print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
    if result["prediction_image"]:
        print(f"annotated prediction image: {result['prediction_image']}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    cli.setup_logging()
    return cli.run(lambda: _train(args))


if __name__ == "__main__":
    sys.exit(main())
