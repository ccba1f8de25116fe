"""Inference: :func:`detect` on images in memory, and over image files with a loaded detector (:mod:`frcnn.loading`),
what ``tools/infer.py`` runs.

- :func:`detect`: a list of RGB arrays of any sizes -> detections in each image's pixels (the model's own
  ``transform`` resizes and pads them as the evaluation pipeline does).
- :func:`expand_inputs`: files, folders (their ``.jpg .jpeg .png .bmp`` files, sorted) and glob patterns -> paths.
- :func:`detect_files`: batches of images through :meth:`FasterRCNN.detect`, one bad file never stops the others:
  each is reported (``on_error``) with the reason and skipped.
- :func:`check_output_dir`, :func:`own_output_dir`, :func:`save_detections`: the output folder, checked before any
  work and owned by one run at a time, and the ``detections.json`` file. The printed table is
  :func:`frcnn.report.format_table`. Every file is written atomically (a temporary file renamed over the target), so
  a symbolic link planted in the output folder is replaced, never written through.
"""

import contextlib
import dataclasses
import glob
import os
import tempfile

import keras
import numpy as np

from frcnn.data import DataError, load_image
from frcnn.evaluation import save_json
from frcnn.fileio import DirectoryLocked, lock_directory, make_directory
from frcnn.model import unpad_detections
from frcnn.visualize import draw_detections, save_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_GLOB_CHARS = "*?["


# --------------------------------------------------------------------------------------------------- detection


def detect(model, images, batch_size=1):
    """Detect objects in a list of ``H x W x 3`` uint8 RGB arrays of any sizes with a built
    :class:`frcnn.model.FasterRCNN`, ``batch_size`` images per forward pass.

    Returns one dict per image: ``boxes`` (N, 4) float32 ``(x1, y1, x2, y2)`` in that image's pixels, ``scores``
    (N,), ``classes`` (N,) int32 class ids (1..C-1) and ``class_names`` (N,) list of str.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise TypeError("detect() takes a list of images; wrap a single HxWx3 array in a list")
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("detect() needs a non-empty list of HxWx3 uint8 RGB arrays")
    for i, image in enumerate(images):
        image = np.asarray(image) if not isinstance(image, np.ndarray) else image
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i} has shape {image.shape}; detect() expects HxWx3 RGB arrays")
        if image.dtype != np.uint8:
            raise TypeError(f"image {i} has dtype {image.dtype}; detect() expects uint8 RGB in [0, 255]")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image {i} is empty (shape {image.shape})")
    results = []
    for start in range(0, len(images), max(1, int(batch_size or 1))):
        batch = model.transform.prepare_batch(images[start:start + max(1, int(batch_size or 1))])
        for det in unpad_detections(model.predict_on_batch(batch)):
            results.append({**det, "class_names": [model.class_names[c] for c in det["classes"]]})
    return results


# ------------------------------------------------------------------------------------------------ input files


def _folder_images(folder):
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def expand_inputs(inputs):
    """Files, folders and glob patterns -> ``(paths, problems)``.

    A folder gives its image files (extensions :data:`IMAGE_EXTENSIONS`, any case, not recursive) in sorted order;
    a pattern (with ``* ? [``, and not an existing file) gives its sorted matches (``**`` recurses), folders among
    them expanded as above; anything else is taken as a file path, even if missing (reading it reports the
    problem). Each path appears once, at its first position. ``problems``: ``(input, message)`` for folders
    without images and patterns without matches.
    """
    paths, problems, seen = [], [], set()

    def add(path):
        # The resolved path: a ``**`` glob through a symbolic link loop (or two links to one file) reaches the same
        # file under many names.
        key = os.path.normcase(os.path.realpath(path))
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = _folder_images(item)
            if not found:
                problems.append((item, f"folder {item} holds no {'/'.join(IMAGE_EXTENSIONS)} images"))
            for path in found:
                add(path)
        elif not os.path.exists(item) and any(c in item for c in _GLOB_CHARS):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                problems.append((item, f"no files match '{item}'"))
            for match in matches:
                for path in (_folder_images(match) if os.path.isdir(match) else [match]):
                    add(path)
        else:
            add(item)
    return paths, problems


def check_output_dir(out_dir, json_name="detections.json"):
    """Create ``out_dir`` and make sure files can be written there, before any image is processed; raises
    ``OSError`` with a message naming the folder (or the file in the way) otherwise."""
    try:
        make_directory(out_dir)  # one line naming the path and the reason (a file in the way, read-only, ...)
    except OSError as err:
        raise OSError(f"--out {err}") from None
    target = os.path.join(out_dir, json_name)
    if os.path.isdir(target):
        raise OSError(f"--out {out_dir}: {target} is a folder, so {json_name} cannot be written")
    # os.access is not enough (it ignores read-only mounts): really create and remove a file. A new file with a
    # random name (O_EXCL): nothing is written through a link planted at a predictable name.
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OSError(f"--out {out_dir} is not writable ({err.strerror or err})") from None


@contextlib.contextmanager
def own_output_dir(out_dir):
    """This run owns ``out_dir`` until the block ends (the work-directory lock of :func:`frcnn.fileio.lock_directory`,
    file ``.lock``), or ``OSError`` naming the run that does: two runs writing one ``detections.json`` would lose
    one run's results."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock_directory(out_dir, "infer run"))
        except DirectoryLocked as err:
            raise OSError(f"--out {err}") from None
        yield


# ------------------------------------------------------------------------------------------------- detection


@dataclasses.dataclass
class ImageDetections:
    """Detections of one image file, at or above the score threshold, boxes ``(x1, y1, x2, y2)`` in its pixels."""

    file: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int32 in 1..C-1
    class_names: list
    output: str = None  # the annotated image, when written

    def to_json(self):
        return {
            "file": self.file,
            "width": self.width,
            "height": self.height,
            "boxes": [[float(v) for v in box] for box in self.boxes],
            "scores": [float(s) for s in self.scores],
            "classes": list(self.class_names),
            "class_ids": [int(c) for c in self.class_ids],
            "output": self.output,
        }


def _read(path):
    """``(image, None)`` or ``(None, message)``; the message names the file."""
    try:
        image = load_image(path)
    except DataError as err:
        return None, str(err)
    except OSError as err:  # e.g. no permission to read, a folder given as a file
        return None, f"cannot read image {path}: {err.strerror or err}"
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        return None, f"cannot use image {path}: it has no pixels (shape {image.shape})"
    return image, None


def _output_name(path, used):
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ext.lower() if ext.lower() in IMAGE_EXTENSIONS else ".png"
    name, k = stem + ext, 1
    while name.lower() in used:  # two inputs with the same file name (different folders): keep both
        k += 1
        name = f"{stem}_{k}{ext}"
    used.add(name.lower())
    return name


def _runtime_errors():
    """What the backend raises when a computation fails at run time (e.g. out of memory on a huge image)."""
    errors = (RuntimeError, MemoryError)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        errors += (tf.errors.OpError,)
    return errors


def _detect(model, images, batch_size, paths, on_error):
    """:func:`detect` on a batch; if the batch fails (e.g. out of memory on a huge image), image by image so
    that only the image at fault is lost. Returns one result or None per image."""
    try:
        return detect(model, images, batch_size=batch_size)
    except _runtime_errors() as err:
        if len(images) == 1:
            on_error(paths[0], f"detection failed on image {paths[0]}: {type(err).__name__}: {err}")
            return [None]
    out = []
    for image, path in zip(images, paths):
        out.extend(_detect(model, [image], 1, [path], on_error))
    return out


def detect_files(model, paths, batch_size=1, score_thresh=0.0, out_dir=None, on_error=None, on_result=None):
    """Detect objects in image files: ``(results, failures)``.

    Images are read ``batch_size`` at a time (memory stays bounded for any number of files) with
    :func:`frcnn.data.load_image` (EXIF orientation applied, grayscale and RGBA become RGB). A file that cannot be
    read or processed is reported through ``on_error(path, message)`` and skipped. ``results``: one
    :class:`ImageDetections` per image in input order, keeping detections with ``score >= score_thresh``; with
    ``out_dir`` each image is also written there with its boxes, class names and scores drawn (same file name;
    ``_2``, ``_3``... on a name clash). ``failures``: ``(path, message)`` pairs. ``on_result(result)`` is called
    as each image is done.
    """
    batch_size = max(1, int(batch_size or 1))
    results, failures, used = [], [], set()

    def fail(path, message):
        failures.append((path, message))
        if on_error is not None:
            on_error(path, message)

    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    for start in range(0, len(paths), batch_size):
        loaded = []
        for path in paths[start:start + batch_size]:
            image, problem = _read(path)
            if problem:
                fail(path, problem)
            else:
                loaded.append((path, image))
        if not loaded:
            continue
        images = [image for _, image in loaded]
        batch_paths = [path for path, _ in loaded]
        for (path, image), det in zip(loaded, _detect(model, images, batch_size, batch_paths, fail)):
            if det is None:
                continue
            keep = det["scores"] >= score_thresh
            result = ImageDetections(
                file=path,
                width=int(image.shape[1]),
                height=int(image.shape[0]),
                boxes=det["boxes"][keep],
                scores=det["scores"][keep],
                class_ids=det["classes"][keep],
                class_names=[n for n, k in zip(det["class_names"], keep) if k],
            )
            if out_dir:
                drawn = draw_detections(image, result.boxes, result.scores, result.class_ids, model.class_names)
                target = os.path.join(out_dir, _output_name(path, used))
                try:
                    result.output = save_image(target, drawn)
                except OSError as err:
                    fail(path, f"cannot write the annotated image of {path}: {err}")
                    continue
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results, failures


# ---------------------------------------------------------------------------------------------------- output


def save_detections(path, results, failures=(), **meta):
    """Write ``detections.json``: ``meta`` (weights, config, score threshold, classes...), ``images`` (one entry per
    processed image: file, width, height, boxes ``[x1, y1, x2, y2]`` in original pixels, scores, class names and
    ids, annotated output) and ``failed`` (file and reason). Atomic; strict JSON."""
    doc = dict(meta)
    doc["images"] = [r.to_json() for r in results]
    doc["failed"] = [{"file": p, "error": m} for p, m in failures]
    save_json(doc, path)
    return path
