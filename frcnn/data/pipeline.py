"""The input pipeline: records -> batches in the format of ``docs/CONTRACTS.md``, by ``tf.data`` or by NumPy.

Batch (B images, G = ``input.max_gt``)::

    images       (B, Hp, Wp, 3) float32  RGB in [0, 255], zero padded bottom/right; Hp, Wp multiples of
                                         input.size_divisibility (or both round_up(max_size) with input.fixed_size)
    image_sizes  (B, 2) int32            (height, width) of each resized image inside the padding
    scales       (B,) float32            resize factor: resized = original * scale (divide boxes by it to go back)
    original_sizes (B, 2) int32          (height, width) of each original image (after EXIF orientation)
    gt_boxes     (B, G, 4) float32       (x1, y1, x2, y2) in resized pixels (frcnn.boxes); zeros where padded
    gt_classes   (B, G) int32            1..C-1; 0 where padded
    gt_valid     (B, G) bool
    image_ids    (B,) int64              index of the record in the record list

Two implementations of the same rules (:mod:`frcnn.transform` holds them, each written once):

- :mod:`frcnn.data.tf_pipeline`: a ``tf.data.Dataset`` of tensors, for the TensorFlow backend (and
  ``tf.distribute``); imported only when it is used.
- :mod:`frcnn.data.numpy_pipeline`: a ``keras.utils.PyDataset`` of NumPy arrays with worker threads, for JAX and
  PyTorch (no TensorFlow needed).

Per image: read the file, decode (JPEG / PNG / GIF / BMP / WebP; grayscale and RGBA become RGB), apply the record's
EXIF orientation, resize with one factor so that the shorter side is ``input.test_min_size`` (training:
``input.min_size``, one drawn per image when it is a list) unless the longer would exceed ``input.max_size``
(bilinear), flip horizontally with probability 1/2 in training (``input.flip``), pad. Boxes are multiplied by the
same single ``scale`` that ``"scales"`` reports, so dividing predictions by it maps them exactly back to original
pixels; the image itself is resized to whole pixels, which can differ from ``side * scale`` by up to half a pixel at
the far edge.

Ground truth (:func:`ground_truth`): only boxes that train (``Record.train_mask``: not crowd, not difficult unless
``data.use_difficult``), the first ``input.max_gt`` of them. The same in training and evaluation mode (for
validation losses); mAP is computed from the records themselves, which keep every box and its flags.

Training: shuffled, reshuffled each epoch, flip and scale drawn per image from ``train.seed``, repeated without end,
batches of full size only. Evaluation: the record order, no flip, one pass, the last batch may be smaller.

Bad images: files that are missing, empty, truncated or not images were already skipped when the records were read
(with the reason in the report). Whatever still fails to decode (corrupt pixel data behind a sound header, a file
changed since) is skipped and named once, with the reason, on the ``frcnn.data`` logger; in strict mode
(``data.strict``) it stops the input instead.

Must not import TensorFlow or Keras at import time (``import frcnn.data`` stays free of both).
"""

import logging

import numpy as np

from frcnn.data.records import DataError

logger = logging.getLogger("frcnn.data")

PIPELINES = ("auto", "tf", "numpy")


def default_pipeline():
    """``"tf"`` on Keras' TensorFlow backend, ``"numpy"`` on the others."""
    import keras

    return "tf" if keras.backend.backend() == "tensorflow" else "numpy"


def _resolve(pipeline):
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r} is not one of {PIPELINES}")
    return default_pipeline() if pipeline == "auto" else pipeline


def ground_truth(cfg, records):
    """Per record, the boxes it trains on: ``(boxes (K, 4) float32 original pixels, classes (K,) int32)``, at most
    ``input.max_gt`` of them (logged once when some image has more)."""
    max_gt = cfg.input.max_gt
    out, over = [], []
    for r in records:
        keep = r.train_mask(cfg.data.use_difficult)
        b, c = r.boxes[keep], r.classes[keep]
        if len(b) > max_gt:
            over.append((r.file_name, len(b)))
            b, c = b[:max_gt], c[:max_gt]
        out.append((b.reshape(-1, 4).astype(np.float32), c.astype(np.int32)))
    if over:
        logger.warning("%d images have more than input.max_gt=%d ground-truth boxes (e.g. %s with %d); only the "
                       "first %d of each are used", len(over), max_gt, over[0][0], over[0][1], max_gt)
    return out


def batch_size_of(cfg, training, batch_size=None):
    """``batch_size``, by default ``train.batch_size`` in training and ``eval.batch_size`` otherwise."""
    if batch_size is not None:
        return int(batch_size)
    return cfg.train.batch_size if training else cfg.eval.batch_size


def build_dataset(cfg, records, training, batch_size=None, seed=None, pipeline="auto"):
    """Batches of ``records`` as in the module docstring.

    ``records``: a record list from :func:`frcnn.data.load_records` (or any list of records). ``training``:
    shuffle, flip, repeat forever, full batches only; otherwise record order, one pass. ``batch_size``: default
    ``train.batch_size`` in training, ``eval.batch_size`` otherwise (the global batch). ``seed``: shuffle, flip and
    scale seed, default ``train.seed``. ``pipeline``: ``"tf"`` (a ``tf.data.Dataset``), ``"numpy"`` (a
    :class:`frcnn.data.numpy_pipeline.NumpyDataset`, a ``keras.utils.PyDataset``) or ``"auto"`` (tf on the
    TensorFlow backend, numpy on the others). Either can be given to ``model.fit`` and iterated as
    ``for batch in dataset``.
    """
    records = list(records)
    if not records:
        raise DataError("no images to build a dataset from (every file was skipped, or the split is empty)")
    batch_size = batch_size_of(cfg, training, batch_size)
    seed = cfg.train.seed if seed is None else seed
    if _resolve(pipeline) == "tf":
        from frcnn.data import tf_pipeline

        return tf_pipeline.build_dataset(cfg, records, training, batch_size, seed)
    from frcnn.data import numpy_pipeline

    return numpy_pipeline.NumpyDataset(cfg, records, training, batch_size, seed)


def check_decodable(records, report, num_workers=None, pipeline="auto"):
    """Optional deep check: decode every image as the pipeline will (``pipeline`` as in :func:`build_dataset`) and
    move those that fail to ``report.skipped``, naming the file and the decoder's reason. Returns a new
    :class:`RecordList` with ``image_id`` renumbered. Costs a full decode of every image (long for COCO), so it
    is not done by default: the pipelines skip such images anyway, naming each once in the log.
    """
    import concurrent.futures
    import dataclasses

    from frcnn.data.records import RecordList, decode_workers

    if _resolve(pipeline) == "tf":
        from frcnn.data.tf_pipeline import decode_problem
    else:
        from frcnn.data.numpy_pipeline import decode_problem

    def decode(record):
        return decode_problem(record.file_name, record.orientation, (record.height, record.width), record.valid_rows)

    with concurrent.futures.ThreadPoolExecutor(num_workers or decode_workers()) as pool:
        problems = list(pool.map(decode, records))
    out = RecordList(class_names=getattr(records, "class_names", ()), format=getattr(records, "format", None),
                     split=getattr(records, "split", None), category_ids=getattr(records, "category_ids", None),
                     annotation_file=getattr(records, "annotation_file", None))
    for record, problem in zip(records, problems):
        if problem is not None:
            report.skip(record.file_name, f"image does not decode ({problem})")
            continue
        out.append(dataclasses.replace(record, image_id=len(out)))
    return out
