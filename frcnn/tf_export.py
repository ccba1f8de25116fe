"""Export a trained detector as a TensorFlow SavedModel (TensorFlow only: imported on that backend) whose signatures take images and return detections.

Signatures (``tf.saved_model.load(path).signatures[name]``):

``serving_default``: ``images`` (N,) tf.string, each an encoded image (JPEG, PNG, GIF first frame, BMP), any sizes
    -> ``boxes`` (N, D, 4) float32 ``(x1, y1, x2, y2)`` in each image's original pixels (clipped to the image, as
    ``FasterRCNN.detect`` does), ``scores`` (N, D) float32,
    ``classes`` (N, D) int32 class ids 1..C-1 (0 in padding rows), ``num_detections`` (N,) int32: the rows of
    image ``i`` are ``[:num_detections[i]]``.
``detect_image``: ``image`` (H, W, 3) uint8 RGB -> the same for that one image, without the batch axis:
    ``boxes`` (D, 4), ``scores`` (D,), ``classes`` (D,), ``num_detections`` () int32.

Class names: ``assets.extra/classes.txt`` (line ``k`` is class ``k``, line 0 the background) and the full
resolved config in ``assets.extra/config.yaml``.

Preprocessing is the model's ``transform`` (:meth:`frcnn.transform.ImageTransform.prepare_batch`) in graph ops, so an exported model gives the
detections of ``model.detect`` (float tolerance): decode with ``channels=3`` (grayscale replicated, alpha dropped),
one scale ``min(min_size / shorter side, max_size / longer side)`` computed in float64 as Python does, resized
side ``floor(side * scale + 0.5)`` kept within ``[1, max_size]`` (``frcnn.transform.resize_params`` on tensors, via ``frcnn.data.tf_pipeline.resize_params_tf``), bilinear
``tf.image.resize`` on float32 pixels, zero padding bottom / right to a multiple of ``input.size_divisibility`` (or
to the fixed size with ``input.fixed_size``); boxes are divided by the scale. Not applied: the EXIF orientation
of JPEG files (TensorFlow's decoder ignores it; ``frcnn.data.load_image`` applies it), so send upright pixels.
"""

import math
import os
import shutil
import tempfile

import tensorflow as tf

from frcnn.config import save_config
from frcnn.data.tf_pipeline import resize_image, resize_params_tf

SERVING_SIGNATURE = "serving_default"
IMAGE_SIGNATURE = "detect_image"
EXTRA_DIR = "assets.extra"  # the SavedModel convention for files that are not part of the graph


class DetectorModule(tf.Module):
    """A ``tf.Module`` around a built :class:`frcnn.model.FasterRCNN` with the two serving functions."""

    def __init__(self, model):
        super().__init__(name="frcnn_detector")
        # Only the variables are tracked (what Keras' own ExportArchive does): tracking the Keras model itself would
        # make tf.saved_model.save walk its whole object graph, which costs minutes and stores nothing useful.
        object.__setattr__(self, "model", model)
        self.model_variables = list(model.variables)
        t = model.transform
        self._min_size = float(t.min_size)
        self._max_size = float(t.max_size)
        self._divisor = int(t.size_divisibility)
        self._fixed = int(math.ceil(t.max_size / t.size_divisibility) * t.size_divisibility) \
            if t.fixed_size else None
        self.serve_encoded = tf.function(
            self._serve_encoded, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        self.detect_image = tf.function(
            self._detect_image, input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")])

    # ----------------------------------------------------------------------------------------- preprocessing
    # Eager-compatible too: tests compare these with ImageTransform.prepare_batch.

    def resize(self, image):
        """uint8 (H, W, 3) -> float32 resized image, its (height, width) int32 and the scale (float32)."""
        shape = tf.shape(image)
        scale, size = resize_params_tf(shape[0], shape[1], self._min_size, self._max_size)
        return resize_image(image, size), size, scale

    def _padded_side(self, side):
        if self._fixed is not None:
            return tf.constant(self._fixed, tf.int32)
        return (side + self._divisor - 1) // self._divisor * self._divisor

    def _pad(self, image, height, width):
        size = tf.shape(image)
        return tf.pad(image, [[0, height - size[0]], [0, width - size[1]], [0, 0]])

    def prepare_encoded(self, images):
        """(N,) encoded images -> batch dict: ``images`` (N, Hp, Wp, 3) float32, ``image_sizes`` (N, 2) int32,
        ``scales`` (N,) float32 (as ``prepare_batch``) and ``original_sizes`` (N, 2) int32 (height, width)."""
        count = tf.shape(images)[0]
        resized = tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=[None, None, 3])
        sizes = tf.TensorArray(tf.int32, size=count, element_shape=[2])
        scales = tf.TensorArray(tf.float32, size=count, element_shape=[])
        originals = tf.TensorArray(tf.int32, size=count, element_shape=[2])
        for i in tf.range(count):
            image = tf.io.decode_image(images[i], channels=3, dtype=tf.uint8, expand_animations=False)
            image = tf.ensure_shape(image, [None, None, 3])
            originals = originals.write(i, tf.shape(image)[:2])
            image, size, scale = self.resize(image)
            resized = resized.write(i, image)
            sizes = sizes.write(i, size)
            scales = scales.write(i, scale)
        sizes = sizes.stack()
        height = self._padded_side(tf.reduce_max(sizes[:, 0]))
        width = self._padded_side(tf.reduce_max(sizes[:, 1]))
        batch = tf.TensorArray(tf.float32, size=count, element_shape=[None, None, 3])
        for i in tf.range(count):
            batch = batch.write(i, self._pad(resized.read(i), height, width))
        return {"images": batch.stack(), "image_sizes": sizes, "scales": scales.stack(),
                "original_sizes": originals.stack()}

    def prepare_image(self, image):
        """One uint8 (H, W, 3) image -> the batch dict of :meth:`prepare_encoded` with N = 1."""
        resized, size, scale = self.resize(image)
        padded = self._pad(resized, self._padded_side(size[0]), self._padded_side(size[1]))
        return {"images": padded[None], "image_sizes": size[None], "scales": scale[None],
                "original_sizes": tf.shape(image)[None, :2]}

    # --------------------------------------------------------------------------------------------- inference

    def _run(self, batch):
        out = self.model(batch, training=False)  # boxes back in original pixels, clipped to the image
        return {
            "boxes": tf.cast(out["boxes"], tf.float32),
            "scores": tf.cast(out["scores"], tf.float32),
            "classes": tf.cast(out["classes"], tf.int32),
            "num_detections": tf.cast(out["num_detections"], tf.int32),
        }

    def _serve_encoded(self, images):
        return self._run(self.prepare_encoded(images))

    def _detect_image(self, image):
        out = self._run(self.prepare_image(image))
        return {key: value[0] for key, value in out.items()}


def export_saved_model(model, out_dir, cfg=None):
    """Write ``model`` (a built, loaded :class:`frcnn.model.FasterRCNN`) as a SavedModel in ``out_dir``, with the
    resolved config ``cfg`` (when given) in ``assets.extra/config.yaml``.

    The SavedModel is written beside ``out_dir`` first and moved into place, so an interrupted export leaves no
    half-written model. An existing SavedModel (or empty folder) at ``out_dir`` is replaced; any other existing
    path is refused with ``FileExistsError``. Returns the absolute path.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        is_saved_model = os.path.isfile(os.path.join(out_dir, "saved_model.pb"))
        if not os.path.isdir(out_dir) or (os.listdir(out_dir) and not is_saved_model):
            raise FileExistsError(f"{out_dir} exists and is not a SavedModel; choose another output folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        module = DetectorModule(model)
        signatures = {
            SERVING_SIGNATURE: module.serve_encoded.get_concrete_function(),
            IMAGE_SIGNATURE: module.detect_image.get_concrete_function(),
        }
        tf.saved_model.save(module, tmp, signatures=signatures)
        extra = os.path.join(tmp, EXTRA_DIR)
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, "classes.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(model.class_names) + "\n")
        if cfg is not None:
            save_config(cfg, os.path.join(extra, "config.yaml"))
            os.chmod(os.path.join(extra, "config.yaml"), 0o644)  # save_config writes through a private temp file
        os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; an exported model is meant to be shared
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".old-export-", dir=parent)
            os.rename(out_dir, os.path.join(old, "model"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

