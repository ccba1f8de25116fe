"""Export a trained model as a TensorFlow SavedModel for serving.

    python tools/export.py --weights W [--config C] --out DIR [--set key=value ...]

Signatures: serving_default takes a 1-D string tensor of encoded images (JPEG, PNG, BMP, GIF), detect_image one
H x W x 3 uint8 RGB image; both return boxes (x1, y1, x2, y2 in original pixels), scores, classes and
num_detections. Class names are in DIR/assets.extra/classes.txt. The EXIF orientation of JPEG files is not applied
(TensorFlow's decoder ignores it): send upright images. The config defaults to the run's config.yaml beside the
weights. Exit code 0 on success, 2 on an error.

    import tensorflow as tf
    detector = tf.saved_model.load(DIR)
    out = detector.signatures["serving_default"](images=tf.constant([open("dog.jpg", "rb").read()]))
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="checkpoint, e.g. runs/shapes/checkpoints/best.weights.h5, a Detectron2 "
                             "model_final_*.pkl or detectron2:<zoo name> (see README)")
    parser.add_argument("--config", help="config name or path (default: the config.yaml saved with the weights)")
    parser.add_argument("--out", required=True, help="folder of the SavedModel (replaced if it holds one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.score_thresh=0.3 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow"):  # SavedModel writing logs variable renames and asset paths at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from frcnn import export, inference
    from frcnn.config import ConfigError
    from frcnn.data import DataError
    from frcnn.training import TrainingError

    try:
        model, cfg, _ = inference.load_trained_model(args.weights, args.config, args.overrides)
        path = export.export_saved_model(model, args.out)
    except (ConfigError, DataError, TrainingError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"SavedModel: {path}")
    print(f"  {export.SERVING_SIGNATURE}: images (N,) string (encoded images) -> boxes, scores, classes, "
          "num_detections")
    print(f"  {export.IMAGE_SIGNATURE}: image (H, W, 3) uint8 RGB -> boxes, scores, classes, num_detections")
    print(f"  classes: {', '.join(cfg.data.classes)} (ids 1..{len(cfg.data.classes)}; "
          f"{export.EXTRA_DIR}/classes.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
