"""Export a trained model for serving: a TensorFlow SavedModel or an ONNX file.

    frcnn-export --weights W [--config C] --out DIR [--format saved_model|onnx] [--input-size H W] [--opset N]
                 [--no-check] [--set key=value ...]

In a checkout, ``python tools/export.py`` takes the same arguments. The format defaults to saved_model on the
TensorFlow backend and onnx on the others (KERAS_BACKEND); the config defaults to the run's config.yaml beside the
weights. Exit code 0 on success, 2 on an error (a format the backend cannot make says what is missing).

saved_model (TensorFlow backend): serving_default takes a 1-D string tensor of encoded images (JPEG, PNG, BMP, GIF),
detect_image one H x W x 3 uint8 RGB image; both return boxes (x1, y1, x2, y2 in original pixels), scores, classes
and num_detections (serving_default also decoded: false for a string that does not decode, which gets no
detections instead of failing the batch). Class names are in DIR/assets.extra/classes.txt (and classes.json). The
EXIF orientation of JPEG files is not applied (TensorFlow's decoder ignores it): send upright images.

    import tensorflow as tf
    detector = tf.saved_model.load(DIR)
    out = detector.signatures["serving_default"](images=tf.constant([open("dog.jpg", "rb").read()]))

onnx (TensorFlow or PyTorch backend; pip install 'frcnn[onnx]'): DIR/model.onnx takes the model's own inputs, a
batch preprocessed by the model's transform (images, image_sizes, scales, original_sizes), and returns boxes,
scores, classes and num_detections. DIR/model.json holds the class names and the transform's config to do that
preprocessing. From PyTorch the height and width are fixed (--input-size, default max_size rounded up to
input.size_divisibility): pad the batch to it. The file is checked with onnxruntime when that is installed.
The model is exported in float32 (train.mixed_precision=off).

    import json, onnxruntime
    from frcnn.transform import ImageTransform
    meta = json.load(open(DIR + "/model.json"))
    batch = ImageTransform(**meta["transform"]).prepare_batch([rgb_uint8_image])  # + frcnn.export.pad_batch
    session = onnxruntime.InferenceSession(DIR + "/model.onnx")
    boxes, scores, classes, num = session.run(None, {i.name: batch[i.name] for i in session.get_inputs()})
"""

import time

from frcnn import cli
from frcnn.export import FORMATS


def parse_args(argv):
    parser = cli.make_parser(__doc__)
    cli.add_weights(parser)
    cli.add_config(parser)
    parser.add_argument("--out", required=True, help="folder of the export (replaced if it holds an earlier export)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="saved_model (TensorFlow backend) or onnx (TensorFlow, PyTorch); default saved_model on "
                             "TensorFlow, onnx elsewhere")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="onnx on PyTorch: the fixed input height and width (multiples of "
                             "input.size_divisibility; default max_size rounded up to it, both sides)")
    parser.add_argument("--opset", type=int, default=None, help="onnx: the ONNX opset (default the converter's)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="onnx: do not run the file with onnxruntime to compare it with the model")
    cli.add_overrides(parser, "roi_heads.score_thresh=0.3")
    return parser.parse_args(argv)


def _export(args):
    import keras

    from frcnn import export, loading

    backend = keras.backend.backend()
    fmt = args.format or export.default_format(backend)
    export.check_format(fmt, backend)  # before the model is built: a format this backend cannot make
    overrides = list(args.overrides)
    if fmt == "onnx":
        overrides.append("train.mixed_precision=off")  # ONNX export traces a float32 model
    model, cfg, _ = loading.load_trained_model(args.weights, args.config, overrides)
    start = time.perf_counter()
    path, report = export.export(model, args.out, cfg, fmt=fmt, input_size=args.input_size, opset=args.opset,
                                 check=args.check)
    seconds = time.perf_counter() - start
    if fmt == "saved_model":
        from frcnn import tf_export

        print(f"SavedModel: {path}")
        print(f"  {tf_export.SERVING_SIGNATURE}: images (N,) string (encoded images) -> boxes, scores, classes, "
              "num_detections, decoded (false: the image did not decode, no detections)")
        print(f"  {tf_export.IMAGE_SIGNATURE}: image (H, W, 3) uint8 RGB -> boxes, scores, classes, num_detections")
        print(f"  classes: {', '.join(cfg.data.classes)} (ids 1..{len(cfg.data.classes)}; "
              f"{tf_export.EXTRA_DIR}/classes.txt)")
        return 0
    import json
    import os

    with open(os.path.join(path, export.META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    size = os.path.getsize(os.path.join(path, export.ONNX_FILE))
    shape = meta["inputs"]["images"]["shape"]
    print(f"ONNX ({backend}, opset {meta['opset']}): {os.path.join(path, export.ONNX_FILE)} "
          f"({size / 2**20:.0f} MiB, {seconds:.0f} s)")
    print(f"  inputs: images {tuple(shape)} float32 (preprocessed: {export.META_FILE} 'transform'), image_sizes, "
          "scales, original_sizes -> boxes, scores, classes, num_detections")
    print(f"  classes: {', '.join(cfg.data.classes)} (ids 1..{len(cfg.data.classes)}; {export.META_FILE})")
    if report is None:
        print("  not checked (--no-check)")
    elif "skipped" in report:
        print(f"  not checked: {report['skipped']}")
    else:
        ties = f", {report['ties']} of them near-ties in another order" if report["ties"] else ""
        print(f"  checked with onnxruntime: {report['detections']} detections as the model's (boxes within "
              f"{report['max_box_diff']:.2g} px, scores within {report['max_score_diff']:.2g}{ties})")
    return 0


def main(argv=None):
    args = parse_args(argv)
    # SavedModel writing logs variable renames and asset paths at INFO; tf2onnx and torch.onnx each step.
    cli.setup_logging(quiet=("absl", "tensorflow", "tf2onnx", "onnxscript", "torch.onnx"))
    from frcnn.export import ExportError

    return cli.run(lambda: _export(args), also=(OSError, ExportError))
