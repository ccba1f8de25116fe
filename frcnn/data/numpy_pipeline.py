"""The input pipeline without TensorFlow: records -> batches of NumPy arrays as :mod:`frcnn.data.pipeline` describes.

For the JAX and PyTorch backends (``frcnn.data.build_dataset`` picks it there; ``pipeline="numpy"`` asks for it on
any backend). Decoding is OpenCV's (:func:`frcnn.data.imageio.read_image`: the file's own EXIF is ignored and the
record's orientation applied, as in the ``tf.data`` pipeline), resizing ``cv2.INTER_LINEAR`` on float32 pixels; the
resize, pad, flip and ground-truth rules are :mod:`frcnn.transform`'s, the same functions the ``tf.data`` pipeline
runs on tensors.

Loader: :class:`NumpyDataset` is a ``keras.utils.PyDataset``. Keras' ``fit``, ``evaluate`` and ``predict`` take it on
every backend, its ordered enqueuer keeps batches in order, and its workers are threads: OpenCV releases the GIL
while it decodes and resizes, so threads decode in parallel without pickling records into processes or starting
any. It needs nothing beyond Keras (grain would be another install and is not on every machine; torch's
``DataLoader`` serves one backend; ``tf.data`` needs TensorFlow). Iterating a :class:`NumpyDataset` directly
(``for batch in dataset``, as the evaluation does outside ``fit``) builds batches ahead in a thread pool the same
way.

Reproducibility: batch ``i`` of a training dataset holds the images at positions ``i * B .. i * B + B - 1`` of an
endless stream made of one permutation of the records per pass (a pass's permutation and every image's flip and
scale draws come from ``train.seed`` and the position alone), so the batches are the same whatever the worker
scheduling and however many workers run. This is a full shuffle, not ``tf.data``'s ``data.shuffle_buffer`` window.

Bad images: one that fails to decode (or decodes to another size than its record says) is named once with the
reason on the ``frcnn.data`` logger and skipped: in training, the next image of the pass takes its place; in
evaluation the batch is one image shorter (iterating the dataset directly regroups the images instead, so that
only the last batch is smaller, as with ``tf.data``). In strict mode (``data.strict``) it raises :class:`DataError`.

Must not import TensorFlow.
"""

import collections
import concurrent.futures
import itertools
import logging
import math
import threading

import keras
import numpy as np

from frcnn.data.imageio import ImageProblem, read_image
from frcnn.data.pipeline import ground_truth
from frcnn.data.records import DataError, decode_workers
from frcnn.transform import flip_boxes, padded_shape, resize_array, resize_params, scale_boxes

logger = logging.getLogger("frcnn.data")

_SEED_MOD = 1 << 64  # SeedSequence takes non-negative words; train.seed may be any integer


def decode_problem(file_name, orientation, size, valid_rows=0):
    """Why ``file_name`` cannot be used as this pipeline decodes it (a string), or None when it decodes to the
    ``(height, width)`` its record says."""
    try:
        image = read_image(file_name, orientation, valid_rows)
    except ImageProblem as err:
        return str(err)
    if tuple(image.shape[:2]) != tuple(size):
        return f"decodes to {image.shape[1]}x{image.shape[0]} but the record says {size[1]}x{size[0]}"
    return None


def _rng(seed, *words):
    return np.random.default_rng([int(seed) % _SEED_MOD, *words])


def _draws(seed, position, num_sizes, flip):
    """The random choices for the image at ``position`` of the training stream: ``(index into the training sizes,
    flip?)``, from ``seed`` and ``position`` alone."""
    rng = _rng(seed, 1, position)
    do_flip = bool(rng.random() < 0.5) if flip else False
    pick = int(rng.integers(num_sizes)) if num_sizes > 1 else 0
    return pick, do_flip


def _ordered_map(fn, args, workers, window):
    """``map(fn, args)`` on ``workers`` threads, at most ``window`` calls ahead of the consumer, in order."""
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="frcnn-data")
    pending = collections.deque()
    try:
        for a in args:
            pending.append(pool.submit(fn, a))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class NumpyDataset(keras.utils.PyDataset):
    """Batches of ``records`` as NumPy arrays (a ``keras.utils.PyDataset``; see the module docstring).

    Training (``training=True``): endless (``num_batches`` is None: give ``fit`` its ``steps_per_epoch``), full
    batches. Evaluation: ``len(dataset)`` batches in record order, the last one possibly smaller.
    """

    def __init__(self, cfg, records, training, batch_size, seed, workers=None):
        workers = workers or decode_workers(cfg.data.num_parallel_calls)
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(2, 2 * workers))
        self.records = list(records)
        if not self.records:
            raise DataError("no images to build a dataset from (every file was skipped, or the split is empty)")
        self.training = bool(training)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.strict = cfg.data.strict
        inp = cfg.input
        self.max_gt = inp.max_gt
        self.max_size = inp.max_size
        self.size_divisibility = inp.size_divisibility
        self.fixed_size = inp.fixed_size
        self.flip = self.training and inp.flip
        self.min_sizes = tuple(inp.train_min_sizes) if self.training else (inp.test_min_size,)
        self._truth = ground_truth(cfg, self.records)
        self._lock = threading.Lock()
        self._bad = set()  # record indices that failed (each named once)
        self._orders = collections.OrderedDict()  # pass -> permutation, the last few

    # ------------------------------------------------------------------------------------------- PyDataset API

    @property
    def num_batches(self):
        return None if self.training else math.ceil(len(self.records) / self.batch_size)

    def __len__(self):
        if self.training:
            raise TypeError("a training NumpyDataset is endless (num_batches is None)")
        return self.num_batches

    def __getitem__(self, index):
        if self.training:
            start = index * self.batch_size
            return self._collate([self._position(p) for p in range(start, start + self.batch_size)])
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of {self.num_batches}")
        chunk = range(index * self.batch_size, min(len(self.records), (index + 1) * self.batch_size))
        return self._collate([item for item in map(self._load_record, chunk) if item is not None])

    def __iter__(self):
        """The batches in order, built ahead by the worker threads (one batch per task, as in ``fit``). Evaluation:
        the images that fail are left out and the others regrouped, so that only the last batch is smaller;
        training: endless."""
        workers = self.workers
        window = 2 * workers
        if self.training:
            yield from _ordered_map(self.__getitem__, itertools.count(), workers, window)
            return
        leftover = []
        for items, batch in _ordered_map(self._evaluation_chunk, range(self.num_batches), workers, window):
            if batch is not None and not leftover:
                yield batch
                continue
            leftover.extend(items)  # a chunk with a failed image: regroup from here on
            while len(leftover) >= self.batch_size:
                yield self._collate(leftover[: self.batch_size])
                leftover = leftover[self.batch_size:]
        if leftover:
            yield self._collate(leftover)

    def _evaluation_chunk(self, index):
        """``(items, batch)``: the images of evaluation batch ``index`` that load, and their batch when none
        failed (collated in the worker thread), else None."""
        chunk = range(index * self.batch_size, min(len(self.records), (index + 1) * self.batch_size))
        items = [item for item in map(self._load_record, chunk) if item is not None]
        return items, (self._collate(items) if len(items) == len(chunk) else None)

    # --------------------------------------------------------------------------------------------- one image

    def _order(self, epoch):
        """The permutation of the records for pass ``epoch`` of the training stream."""
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = _rng(self.seed, 0, epoch).permutation(len(self.records))
                self._orders[epoch] = order
                while len(self._orders) > 4:
                    self._orders.popitem(last=False)
            return order

    def _position(self, position):
        """The loaded image at ``position`` of the training stream (the next good image of the pass when it fails)."""
        n = len(self.records)
        epoch, offset = divmod(position, n)
        order = self._order(epoch)
        pick, do_flip = _draws(self.seed, position, len(self.min_sizes), self.flip)
        for step in range(n):
            item = self._load_record(int(order[(offset + step) % n]), pick, do_flip)
            if item is not None:
                return item
        raise DataError(f"none of the {n} training images decodes (each is named in a warning above)")

    def _load_record(self, index, pick=0, do_flip=False):
        """Record ``index`` loaded (a dict of NumPy arrays), or None when it fails (named once)."""
        if index in self._bad:
            return None
        record = self.records[index]
        try:
            image = read_image(record.file_name, record.orientation, record.valid_rows)
            if image.shape[:2] != (record.height, record.width):
                raise ImageProblem(f"decodes to {image.shape[1]}x{image.shape[0]} but the record says "
                                   f"{record.width}x{record.height}")
        except ImageProblem as err:
            self._failed(index, str(err))
            return None
        height, width = image.shape[:2]
        scale, size = resize_params(height, width, self.min_sizes[pick], self.max_size)
        pixels = resize_array(image, size)
        np.clip(pixels, 0.0, 255.0, out=pixels)  # bilinear never overshoots; kept as a guard, as in tf.data
        boxes, classes = self._truth[index]
        boxes = scale_boxes(boxes, scale)
        if do_flip:
            pixels = pixels[:, ::-1]
            boxes = flip_boxes(boxes, np.float32(size[1]))
        return {"image": pixels, "size": size, "scale": scale, "original_size": (height, width), "boxes": boxes,
                "classes": classes, "image_id": record.image_id}

    def _failed(self, index, reason):
        name = self.records[index].file_name
        if self.strict:
            raise DataError(f"{name}: image does not decode ({reason}) (data.strict is on; without it: image "
                            "skipped)")
        with self._lock:
            if index in self._bad:
                return
            self._bad.add(index)
        logger.warning("%s: image does not decode (%s) -> image skipped", name, reason)

    # ------------------------------------------------------------------------------------------------ a batch

    def _collate(self, items):
        b, g = len(items), self.max_gt
        sizes = np.asarray([item["size"] for item in items], np.int32).reshape(-1, 2)
        if b:
            ph, pw = padded_shape(sizes, self.size_divisibility, self.fixed_size, self.max_size)
        else:
            ph = pw = padded_shape(np.ones((1, 2)), self.size_divisibility, self.fixed_size, self.max_size)[0]
        images = np.zeros((b, ph, pw, 3), np.float32)
        gt_boxes = np.zeros((b, g, 4), np.float32)
        gt_classes = np.zeros((b, g), np.int32)
        counts = np.zeros((b,), np.int64)
        for i, item in enumerate(items):
            h, w = item["size"]
            images[i, :h, :w] = item["image"]
            k = len(item["classes"])
            gt_boxes[i, :k] = item["boxes"]
            gt_classes[i, :k] = item["classes"]
            counts[i] = k
        return {
            "images": images,
            "image_sizes": sizes,
            "scales": np.asarray([item["scale"] for item in items], np.float32).reshape(-1),
            "original_sizes": np.asarray([item["original_size"] for item in items], np.int32).reshape(-1, 2),
            "gt_boxes": gt_boxes,
            "gt_classes": gt_classes,
            "gt_valid": np.arange(g)[None, :] < counts[:, None],
            "image_ids": np.asarray([item["image_id"] for item in items], np.int64),
        }
