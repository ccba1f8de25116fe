"""Train Faster R-CNN: ``python tools/train.py [--config shapes.yaml] [--set key=value ...] [--workdir DIR]``.

With no --config it trains on the synthetic ``shapes`` dataset (generated on first use, no download) and ends by
printing the validation mAP and the path of an annotated prediction image. Running the same command again resumes
from the work directory's last checkpoint.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes.yaml", help="config name in configs/ or a path (default: shapes.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
    parser.add_argument("--workdir", help="where checkpoints, logs and the resolved config go "
                                          "(default: runs/<config name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from frcnn import engine, load_config
    from frcnn.config import ConfigError
    from frcnn.data import DataError
    from frcnn.training import TrainingError

    try:
        cfg = load_config(args.config, args.overrides)
        workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
        model, result = engine.train(cfg, workdir, verbose=0 if args.quiet else 1)
    except (ConfigError, DataError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if result["metrics"] is not None:
        engine.print_metrics(result["metrics"], model.class_names[1:])
        print(f"validation mAP: AP {result['metrics']['AP']:.4f}, AP50 {result['metrics']['AP50']:.4f}, "
              f"VOC07 mAP50 {result['metrics']['voc07_mAP50']:.4f}")
    print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
    if result["prediction_image"]:
        print(f"annotated prediction image: {result['prediction_image']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
