"""The ``tf.data`` input pipeline: records -> batches in the format of ``docs/CONTRACTS.md``.

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

Per image (one parallel ``map``, all TensorFlow ops, so the pipeline runs in C++ threads and never holds the GIL):
read the file, decode (any of JPEG / PNG / GIF / BMP / WebP; grayscale and RGBA become RGB), apply the EXIF
orientation, resize with one factor so that the shorter side is ``input.test_min_size`` (training: ``input.min_size``,
one drawn per image when it is a list) unless the longer would exceed ``input.max_size`` (bilinear), flip horizontally with probability 1/2 in training (``input.flip``), pad.

Resize: the factor and the output size ``round(side * scale)`` are computed in the graph in float64
(:func:`frcnn.transform.resize_params_tf`, the same numbers as the Python rule that ``detect`` uses).
Boxes are multiplied by the same single ``scale`` that ``"scales"`` reports, so dividing predictions by it maps them
exactly back to original pixels; the image itself is resized to whole pixels, which can differ from ``side * scale``
by up to half a pixel at the far edge.

Ground truth: only boxes that train (``Record.train_mask``: not crowd, not difficult unless ``data.use_difficult``),
the first ``input.max_gt`` of them. The same in training and evaluation mode (for validation losses); mAP is computed
from the records themselves, which keep every box and its flags.

Training: shuffle (``data.shuffle_buffer``, reshuffled each epoch), flip, repeat, batches of full size only
(static batch dimension). Evaluation: the record order, no flip, no repeat, the last batch may be smaller.

Bad images: files that are missing, empty, truncated or not images were already skipped when the records were read
(with the reason in the report). Whatever still fails to decode (corrupt pixel data behind a sound header, a file
changed since) is skipped and named once, with the reason, on the ``frcnn.data`` logger (see
:func:`_load_skipping_failures`); in strict mode (``data.strict``) it stops the input instead. In training, ``repeat`` comes after ``ignore_errors`` so that a
dataset in which every image fails ends instead of spinning forever.
"""

import logging

import numpy as np
import tensorflow as tf

from frcnn.data.imageio import TRUNCATED_FILL
from frcnn.data.imageio import load_image  # noqa: F401  (re-exported: the single-image loader for inference)
from frcnn.data.records import DataError
from frcnn.transform import padded_side, resize_image, resize_params_tf

logger = logging.getLogger("frcnn.data")


def decode_image(contents):
    """Encoded bytes -> ``(H, W, 3)`` uint8 RGB (grayscale replicated, alpha dropped, first frame of a GIF)."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_record_image(contents, valid_rows):
    """:func:`decode_image`, or for a JPEG cut short (``valid_rows`` > 0, scalar int32 tensor) the rows that arrived
    with the rest set to :data:`frcnn.data.imageio.TRUNCATED_FILL` (libjpeg's invented rows are arbitrary)."""

    def recover():
        image = tf.io.decode_jpeg(contents, channels=3, try_recover_truncated=True)
        arrived = tf.range(tf.shape(image)[0]) < valid_rows
        return tf.where(arrived[:, None, None], image, tf.constant(TRUNCATED_FILL, tf.uint8))

    image = tf.cond(valid_rows > 0, recover, lambda: decode_image(contents))
    image.set_shape([None, None, 3])
    return image


def apply_orientation(image, orientation):
    """Apply an EXIF orientation (1..8, scalar int32 tensor) to ``(H, W, C)``, as OpenCV and PIL do when loading."""
    branches = [
        lambda: image,  # 1: as stored
        lambda: image[:, ::-1],  # 2: mirrored left-right
        lambda: image[::-1, ::-1],  # 3: rotated 180
        lambda: image[::-1, :],  # 4: mirrored top-bottom
        lambda: tf.transpose(image, [1, 0, 2]),  # 5: transpose
        lambda: tf.image.rot90(image, k=3),  # 6: rotate 90 clockwise
        lambda: tf.transpose(image, [1, 0, 2])[::-1, ::-1],  # 7: transverse
        lambda: tf.image.rot90(image, k=1),  # 8: rotate 90 counter-clockwise
    ]
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    return tf.switch_case(index, branches)


def _gt_arrays(cfg, records):
    """Ragged ground truth per record: the training boxes, cut to ``max_gt`` (logged once)."""
    max_gt = cfg.input.max_gt
    boxes, classes, lengths = [], [], []
    over = []
    for r in records:
        keep = r.train_mask(cfg.data.use_difficult)
        b, c = r.boxes[keep], r.classes[keep]
        if len(b) > max_gt:
            over.append((r.file_name, len(b)))
            b, c = b[:max_gt], c[:max_gt]
        boxes.append(b.reshape(-1, 4).astype(np.float32))
        classes.append(c.astype(np.int32))
        lengths.append(len(b))
    if over:
        logger.warning("%d images have more than input.max_gt=%d ground-truth boxes (e.g. %s with %d); only the "
                       "first %d of each are used", len(over), max_gt, over[0][0], over[0][1], max_gt)
    flat_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    flat_classes = np.concatenate(classes) if classes else np.zeros((0,), np.int32)
    return flat_boxes, flat_classes, np.asarray(lengths, np.int64)


def _slices(cfg, records):
    flat_boxes, flat_classes, lengths = _gt_arrays(cfg, records)
    return {
        "file_name": tf.constant([r.file_name for r in records], tf.string),
        "image_id": tf.constant([r.image_id for r in records], tf.int64),
        "size": tf.constant([[r.height, r.width] for r in records], tf.int32),
        "orientation": tf.constant([r.orientation for r in records], tf.int32),
        "valid_rows": tf.constant([r.valid_rows for r in records], tf.int32),
        "boxes": tf.RaggedTensor.from_row_lengths(flat_boxes, lengths),
        "classes": tf.RaggedTensor.from_row_lengths(flat_classes, lengths),
    }


def _make_loader(cfg, training):
    max_gt = cfg.input.max_gt
    divisor = cfg.input.size_divisibility
    flip = training and cfg.input.flip
    fixed = padded_side(divisor, cfg.input.max_size) if cfg.input.fixed_size else None
    # Multi-scale training: each image draws its shorter side from input.min_size (a list); evaluation uses
    # input.test_min_size.
    min_sizes = cfg.input.train_min_sizes if training else (cfg.input.test_min_size,)

    def load(item, seed):
        path = item["file_name"]
        image = decode_record_image(tf.io.read_file(path), item["valid_rows"])
        image = apply_orientation(image, item["orientation"])
        shape = tf.shape(image)[:2]
        same = tf.reduce_all(tf.equal(shape, item["size"]))
        check = tf.debugging.Assert(same, ["frcnn.data: image", path, "decodes to (height, width)", shape,
                                           "but its record says", item["size"], "- image skipped"])
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        min_size = min_sizes[0]
        if len(min_sizes) > 1:
            pick = tf.random.stateless_uniform([], seed=seed + tf.constant([0, 1], tf.int64), maxval=len(min_sizes),
                                               dtype=tf.int32)
            min_size = tf.gather(min_sizes, pick)
        scale, new_size = resize_params_tf(shape[0], shape[1], min_size, cfg.input.max_size)
        image = resize_image(image, new_size)
        image = tf.clip_by_value(image, 0.0, 255.0)  # bilinear never overshoots; kept as a guard for other methods
        boxes = tf.reshape(tf.cast(item["boxes"], tf.float32), [-1, 4]) * scale
        classes = tf.reshape(tf.cast(item["classes"], tf.int32), [-1])
        if flip:
            do_flip = tf.random.stateless_uniform([], seed=seed) < 0.5
            width = tf.cast(new_size[1], tf.float32)
            flipped = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
            image = tf.cond(do_flip, lambda: image[:, ::-1, :], lambda: image)
            boxes = tf.cond(do_flip, lambda: flipped, lambda: boxes)
        if fixed is None:
            pad_h = (divisor - new_size[0] % divisor) % divisor
            pad_w = (divisor - new_size[1] % divisor) % divisor
        else:
            pad_h, pad_w = fixed - new_size[0], fixed - new_size[1]
        image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
        k = tf.shape(boxes)[0]
        gt_boxes = tf.pad(boxes, [[0, max_gt - k], [0, 0]])
        gt_classes = tf.pad(classes, [[0, max_gt - k]])
        gt_boxes.set_shape([max_gt, 4])
        gt_classes.set_shape([max_gt])
        image.set_shape([fixed, fixed, 3])
        return {
            "images": image,
            "image_sizes": new_size,
            "scales": scale,
            "original_sizes": shape,
            "gt_boxes": gt_boxes,
            "gt_classes": gt_classes,
            "gt_valid": tf.range(max_gt) < k,
            "image_ids": item["image_id"],
        }

    return load


def _load_skipping_failures(ds, load, parallel):
    """``ds.map(load)`` that skips the images whose decoding fails and names each of them once, with the reason,
    on the ``frcnn.data`` logger.

    ``ignore_errors`` alone drops them silently: its warning goes to TensorFlow's C++ log, which the tools hide
    (TF_CPP_MIN_LOG_LEVEL=2), and it does not know the file. So each image is loaded in a one-element dataset whose
    errors are ignored, followed by a placeholder flagged as failed; the first of the two is kept. Only a failed
    image reaches Python (to decode it again for the reason and log it), so the good path stays in the graph.
    """
    reported = set()

    def report(path, orientation, size, valid_rows):
        name = path.numpy().decode("utf-8", "replace")
        if name not in reported:  # once per file, not once per epoch
            reported.add(name)
            problem = _decode_problem(name, int(orientation), tuple(int(v) for v in size.numpy()), int(valid_rows))
            logger.warning("%s: image does not decode (%s) -> image skipped", name, problem or "unknown error")
        return False

    def one(item, seed):
        loaded = tf.data.Dataset.from_tensors((item, seed)).map(load).ignore_errors()
        spec = loaded.element_spec
        placeholder = tf.nest.map_structure(
            lambda s: tf.zeros([0 if d is None else d for d in s.shape], s.dtype), spec)
        flagged = loaded.map(lambda x: (x, True))
        fallback = tf.data.Dataset.from_tensors((placeholder, False))
        return flagged.concatenate(fallback).take(1).map(
            lambda x, ok: (x, ok, item["file_name"], item["orientation"], item["size"], item["valid_rows"]))

    def keep(x, ok, *where):
        return tf.cond(ok, lambda: tf.constant(True), lambda: tf.py_function(report, list(where), tf.bool))

    # One element per inner dataset and deterministic round robin: the output keeps the record order.
    ds = ds.interleave(one, cycle_length=None if parallel == tf.data.AUTOTUNE else parallel,
                       num_parallel_calls=parallel, deterministic=True)
    return ds.filter(keep).map(lambda x, ok, *where: x)


def _decode_problem(file_name, orientation, size, valid_rows=0):
    """Why ``file_name`` cannot be used as the pipeline decodes it (a string), or None when it decodes to the
    ``(height, width)`` its record says."""
    try:
        image = apply_orientation(decode_record_image(tf.io.read_file(file_name), tf.constant(valid_rows)),
                                  orientation)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError) as err:
        return err.message.split("[Op:")[0].strip()
    if tuple(image.shape[:2]) != tuple(size):
        return f"decodes to {image.shape[1]}x{image.shape[0]} but the record says {size[1]}x{size[0]}"
    return None


def build_dataset(cfg, records, training, batch_size=None, seed=None):
    """A ``tf.data.Dataset`` of batches as in the module docstring.

    ``records``: a record list from :func:`frcnn.data.load_records` (or any list of records). ``training``:
    shuffle, flip, repeat forever, full batches only; otherwise record order, one pass. ``batch_size``: default
    ``train.batch_size`` in training, ``eval.batch_size`` otherwise (the global batch: under a ``tf.distribute``
    strategy, distribute the dataset to split it). ``seed``: shuffle and flip seed, default ``train.seed``.
    """
    records = list(records)
    if not records:
        raise DataError("no images to build a dataset from (every file was skipped, or the split is empty)")
    if batch_size is None:
        batch_size = cfg.train.batch_size if training else cfg.eval.batch_size
    seed = cfg.train.seed if seed is None else seed
    parallel = tf.data.AUTOTUNE if cfg.data.num_parallel_calls < 0 else max(1, cfg.data.num_parallel_calls)

    ds = tf.data.Dataset.from_tensor_slices(_slices(cfg, records))
    if training:
        buffer = max(1, min(cfg.data.shuffle_buffer, len(records)))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        # Per-image flip seeds from a seeded stream (new numbers each epoch): reproducible even with parallel map,
        # where a stateful random op would give each image whichever draw its thread happened to get.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2, drop_remainder=True)
        ds = tf.data.Dataset.zip((ds, seeds))
    else:
        ds = ds.map(lambda item: (item, tf.zeros([2], tf.int64)))
    if cfg.data.strict:
        ds = ds.map(_make_loader(cfg, training), num_parallel_calls=parallel)
    else:
        ds = _load_skipping_failures(ds, _make_loader(cfg, training), parallel)
    if training:
        ds = ds.repeat()
    fixed = padded_side(cfg.input.size_divisibility, cfg.input.max_size) if cfg.input.fixed_size else None
    padded_shapes = {
        "images": [fixed, fixed, 3],
        "image_sizes": [2],
        "scales": [],
        "original_sizes": [2],
        "gt_boxes": [cfg.input.max_gt, 4],
        "gt_classes": [cfg.input.max_gt],
        "gt_valid": [cfg.input.max_gt],
        "image_ids": [],
    }
    ds = ds.padded_batch(batch_size, padded_shapes=padded_shapes, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)


def check_decodable(records, report, num_workers=None):
    """Optional deep check: decode every image with TensorFlow (as the pipeline will) and move those that fail to
    ``report.skipped``, naming the file and TensorFlow's reason. Returns a new :class:`RecordList` with
    ``image_id`` renumbered. Costs a full decode of every image (minutes for COCO), so it is not done by default:
    the pipeline skips such images anyway, but only TensorFlow's own log says which.
    """
    import concurrent.futures
    import dataclasses
    import os

    from frcnn.data.records import RecordList

    def decode(record):
        return _decode_problem(record.file_name, record.orientation, (record.height, record.width),
                               record.valid_rows)

    workers = num_workers or min(16, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
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
