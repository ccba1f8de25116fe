"""Export a trained model as a TensorFlow SavedModel for serving.

    frcnn-export --weights W [--config C] --out DIR [--set key=value ...]

In a checkout, ``python tools/export.py`` takes the same arguments.

Signatures: serving_default takes a 1-D string tensor of encoded images (JPEG, PNG, BMP, GIF), detect_image one
H x W x 3 uint8 RGB image; both return boxes (x1, y1, x2, y2 in original pixels), scores, classes and
num_detections (serving_default also decoded: false for a string that does not decode, which gets no detections
instead of failing the batch). Class names are in DIR/assets.extra/classes.txt (and classes.json). The EXIF
orientation of JPEG files is not applied (TensorFlow's decoder ignores it): send upright images. The config
defaults to the run's config.yaml beside the weights. Exit code 0 on success, 2 on an error.

    import tensorflow as tf
    detector = tf.saved_model.load(DIR)
    out = detector.signatures["serving_default"](images=tf.constant([open("dog.jpg", "rb").read()]))
"""

import sys

from frcnn import cli


def parse_args(argv):
    parser = cli.make_parser(__doc__)
    cli.add_weights(parser)
    cli.add_config(parser)
    parser.add_argument("--out", required=True, help="folder of the SavedModel (replaced if it holds one)")
    cli.add_overrides(parser, "roi_heads.score_thresh=0.3")
    return parser.parse_args(argv)


def _export(args):
    from frcnn import loading
    from frcnn import tf_export as export

    model, cfg, _ = loading.load_trained_model(args.weights, args.config, args.overrides)
    path = export.export_saved_model(model, args.out, cfg)
    print(f"SavedModel: {path}")
    print(f"  {export.SERVING_SIGNATURE}: images (N,) string (encoded images) -> boxes, scores, classes, "
          "num_detections, decoded (false: the image did not decode, no detections)")
    print(f"  {export.IMAGE_SIGNATURE}: image (H, W, 3) uint8 RGB -> boxes, scores, classes, num_detections")
    print(f"  classes: {', '.join(cfg.data.classes)} (ids 1..{len(cfg.data.classes)}; "
          f"{export.EXTRA_DIR}/classes.txt)")
    return 0


def main(argv=None):
    args = parse_args(argv)
    # SavedModel writing logs variable renames and asset paths at INFO.
    cli.setup_logging(quiet=("absl", "tensorflow"))
    return cli.run(lambda: _export(args), also=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
