"""The one image transform: resize, pad and normalise on the way in, and the way back to original pixels.

Owns the image rules, each written once:

- Resize (:func:`resize_params`): one factor per image, ``scale = min(min_size / shorter side, max_size / longer
  side)`` computed in float64; the resized side is ``floor(side * scale + 0.5)`` within ``[1, max_size]``; bilinear
  interpolation with half-pixel centres and no antialiasing (``cv2.INTER_LINEAR`` here and in the NumPy pipeline,
  ``tf.image.resize`` in the ``tf.data`` pipeline and the SavedModel: the two agree up to float32 round-off of the
  sampling positions, see docs/NOTES.md).
- Pad (:func:`padded_side`, :func:`padded_shape`): bottom/right zeros up to a multiple of ``input.size_divisibility``
  (or ``max_size`` rounded up to it with ``input.fixed_size``).
- Ground truth (:func:`scale_boxes`, :func:`flip_boxes`): boxes times the image's single ``scale``; a horizontal flip
  maps ``(x1, y1, x2, y2)`` to ``(w - x2, y1, w - x1, y2)``.
- Normalise (:func:`normalize`, inside the model, ``keras.ops``): RGB ``[0, 255]`` -> ``input.channel_order`` ->
  minus ``input.pixel_mean``, divided by ``input.pixel_std``; the batch padding is 0 after normalisation.
- Back (:func:`to_original`): boxes divided by the image's ``scale``, then clipped to the original image.

The rules that run inside a ``tf.data`` or SavedModel graph take an array namespace ``xp``: ``numpy`` (the default)
or ``tensorflow.experimental.numpy`` on tensors. :class:`ImageTransform` is the model's input part (what
torchvision's ``GeneralizedRCNNTransform`` is to its detector): the rules with their settings, serialisable.

Must not import TensorFlow (the model path runs without it) nor Keras at import time (``frcnn.data`` imports this
module and must stay free of both): ``keras.ops`` is imported inside the two functions that use it.
"""

import numpy as np

_CHANNEL_ORDERS = ("bgr", "rgb")


def resize_params(height, width, min_size, max_size, xp=np):
    """The resize rule: ``(scale, size)`` for an image of ``height x width``, shorter side ``min_size`` unless the
    longer would exceed ``max_size``. ``scale`` is float32 (boxes are multiplied by it), ``size`` the int32
    ``(new_height, new_width)``; both computed in float64 with the namespace ``xp`` (``numpy``, or
    ``tensorflow.experimental.numpy`` on graph tensors: ``min_size`` may then be a tensor drawn per image)."""
    f64 = xp.float64
    h, w = xp.asarray(height, dtype=f64), xp.asarray(width, dtype=f64)
    min_size, max_size = xp.asarray(min_size, dtype=f64), xp.asarray(max_size, dtype=f64)
    scale = xp.minimum(min_size / xp.minimum(h, w), max_size / xp.maximum(h, w))
    size = xp.clip(xp.floor(xp.stack([h, w]) * scale + 0.5), 1.0, max_size)
    return xp.asarray(scale, dtype=xp.float32), xp.asarray(size, dtype=xp.int32)


def padded_side(size_divisibility, side):
    """``side`` rounded up to a multiple of ``size_divisibility`` (Python ints, NumPy arrays or integer tensors)."""
    return (side + size_divisibility - 1) // size_divisibility * size_divisibility


def padded_shape(sizes, size_divisibility, fixed_size=False, max_size=None):
    """The padded ``(height, width)`` of a batch of images of ``sizes`` (``(B, 2)`` resized heights and widths): the
    largest of each rounded up to ``size_divisibility``, or ``max_size`` rounded up with ``fixed_size``."""
    if fixed_size:
        side = padded_side(size_divisibility, int(max_size))
        return side, side
    sizes = np.asarray(sizes).reshape(-1, 2)
    return (padded_side(size_divisibility, int(sizes[:, 0].max())),
            padded_side(size_divisibility, int(sizes[:, 1].max())))


def scale_boxes(boxes, scale):
    """Ground-truth ``(K, 4)`` boxes in original pixels -> resized pixels (float32 times the float32 ``scale``)."""
    return boxes * scale


def flip_boxes(boxes, width, xp=np):
    """``(K, 4)`` boxes of an image ``width`` wide, mirrored left-right with the image: ``(w - x2, y1, w - x1, y2)``.
    ``width`` has the boxes' dtype."""
    return xp.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def resize_array(image, size):
    """``(H, W, 3)`` pixels -> float32 ``(height, width, 3)`` with ``size = (height, width)``: bilinear, half-pixel
    centres, no antialiasing (``cv2.INTER_LINEAR`` on float32; ``tf.image.resize`` in TensorFlow graphs)."""
    import cv2

    height, width = int(size[0]), int(size[1])
    image = np.asarray(image, np.float32)
    if image.shape[:2] == (height, width):
        return image.copy()
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def normalize(images, image_sizes, pixel_mean, pixel_std, channel_order="bgr"):
    """RGB ``[0, 255]`` images -> ``channel_order``, minus ``pixel_mean``, divided by ``pixel_std`` (per channel,
    in ``channel_order``). Pixels of the batch padding (outside each image's true ``(height, width)``) are 0 after
    normalisation, so padding looks like an average pixel rather than a dark border."""
    from keras import ops

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
    from keras import ops

    boxes = ops.cast(boxes, "float32") / ops.cast(scales, "float32")[:, None, None]
    if original_sizes is None:
        return boxes
    sizes = ops.cast(original_sizes, "float32")
    limits = ops.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=-1)[:, None, :]  # (B, 1, 4)
    return ops.minimum(boxes, limits)


class ImageTransform:
    """The detector's input part: images in, the model's batch out (:meth:`prepare_batch`, NumPy/OpenCV), the
    normalisation inside the model (:meth:`normalize`, ``keras.ops``) and the way back (:meth:`to_original`).

    ``min_size`` is the test-time shorter side (training draws its own in the input pipelines); ``max_size`` caps the
    longer side; ``size_divisibility`` and ``fixed_size`` are the pad rule; ``pixel_mean`` / ``pixel_std`` are per
    channel in ``channel_order`` (``bgr`` or ``rgb``). :meth:`get_config` is a plain JSON-able dict.
    """

    def __init__(self, min_size=600, max_size=1000, size_divisibility=32, fixed_size=False,
                 pixel_mean=(103.939, 116.779, 123.68), pixel_std=(1.0, 1.0, 1.0), channel_order="bgr"):
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.size_divisibility = int(size_divisibility)
        self.fixed_size = bool(fixed_size)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.channel_order = str(channel_order)
        if self.min_size < 1 or self.max_size < 1 or self.size_divisibility < 1:
            raise ValueError(f"ImageTransform: min_size ({min_size}), max_size ({max_size}) and size_divisibility "
                             f"({size_divisibility}) must be positive")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(f"ImageTransform: pixel_mean {pixel_mean} and pixel_std {pixel_std} need 3 values each, "
                             "the std positive")
        if self.channel_order not in _CHANNEL_ORDERS:
            raise ValueError(f"ImageTransform: channel_order {channel_order!r} is not one of {_CHANNEL_ORDERS}")

    @classmethod
    def from_input_config(cls, input_cfg):
        """From the config's ``input`` section (its test-time shorter side, ``input.test_min_size``)."""
        return cls(input_cfg.test_min_size, input_cfg.max_size, input_cfg.size_divisibility, input_cfg.fixed_size,
                   input_cfg.pixel_mean, input_cfg.pixel_std, input_cfg.channel_order)

    def get_config(self):
        return {"min_size": self.min_size, "max_size": self.max_size, "size_divisibility": self.size_divisibility,
                "fixed_size": self.fixed_size, "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std), "channel_order": self.channel_order}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"ImageTransform({args})"

    def __eq__(self, other):
        return isinstance(other, ImageTransform) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(repr(self))

    def resize_params(self, height, width):
        """``(scale float32, (new_height, new_width) int32)`` at the test-time size (:func:`resize_params`)."""
        return resize_params(height, width, self.min_size, self.max_size)

    def prepare_batch(self, images):
        """A list of ``H x W x 3`` uint8 RGB arrays -> the model's inference batch, as the input pipelines prepare
        evaluation images: ``images`` (B, Hp, Wp, 3) float32, ``image_sizes`` (B, 2) int32, ``scales`` (B,) float32
        and ``original_sizes`` (B, 2) int32 (NumPy arrays)."""
        resized, sizes, scales = [], [], []
        for image in images:
            scale, size = self.resize_params(image.shape[0], image.shape[1])
            resized.append(resize_array(image, size))
            sizes.append(size)
            scales.append(scale)
        sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
        ph, pw = padded_shape(sizes, self.size_divisibility, self.fixed_size, self.max_size)
        batch = np.zeros((len(resized), ph, pw, 3), np.float32)
        for i, image in enumerate(resized):
            batch[i, : image.shape[0], : image.shape[1]] = image
        # One scale per image (as in the input pipelines); rounding the resized size moves boxes by < 0.5 px.
        return {
            "images": batch,
            "image_sizes": sizes,
            "scales": np.asarray(scales, np.float32).reshape(-1),
            "original_sizes": np.asarray([image.shape[:2] for image in images], np.int32).reshape(-1, 2),
        }

    def normalize(self, images, image_sizes):
        """:func:`normalize` with this transform's mean, std and channel order (``keras.ops``; the model calls it)."""
        return normalize(images, image_sizes, self.pixel_mean, self.pixel_std, self.channel_order)

    @staticmethod
    def to_original(boxes, scales, original_sizes=None):
        """:func:`to_original` (``keras.ops``)."""
        return to_original(boxes, scales, original_sizes)

