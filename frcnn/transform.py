"""The one image transform: resize, pad and normalise on the way in, and the way back to original pixels.

Used by the ``tf.data`` pipeline (:mod:`frcnn.data.pipeline`), ``FasterRCNN.detect`` and ``call``, the
evaluation job and the SavedModel export, so that all of them see the same pixels and give the same boxes.

- Resize: one factor per image, ``scale = min(min_size / shorter side, max_size / longer side)`` computed in float64;
  the resized side is ``floor(side * scale + 0.5)`` within ``[1, max_size]``; bilinear (``tf.image.resize``).
- Pad: bottom/right zeros up to a multiple of ``input.size_divisibility`` (or ``max_size`` with
  ``input.fixed_size``).
- Normalise (inside the model, ``keras.ops``): RGB ``[0, 255]`` -> ``input.channel_order`` -> minus
  ``input.pixel_mean``, divided by ``input.pixel_std``; the batch padding is 0 after normalisation.
- Back: boxes divided by the image's ``scale``, then clipped to the original image.

Resizing is done by TensorFlow, the input-pipeline library on every Keras backend.
"""

import math

import numpy as np
import tensorflow as tf
from keras import ops


def resize_params_tf(height, width, min_size, max_size):
    """The resize rule: ``(scale float32, (2,) int32 new (height, width))`` for an image of ``height x width``:
    shorter side ``min_size``, longer at most ``max_size``; computed in float64 (graph ops, also usable eagerly)."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    min_size, max_size = tf.cast(min_size, tf.float64), tf.cast(max_size, tf.float64)
    scale = tf.minimum(min_size / tf.minimum(h, w), max_size / tf.maximum(h, w))
    new_h = tf.clip_by_value(tf.floor(h * scale + 0.5), 1.0, max_size)
    new_w = tf.clip_by_value(tf.floor(w * scale + 0.5), 1.0, max_size)
    return tf.cast(scale, tf.float32), tf.cast(tf.stack([new_h, new_w]), tf.int32)


def padded_side(size_divisibility, side):
    return int(math.ceil(side / size_divisibility) * size_divisibility)


def resize_image(image, new_size):
    """``tf.image.resize`` (bilinear, no antialiasing) to ``new_size = (height, width)``, float32 in [0, 255]."""
    return tf.image.resize(tf.cast(image, tf.float32), new_size, method="bilinear")


def prepare_batch(images, input_cfg):
    """A list of ``H x W x 3`` uint8 RGB arrays -> the model's inference batch, exactly as the ``tf.data`` pipeline
    prepares evaluation images: ``images`` (B, Hp, Wp, 3) float32, ``image_sizes`` (B, 2) int32, ``scales`` (B,)
    float32 and ``original_sizes`` (B, 2) int32."""
    resized, sizes, scales = [], [], []
    for image in images:
        scale, size = resize_params_tf(image.shape[0], image.shape[1], input_cfg.test_min_size, input_cfg.max_size)
        resized.append(resize_image(image, size).numpy())
        sizes.append(tuple(int(v) for v in size.numpy()))
        scales.append(float(scale))
    if input_cfg.fixed_size:
        ph = pw = padded_side(input_cfg.size_divisibility, input_cfg.max_size)
    else:
        ph = padded_side(input_cfg.size_divisibility, max(s[0] for s in sizes))
        pw = padded_side(input_cfg.size_divisibility, max(s[1] for s in sizes))
    batch = np.zeros((len(images), ph, pw, 3), np.float32)
    for i, image in enumerate(resized):
        batch[i, : image.shape[0], : image.shape[1]] = image
    # One scale per image (as in the tf.data pipeline); rounding the resized size moves boxes by < 0.5 px.
    return {
        "images": batch,
        "image_sizes": np.asarray(sizes, np.int32),
        "scales": np.asarray(scales, np.float32),
        "original_sizes": np.asarray([image.shape[:2] for image in images], np.int32),
    }


def normalize(images, image_sizes, pixel_mean, pixel_std, channel_order="bgr"):
    """RGB ``[0, 255]`` images -> ``channel_order``, minus ``pixel_mean``, divided by ``pixel_std`` (per channel,
    in ``channel_order``). Pixels of the batch padding (outside each image's true ``(height, width)``) are 0 after
    normalisation, so padding looks like an average pixel rather than a dark border."""
    images = ops.cast(images, "float32")
    if channel_order == "bgr":
        images = ops.flip(images, axis=-1)  # not [..., ::-1]: PyTorch tensors take no negative step
    mean = ops.convert_to_tensor(np.asarray(pixel_mean, np.float32))
    inv_std = ops.convert_to_tensor(1.0 / np.asarray(pixel_std, np.float32))
    shape = ops.shape(images)
    image_sizes = ops.cast(image_sizes, "int32")
    rows = ops.arange(shape[1], dtype="int32")[None, :, None] < image_sizes[:, 0][:, None, None]
    cols = ops.arange(shape[2], dtype="int32")[None, None, :] < image_sizes[:, 1][:, None, None]
    inside = ops.logical_and(rows, cols)[..., None]
    return ops.where(inside, (images - mean) * inv_std, 0.0)


def to_original(boxes, scales, original_sizes=None):
    """``(B, D, 4)`` boxes in resized pixels -> original image pixels: divided by each image's ``scale`` and, with
    ``original_sizes`` ``(B, 2)`` (height, width), clipped to the original image (rounding the resized size can put
    an edge up to half a pixel outside)."""
    boxes = ops.cast(boxes, "float32") / ops.cast(scales, "float32")[:, None, None]
    if original_sizes is None:
        return boxes
    sizes = ops.cast(original_sizes, "float32")
    limits = ops.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=-1)[:, None, :]  # (B, 1, 4)
    return ops.minimum(boxes, limits)


class ImageTransform:
    """The model's input part (placeholder until the data branch lands): resize rule parameters for inference and
    the normalisation. See the data branch for the full version."""

    def __init__(self, min_size=800, max_size=1333, size_divisibility=32, fixed_size=False,
                 pixel_mean=(103.939, 116.779, 123.68), pixel_std=(1.0, 1.0, 1.0), channel_order="bgr"):
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.size_divisibility = int(size_divisibility)
        self.fixed_size = bool(fixed_size)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.channel_order = channel_order

    @classmethod
    def from_input_config(cls, input_cfg):
        return cls(input_cfg.test_min_size, input_cfg.max_size, input_cfg.size_divisibility, input_cfg.fixed_size,
                   input_cfg.pixel_mean, input_cfg.pixel_std, input_cfg.channel_order)

    def get_config(self):
        return {"min_size": self.min_size, "max_size": self.max_size, "size_divisibility": self.size_divisibility,
                "fixed_size": self.fixed_size, "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std), "channel_order": self.channel_order}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def prepare_batch(self, images):
        import types
        cfg = types.SimpleNamespace(test_min_size=self.min_size, max_size=self.max_size,
                                    size_divisibility=self.size_divisibility, fixed_size=self.fixed_size)
        return prepare_batch(images, cfg)

    def normalize(self, images, image_sizes):
        return normalize(images, image_sizes, self.pixel_mean, self.pixel_std, self.channel_order)
