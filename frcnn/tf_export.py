"""Export a trained detector as a TensorFlow SavedModel whose signatures take images and return detections, and
the TensorFlow backend's ONNX writer (:func:`write_onnx`, tf2onnx through Keras' ``model.export``).

TensorFlow only: imported on that backend by :mod:`frcnn.export`, the backend-neutral entry (``tools/export.py``).

Signatures (``tf.saved_model.load(path).signatures[name]``):

``serving_default``: ``images`` (N,) tf.string, each an encoded image (JPEG, PNG, GIF first frame, BMP), any sizes
    -> ``boxes`` (N, D, 4) float32 ``(x1, y1, x2, y2)`` in each image's original pixels (clipped to the image, as
    ``frcnn.inference.detect`` does), ``scores`` (N, D) float32,
    ``classes`` (N, D) int32 class ids 1..C-1 (0 in padding rows), ``num_detections`` (N,) int32: the rows of
    image ``i`` are ``[:num_detections[i]]``; ``decoded`` (N,) bool: False for a string that does not decode
    (empty, truncated, not an image), which gets zero detections instead of failing the whole batch.
``detect_image``: ``image`` (H, W, 3) uint8 RGB -> the same for that one image, without the batch axis:
    ``boxes`` (D, 4), ``scores`` (D,), ``classes`` (D,), ``num_detections`` () int32.

Class names: ``assets.extra/classes.txt`` (line ``k`` is class ``k``, line 0 the background; no name holds a
newline or another control character, those are refused when the data is read and again here, so lines cannot
shift), the same list as a JSON array in ``assets.extra/classes.json``, and the full resolved config in
``assets.extra/config.yaml``.

Preprocessing is the model's ``transform`` (:meth:`frcnn.transform.ImageTransform.prepare_batch`) in graph ops, so
an exported model gives the detections of ``frcnn.inference.detect`` (float tolerance): decode with ``channels=3``
(grayscale replicated, alpha dropped), one scale ``min(min_size / shorter side, max_size / longer side)`` computed
in float64 as Python does, resized side ``floor(side * scale + 0.5)`` kept within ``[1, max_size]``
(``frcnn.transform.resize_params`` on tensors, through ``frcnn.data.tf_pipeline.resize_params_tf``), bilinear
``tf.image.resize`` on float32 pixels, zero padding bottom / right to a multiple of ``input.size_divisibility`` (or
to the fixed size with ``input.fixed_size``); boxes are divided by the scale. Not applied: the EXIF orientation
of JPEG files (TensorFlow's decoder ignores it; ``frcnn.data.load_image`` applies it), so send upright pixels.
"""

import json
import math
import os

import tensorflow as tf

from frcnn.data.tf_pipeline import resize_image, resize_params_tf
from frcnn.export import check_class_names, write_config, write_export_folder

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

    @staticmethod
    def _decode(data):
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3])

    def prepare_encoded(self, images):
        """(N,) encoded images -> batch dict of the K images that decode: ``images`` (K, Hp, Wp, 3) float32,
        ``image_sizes`` (K, 2) int32, ``scales`` (K,) float32 (as ``prepare_batch``), ``original_sizes`` (K, 2) int32
        (height, width), plus ``index`` (K,) int32, their positions in ``images``, and ``decoded`` (N,) bool.

        Each string is decoded in a ``tf.data`` pipeline that drops the ones that fail (``ignore_errors``): a graph
        cannot catch an error otherwise, and one bad string would fail the whole batch with TensorFlow's generic
        message. With no decodable image, the batch holds one black placeholder (``index`` stays empty)."""
        count = tf.shape(images)[0]
        decoded = tf.data.Dataset.from_tensor_slices((tf.range(count), images)).map(
            lambda i, data: (i, self._decode(data))).ignore_errors()
        index = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[])
        resized = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False,
                                 element_shape=[None, None, 3])
        sizes = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[2])
        scales = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[])
        originals = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[2])
        k = tf.constant(0)
        for i, image in decoded:
            index = index.write(k, i)
            originals = originals.write(k, tf.shape(image)[:2])
            image, size, scale = self.resize(image)
            resized = resized.write(k, image)
            sizes = sizes.write(k, size)
            scales = scales.write(k, scale)
            k += 1
        index = index.stack()
        if k == 0:  # nothing decodes: one placeholder keeps the model's batch non-empty; its rows are dropped
            image, size, scale = self.resize(tf.zeros([1, 1, 3], tf.uint8))
            resized = resized.write(0, image)
            sizes = sizes.write(0, size)
            scales = scales.write(0, scale)
            originals = originals.write(0, tf.constant([1, 1]))
        sizes = sizes.stack()
        height = self._padded_side(tf.reduce_max(sizes[:, 0]))
        width = self._padded_side(tf.reduce_max(sizes[:, 1]))
        batch = tf.TensorArray(tf.float32, size=tf.shape(sizes)[0], element_shape=[None, None, 3])
        for j in tf.range(tf.shape(sizes)[0]):
            batch = batch.write(j, self._pad(resized.read(j), height, width))
        decoded_mask = tf.scatter_nd(index[:, None], tf.ones_like(index, tf.bool), [count])
        return {"images": batch.stack(), "image_sizes": sizes, "scales": scales.stack(),
                "original_sizes": originals.stack(), "index": index, "decoded": decoded_mask}

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
        batch = self.prepare_encoded(images)
        index, decoded = batch.pop("index"), batch.pop("decoded")
        out = self._run(batch)
        count, k = tf.shape(images)[0], tf.shape(index)[0]

        def to_input_rows(value):  # the K decoded images' rows back at their positions; zeros elsewhere
            return tf.scatter_nd(index[:, None], value[:k], tf.concat([[count], tf.shape(value)[1:]], 0))

        result = {key: to_input_rows(value) for key, value in out.items()}
        result["decoded"] = decoded
        return result

    def _detect_image(self, image):
        out = self._run(self.prepare_image(image))
        return {key: value[0] for key, value in out.items()}


def export_saved_model(model, out_dir, cfg=None):
    """Write ``model`` (a built, loaded :class:`frcnn.model.FasterRCNN`) as a SavedModel in ``out_dir``, with the
    resolved config ``cfg`` (when given) in ``assets.extra/config.yaml``.

    Written as :func:`frcnn.export.write_export_folder` writes a folder: beside ``out_dir`` first and moved into
    place, replacing an earlier export (or empty folder) at ``out_dir`` and refusing any other existing path with
    ``FileExistsError``. Returns the absolute path.
    """
    check_class_names(model)

    def write(tmp):
        module = DetectorModule(model)
        signatures = {
            SERVING_SIGNATURE: module.serve_encoded.get_concrete_function(),
            IMAGE_SIGNATURE: module.detect_image.get_concrete_function(),
        }
        tf.saved_model.save(module, tmp, signatures=signatures)
        extra = os.path.join(tmp, EXTRA_DIR)
        os.makedirs(extra, exist_ok=True)
        names = list(model.class_names)
        with open(os.path.join(extra, "classes.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(names) + "\n")
        with open(os.path.join(extra, "classes.json"), "w", encoding="utf-8") as f:
            json.dump(names, f, ensure_ascii=False)
        if cfg is not None:
            write_config(cfg, extra)

    return write_export_folder(out_dir, write)


# ------------------------------------------------------------------------------------------------------- ONNX


def write_onnx(model, path, input_size=None, opset=None):
    """Write ``model`` as the ONNX file ``path`` through Keras' own ``model.export(format="onnx")``, which traces
    ``call`` into a TensorFlow graph and converts it with tf2onnx; batch, height and width stay free
    (``input_size`` must be None). Returns the opset written. The inputs and outputs are those of
    :mod:`frcnn.export` (``ONNX_INPUTS``, ``ONNX_OUTPUTS``)."""
    import keras
    import onnx

    if input_size is not None:
        raise ValueError("TensorFlow's ONNX export takes any input size")
    signature = {
        "images": keras.InputSpec(shape=(None, None, None, 3), dtype="float32", name="images"),
        "image_sizes": keras.InputSpec(shape=(None, 2), dtype="int32", name="image_sizes"),
        "scales": keras.InputSpec(shape=(None,), dtype="float32", name="scales"),
        "original_sizes": keras.InputSpec(shape=(None, 2), dtype="int32", name="original_sizes"),
    }
    model.export(path, format="onnx", input_signature=[signature], verbose=False, opset_version=opset)
    proto = onnx.load(path, load_external_data=False)
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
