"""The ``tf.data`` input pipeline (TensorFlow only): records -> batches as :mod:`frcnn.data.pipeline` describes.

Imported only when TensorFlow is used (``frcnn.data.build_dataset`` on the TensorFlow backend, or with
``pipeline="tf"``). The rules are :mod:`frcnn.transform`'s, run on graph tensors through
``tensorflow.experimental.numpy``; decoding and resizing are TensorFlow's own (``tf.io.decode_image``,
``tf.image.resize``).

Per image, one parallel ``map`` of TensorFlow ops, so the pipeline runs in C++ threads and never holds the GIL.
Training: ``shuffle`` (``data.shuffle_buffer``, reshuffled each epoch), per-image flip and scale draws from a seeded
stream of stateless seeds (reproducible even with a parallel map), ``repeat``, ``padded_batch`` with full batches
only (static batch dimension). In training, ``repeat`` comes after the skipping of failed images so that a dataset
in which every image fails ends instead of spinning forever.
"""

import logging

import numpy as np
import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from frcnn.data.imageio import TRUNCATED_FILL, orient
from frcnn.data.pipeline import ground_truth
from frcnn.transform import flip_boxes, padded_side, resize_params, scale_boxes

logger = logging.getLogger("frcnn.data")


def resize_params_tf(height, width, min_size, max_size):
    """:func:`frcnn.transform.resize_params` on tensors: ``(scale float32, (2,) int32 (height, width))``."""
    return resize_params(height, width, min_size, max_size, xp=tnp)


def resize_image(image, new_size):
    """``tf.image.resize`` (bilinear, half-pixel centres, no antialiasing) to ``new_size = (height, width)``,
    float32 in [0, 255]."""
    return tf.image.resize(tf.cast(image, tf.float32), new_size, method="bilinear")


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
    """EXIF orientation (1..8, scalar int32 tensor) applied to ``(H, W, C)``: :func:`frcnn.data.imageio.orient`."""
    branches = [lambda k=k: orient(image, k, xp=tnp) for k in range(1, 9)]
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    return tf.switch_case(index, branches)


def _draws(seed, num_sizes, flip):
    """The per-image random choices from its stateless ``seed`` (2,) int64: ``(index into the training sizes,
    flip?)``, scalar tensors."""
    pick = tf.constant(0, tf.int32)
    if num_sizes > 1:
        pick = tf.random.stateless_uniform([], seed=seed + tf.constant([0, 1], tf.int64), maxval=num_sizes,
                                           dtype=tf.int32)
    do_flip = tf.random.stateless_uniform([], seed=seed) < 0.5 if flip else tf.constant(False)
    return pick, do_flip


def _slices(cfg, records):
    truth = ground_truth(cfg, records)
    lengths = [len(c) for _, c in truth]
    flat_boxes = np.concatenate([b for b, _ in truth]).reshape(-1, 4)
    flat_classes = np.concatenate([c for _, c in truth])
    return {
        "file_name": tf.constant([r.file_name for r in records], tf.string),
        "image_id": tf.constant([r.image_id for r in records], tf.int64),
        "size": tf.constant([[r.height, r.width] for r in records], tf.int32),
        "orientation": tf.constant([r.orientation for r in records], tf.int32),
        "valid_rows": tf.constant([r.valid_rows for r in records], tf.int32),
        "boxes": tf.RaggedTensor.from_row_lengths(flat_boxes.astype(np.float32), np.asarray(lengths, np.int64)),
        "classes": tf.RaggedTensor.from_row_lengths(flat_classes.astype(np.int32), np.asarray(lengths, np.int64)),
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
        pick, do_flip = _draws(seed, len(min_sizes), flip)
        min_size = tf.gather(tf.constant(min_sizes, tf.int32), pick)
        scale, new_size = resize_params_tf(shape[0], shape[1], min_size, cfg.input.max_size)
        image = resize_image(image, new_size)
        image = tf.clip_by_value(image, 0.0, 255.0)  # bilinear never overshoots; kept as a guard for other methods
        boxes = scale_boxes(tf.reshape(tf.cast(item["boxes"], tf.float32), [-1, 4]), scale)
        classes = tf.reshape(tf.cast(item["classes"], tf.int32), [-1])
        if flip:
            flipped = flip_boxes(boxes, tf.cast(new_size[1], tf.float32), xp=tnp)
            image = tf.cond(do_flip, lambda: image[:, ::-1, :], lambda: image)
            boxes = tf.cond(do_flip, lambda: flipped, lambda: boxes)
        if fixed is None:
            pad_h = padded_side(divisor, new_size[0]) - new_size[0]
            pad_w = padded_side(divisor, new_size[1]) - new_size[1]
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
            problem = decode_problem(name, int(orientation), tuple(int(v) for v in size.numpy()), int(valid_rows))
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


def decode_problem(file_name, orientation, size, valid_rows=0):
    """Why ``file_name`` cannot be used as this pipeline decodes it (a string), or None when it decodes to the
    ``(height, width)`` its record says."""
    try:
        image = apply_orientation(decode_record_image(tf.io.read_file(file_name), tf.constant(valid_rows)),
                                  orientation)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError) as err:
        return err.message.split("[Op:")[0].strip()
    if tuple(image.shape[:2]) != tuple(size):
        return f"decodes to {image.shape[1]}x{image.shape[0]} but the record says {size[1]}x{size[0]}"
    return None


def build_dataset(cfg, records, training, batch_size, seed):
    """A ``tf.data.Dataset`` of batches (:func:`frcnn.data.build_dataset` checks the arguments and picks this)."""
    parallel = tf.data.AUTOTUNE if cfg.data.num_parallel_calls < 0 else max(1, cfg.data.num_parallel_calls)
    ds = tf.data.Dataset.from_tensor_slices(_slices(cfg, records))
    if training:
        buffer = max(1, min(cfg.data.shuffle_buffer, len(records)))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        # Per-image seeds from a seeded stream (new numbers each epoch): reproducible even with parallel map,
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
