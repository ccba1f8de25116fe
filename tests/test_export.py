"""frcnn.tf_export: the in-graph preprocessing of the SavedModel equals the model's ImageTransform.prepare_batch (no
model needed).

The full round trip (export, tf.saved_model.load, same detections as frcnn.inference.detect) is in test_tools.py,
which builds the one tiny model of the tool tests.
"""

import types

import cv2
import numpy as np
import pytest
import tensorflow as tf

from frcnn.config import load_config
from frcnn.tf_export import DetectorModule
from frcnn.transform import ImageTransform


def _stub(min_size, max_size, divisor=32, fixed=False):
    """What DetectorModule reads of a model before tracing: ``transform`` and ``variables``."""
    cfg = load_config("test.yaml", [f"input.min_size={min_size}", f"input.max_size={max_size}",
                                    f"input.size_divisibility={divisor}", f"input.fixed_size={str(fixed).lower()}"])
    return types.SimpleNamespace(transform=ImageTransform.from_input_config(cfg.input), variables=[])


def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


def _png(image):
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    assert ok
    return data.tobytes()


def _assert_same(batch, expected):
    np.testing.assert_array_equal(np.asarray(batch["image_sizes"]), expected["image_sizes"])
    np.testing.assert_array_equal(np.asarray(batch["scales"]), expected["scales"])
    assert tuple(batch["images"].shape) == expected["images"].shape
    # tf.image.resize (the SavedModel) and cv2.INTER_LINEAR (prepare_batch) sample at the same positions, TensorFlow
    # computing them in float32: up to about 0.01 of 255 apart where the scale is not exact in binary.
    np.testing.assert_allclose(np.asarray(batch["images"]), expected["images"], rtol=0, atol=0.02)


@pytest.mark.parametrize(
    "min_size, max_size, divisor, fixed, shapes",
    [
        (128, 128, 32, False, [(100, 150), (90, 70), (128, 128)]),  # downscale, upscale, identity
        (6, 100, 4, False, [(4, 7)]),  # 7 * 1.5 = 10.5: Python's round (half to even) gives 10, as tf.round
        (64, 100, 16, False, [(30, 200), (201, 33)]),  # the longer side caps the scale
        (96, 128, 32, True, [(50, 60), (17, 140)]),  # fixed_size: padded to (128, 128)
    ],
)
def test_encoded_batch_equals_prepare_batch(min_size, max_size, divisor, fixed, shapes):
    stub = _stub(min_size, max_size, divisor, fixed)
    images = _images(shapes)
    expected = stub.transform.prepare_batch(images)
    module = DetectorModule(stub)
    batch = module.prepare_encoded(tf.constant([_png(image) for image in images]))
    _assert_same(batch, expected)
    np.testing.assert_array_equal(np.asarray(batch["original_sizes"]), np.asarray(shapes))


def test_single_image_equals_prepare_batch():
    stub = _stub(128, 160)
    (image,) = _images([(77, 131)])
    expected = stub.transform.prepare_batch([image])
    batch = DetectorModule(stub).prepare_image(tf.constant(image))
    _assert_same(batch, expected)


def test_grayscale_and_rgba_decode_to_rgb():
    stub = _stub(64, 64)
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(40, 50), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(30, 20, 4), dtype=np.uint8)
    encoded = [cv2.imencode(".png", gray)[1].tobytes(), cv2.imencode(".png", rgba)[1].tobytes()]
    as_rgb = [np.repeat(gray[:, :, None], 3, axis=2), np.ascontiguousarray(rgba[:, :, 2::-1])]  # BGRA -> RGB
    expected = stub.transform.prepare_batch(as_rgb)
    _assert_same(DetectorModule(stub).prepare_encoded(tf.constant(encoded)), expected)
