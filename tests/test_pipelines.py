"""The two input pipelines agree (tf.data and NumPy), the image rules are the same in NumPy and in TensorFlow graphs,
ImageTransform, truncated-JPEG recovery without TensorFlow, the TensorBoard writer, and the data side without
TensorFlow installed (a subprocess where ``import tensorflow`` fails, on JAX)."""

import json
import os
import subprocess
import sys
import textwrap
import types

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from frcnn import data, transform
from frcnn.data import imageio, numpy_pipeline, tf_pipeline
from frcnn.transform import ImageTransform

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_data import make_cfg, noise_image, take, voc_xml  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tf.image.resize computes its sampling positions in float32, cv2.INTER_LINEAR in double: where the scale is not exact
# in binary, pixels differ by up to about 0.01 (of 255). Measured: 0.0101 at most (docs/NOTES.md, session 8).
RESIZE_ATOL = 0.02


def png_voc(root, images, objects=None):
    """A VOC root of PNG images (lossless: both pipelines decode the same pixels). ``images``: ``{id: array}``;
    ``objects``: ``{id: [(x1, y1, x2, y2), ...]}`` of class "dog"."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, image in images.items():
        pixels = image if image.ndim == 2 or image.shape[2] == 4 else image[:, :, ::-1]
        assert cv2.imwrite(os.path.join(root, "JPEGImages", image_id + ".png"), pixels)
        boxes = (objects or {}).get(image_id, [])
        with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
            f.write(voc_xml(image_id + ".png", (image.shape[1], image.shape[0]),
                            [{"name": "dog", "box": box} for box in boxes]))
    with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    return str(root)


def _scenes(tmp_path):
    rgba = np.concatenate([noise_image(50, 70, 4), np.full((50, 70, 1), 200, np.uint8)], axis=2)
    images = {"wide": noise_image(60, 150), "tall": noise_image(130, 40, 1), "small": noise_image(31, 47, 2),
              "gray": noise_image(45, 66, 3)[:, :, 0], "rgba": rgba}
    objects = {"wide": [(5, 6, 50, 40), (60, 1, 150, 60)], "tall": [(1, 1, 39, 100)], "small": [(3, 3, 20, 30)],
               "rgba": [(10, 10, 60, 45)]}
    return png_voc(tmp_path / "voc", images, objects)


def _assert_same_batches(a, b, atol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
            if key != "images":
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        np.testing.assert_allclose(x["images"], y["images"], rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------- the two pipelines


@pytest.mark.parametrize("fixed", [False, True])
def test_pipelines_give_the_same_evaluation_batches(tmp_path, fixed):
    root = _scenes(tmp_path)
    cfg = make_cfg(root, data_extra={"classes": ["dog"]},
                   input_extra={"min_size": 96, "max_size": 160, "size_divisibility": 32, "fixed_size": fixed})
    records, _, report = data.load_records(cfg, "train")
    assert len(records) == 5 and not report
    batches = {p: take(data.build_dataset(cfg, records, False, 2, pipeline=p)) for p in ("tf", "numpy")}
    assert [b["image_ids"].tolist() for b in batches["numpy"]] == [[0, 1], [2, 3], [4]]
    _assert_same_batches(batches["tf"], batches["numpy"], RESIZE_ATOL)


def test_pipelines_agree_on_the_raccoon_jpegs(raccoon_root):
    """JPEG: TensorFlow decodes with libjpeg's fast integer IDCT, OpenCV with the accurate one; the pixels differ
    by a few levels (measured on these images at 600/1000: at most 9.2, 0.7 on average), everything else is equal."""
    cfg = make_cfg(raccoon_root, input_extra={"min_size": 300, "max_size": 500})
    val, _, _ = data.load_records(cfg, "val")
    val = val[:6]
    batches = {p: take(data.build_dataset(cfg, val, False, 3, pipeline=p)) for p in ("tf", "numpy")}
    _assert_same_batches(batches["tf"], batches["numpy"], atol=12)
    for a, b in zip(batches["tf"], batches["numpy"]):
        for i, (h, w) in enumerate(a["image_sizes"]):
            assert np.abs(a["images"][i, :h, :w] - b["images"][i, :h, :w]).mean() < 1.5


def test_pipelines_give_the_same_training_batches_with_the_draws_forced(tmp_path, monkeypatch):
    """The random choices cannot be matched (tf.data's shuffle buffer and seed stream against the NumPy pipeline's
    permutations): with the flip and the scale forced, each image comes out the same."""
    root = _scenes(tmp_path)
    cfg = make_cfg(root, data_extra={"classes": ["dog"]},
                   input_extra={"min_size": [64, 96], "max_size": 160, "flip": True})
    records, _, _ = data.load_records(cfg, "train")
    monkeypatch.setattr(tf_pipeline, "_draws", lambda seed, n, flip: (tf.constant(1), tf.constant(True)))
    monkeypatch.setattr(numpy_pipeline, "_draws", lambda seed, position, n, flip: (1, True))
    by_id = {}
    for p in ("tf", "numpy"):
        for batch in take(data.build_dataset(cfg, records, True, 1, pipeline=p), 5):
            by_id.setdefault(int(batch["image_ids"][0]), {})[p] = batch
    assert sorted(by_id) == [0, 1, 2, 3, 4]  # one pass: every image once
    for image_id, pair in by_id.items():
        _assert_same_batches([pair["tf"]], [pair["numpy"]], RESIZE_ATOL)
        record = records[image_id]  # the second training size, forced
        expected = transform.resize_params(record.height, record.width, 96, 160)[1]
        np.testing.assert_array_equal(pair["numpy"]["image_sizes"][0], expected)
    record = next(r for r in records if r.source_id == "wide")
    wide = by_id[record.image_id]["numpy"]  # 60 x 150 -> 96 x 240, capped at 160: scale 160 / 150, flipped
    x1, y1, x2, y2 = record.boxes[0] * np.float32(160 / 150)
    np.testing.assert_array_equal(wide["gt_boxes"][0, 0], [160 - x2, y1, 160 - x1, y2])


def test_numpy_training_batches_do_not_depend_on_the_workers(tmp_path):
    root = _scenes(tmp_path)
    cfg = make_cfg(root, data_extra={"classes": ["dog"]},
                   input_extra={"min_size": [64, 96], "max_size": 160, "flip": True})
    records, _, _ = data.load_records(cfg, "train")
    one = numpy_pipeline.NumpyDataset(cfg, records, True, 2, seed=5, workers=1)
    three = numpy_pipeline.NumpyDataset(cfg, records, True, 2, seed=5, workers=3)
    a, b = take(one, 10), take(three, 10)
    _assert_same_batches(a, b, atol=0)
    _assert_same_batches([three[7], three[2]], [a[7], a[2]], atol=0)  # batch i, however it is reached
    ids = [i for batch in a for i in batch["image_ids"]]
    assert sorted(ids[:5]) == sorted(ids[5:10]) == [0, 1, 2, 3, 4] and ids[:5] != ids[5:10]  # reshuffled per pass
    picks = set()
    for batch in a:
        for image_id, size in zip(batch["image_ids"], batch["image_sizes"]):
            r = records[image_id]
            picks.update(lo for lo in (64, 96) if size.tolist() == transform.resize_params(r.height, r.width, lo,
                                                                                            160)[1].tolist())
    assert picks == {64, 96}  # both training sizes drawn
    other = take(numpy_pipeline.NumpyDataset(cfg, records, True, 2, seed=6, workers=2), 10)
    assert [i for batch in other for i in batch["image_ids"]] != ids


# ----------------------------------------------------------------------------------------------------- the rules


def test_resize_and_orientation_rules_are_the_same_on_tensors():
    cases = [(100, 200, 150, 500), (100, 400, 150, 500), (4, 7, 6, 100), (375, 500, 600, 1000), (1, 5000, 600, 1000),
             (333, 500, 600, 1000), (77, 131, 128, 160)]

    @tf.function
    def graph(h, w, lo, hi):
        return transform.resize_params(h, w, lo, hi, xp=tnp)

    for h, w, lo, hi in cases:
        scale, size = transform.resize_params(h, w, lo, hi)
        assert scale.dtype == np.float32 and size.dtype == np.int32
        t_scale, t_size = graph(tf.constant(h), tf.constant(w), tf.constant(lo), tf.constant(hi))
        assert scale == t_scale.numpy() and size.tolist() == t_size.numpy().tolist(), (h, w, lo, hi)
        assert 1 <= size.min() and size.max() <= hi
    assert transform.resize_params(100, 200, 150, 500)[1].tolist() == [150, 300]
    image = noise_image(5, 7)
    for k in range(1, 9):
        np.testing.assert_array_equal(tf_pipeline.apply_orientation(tf.constant(image), k).numpy(),
                                      imageio.orient(image, k))
    assert transform.padded_shape([[150, 300], [125, 500]], 32) == (160, 512)
    assert transform.padded_shape([[10, 10]], 32, fixed_size=True, max_size=500) == (512, 512)


def test_image_transform_config_and_prepare_batch(tmp_path):
    cfg = make_cfg(str(tmp_path), input_extra={"min_size": [96, 128], "max_size": 160, "size_divisibility": 16,
                                               "channel_order": "rgb", "pixel_mean": [1.0, 2.0, 3.0]})
    t = ImageTransform.from_input_config(cfg.input)
    config = t.get_config()
    assert json.loads(json.dumps(config)) == config and ImageTransform.from_config(config) == t
    assert config["min_size"] == 128 and config["channel_order"] == "rgb"  # the test-time size
    images = [noise_image(100, 150), noise_image(90, 70, 1), noise_image(128, 128, 2)]
    batch = t.prepare_batch(images)
    np.testing.assert_array_equal(batch["scales"], np.float32([160 / 150, 160 / 90, 1.0]))  # max_size caps two
    np.testing.assert_array_equal(batch["image_sizes"], [[107, 160], [160, 124], [128, 128]])
    assert batch["images"].shape == (3, 160, 160, 3)
    for image, resized, size in zip(images, batch["images"], batch["image_sizes"]):
        expected = tf_pipeline.resize_image(image, size).numpy()
        np.testing.assert_allclose(resized[: size[0], : size[1]], expected, rtol=0, atol=RESIZE_ATOL)
        assert not resized[size[0]:].any() and not resized[:, size[1]:].any()
    np.testing.assert_array_equal(batch["original_sizes"], [im.shape[:2] for im in images])
    normalized = np.asarray(t.normalize(batch["images"], batch["image_sizes"]))
    np.testing.assert_allclose(normalized[1, 0, 0], batch["images"][1, 0, 0] - [1.0, 2.0, 3.0], rtol=1e-6)
    for bad in ({"channel_order": "hsv"}, {"pixel_std": (1.0, 0.0, 1.0)}, {"min_size": 0}):
        with pytest.raises(ValueError):
            ImageTransform(**bad)


# --------------------------------------------------------------------------------------------- truncated JPEGs


def _cut_jpeg(fraction, progressive=False):
    image = cv2.GaussianBlur(noise_image(256, 192), (0, 0), 3)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    encoded = encoded.tobytes()
    return encoded[: int(len(encoded) * fraction)]


def _tf_rows(cut):
    """The count as TensorFlow's decoder gives it (what the project did before Pillow)."""
    end, filler = b"\xff\xd9", bytes(range(1, 255)) * 4
    a = tf.io.decode_jpeg(cut + end, channels=3, try_recover_truncated=True).numpy()
    b = tf.io.decode_jpeg(cut + filler + end, channels=3, try_recover_truncated=True).numpy()
    differs = np.flatnonzero(np.any(a != b, axis=(1, 2)))
    return (int(differs[0]) if len(differs) else a.shape[0]), a


@pytest.mark.parametrize("fraction, progressive", [(0.6, False), (0.85, False), (0.7, True)])
def test_truncated_jpeg_rows_agree_with_tensorflow(fraction, progressive):
    cut = _cut_jpeg(fraction, progressive)
    tf_rows, tf_image = _tf_rows(cut)
    image, rows = imageio.decode_truncated_jpeg(cut)
    assert rows == tf_rows > 0
    assert np.abs(image[:rows].astype(int) - tf_image[:rows]).max() <= 8  # fast vs accurate IDCT
    assert np.all(image[rows:] == imageio.TRUNCATED_FILL)


def test_numpy_pipeline_recovers_a_truncated_jpeg(tmp_path):
    root = png_voc(tmp_path / "voc", {"a": noise_image(40, 40)}, {"a": [(1, 1, 20, 20)]})
    with open(os.path.join(root, "JPEGImages", "cut.jpg"), "wb") as f:
        f.write(_cut_jpeg(0.6))
    with open(os.path.join(root, "Annotations", "cut.xml"), "w") as f:
        f.write(voc_xml("cut.jpg", (192, 256), [{"name": "dog", "box": (5, 5, 100, 60)}]))
    with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "a") as f:
        f.write("cut\n")
    cfg = make_cfg(root, input_extra={"min_size": 256, "max_size": 256})
    records, _, report = data.load_records(cfg, "train")
    cut = records[1]
    assert 0.5 < cut.valid_rows / 256 < 0.65 and "truncated JPEG" in report.warnings[0].problem
    batches = {p: take(data.build_dataset(cfg, records[1:], False, 1, pipeline=p))[0] for p in ("tf", "numpy")}
    ours, theirs = batches["numpy"]["images"][0, :256, :192], batches["tf"]["images"][0, :256, :192]
    assert np.all(ours[cut.valid_rows:] == imageio.TRUNCATED_FILL)
    np.testing.assert_array_equal(ours[cut.valid_rows:], theirs[cut.valid_rows:])
    assert np.abs(ours - theirs).max() <= 8


# ---------------------------------------------------------------------------------------------------- TensorBoard


def _read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_summary_writer_and_scalar_logger_read_back(tmp_path):
    import keras

    from frcnn.tensorboard_logs import ScalarLogger, SummaryWriter

    image = noise_image(20, 30)
    with SummaryWriter(str(tmp_path / "images")) as writer:
        writer.add_image("validation/a.jpg", image, step=0)
        writer.add_image("validation/a.jpg", image[::-1], step=1)
        writer.add_scalar("x", np.float32(2.5), step=3)
    events = _read_events(tmp_path / "images")
    stored = events.Images("validation/a.jpg")
    assert [e.step for e in stored] == [0, 1] and (stored[0].width, stored[0].height) == (30, 20)
    decoded = cv2.imdecode(np.frombuffer(stored[1].encoded_image_string, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(decoded, image[::-1])  # PNG: lossless, RGB kept
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(3, 2.5)]

    logger = ScalarLogger(str(tmp_path / "logs"))
    logger.set_model(types.SimpleNamespace(optimizer=keras.optimizers.SGD(0.25)))
    logger.on_epoch_end(0, {"loss": 1.5, "val_AP": 0.25})
    logger.on_epoch_end(1, {"loss": 0.5, "val_AP": 0.5})
    logger.on_train_end()
    train, validation = _read_events(tmp_path / "logs" / "train"), _read_events(tmp_path / "logs" / "validation")
    assert [(e.step, e.value) for e in train.Scalars("epoch_loss")] == [(0, 1.5), (1, 0.5)]
    assert [e.value for e in train.Scalars("epoch_learning_rate")] == [0.25, 0.25]
    assert [(e.step, e.value) for e in validation.Scalars("epoch_AP")] == [(0, 0.25), (1, 0.5)]


# ------------------------------------------------------------------------------------------- without TensorFlow


_NO_TF_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.modules["tensorflow"] = None  # "import tensorflow" fails, as where it is not installed
    import numpy as np
    root, cut_path, logs = sys.argv[1:4]
    import frcnn.data as data, frcnn.transform as transform
    keras_imported = "keras" in sys.modules  # frcnn.data and frcnn.transform import neither Keras nor TensorFlow
    import frcnn.tensorboard_logs as tb
    from frcnn.config import config_from_dict
    import keras
    out = {"backend": keras.backend.backend(), "keras_imported": keras_imported}
    cfg = config_from_dict({"data": {"format": "voc", "root": root, "train_split": "train", "val_split": None,
                                     "classes": ["dog"]},
                            "input": {"min_size": [64, 96], "max_size": 160, "max_gt": 4}})
    records, _, report = data.load_records(cfg, "train")
    out["records"] = len(records)
    evaluation = data.build_dataset(cfg, records, training=False, batch_size=2)
    out["pipeline"] = type(evaluation).__name__
    out["eval_ids"] = [b["image_ids"].tolist() for b in evaluation]
    training = data.build_dataset(cfg, records, training=True, batch_size=2)
    first = next(iter(training))
    out["train_shapes"] = {k: list(v.shape) for k, v in first.items()}
    out["checked"] = len(data.check_decodable(records, data.Report()))
    out["truncated_rows"] = int((data.load_image(cut_path) == 128).all(axis=(1, 2)).sum())

    class Probe(keras.Model):  # Keras' fit on the NumPy pipeline, with its worker threads
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, batch):
            x = keras.ops.mean(batch["images"], axis=(1, 2)) / 255.0
            y = self.dense(x)
            self.add_loss(keras.ops.mean((y - keras.ops.cast(keras.ops.sum(batch["gt_valid"], axis=1)[:, None],
                                                             "float32")) ** 2))
            return y

    model = Probe()
    model.compile(optimizer="sgd")
    history = model.fit(training, epochs=2, steps_per_epoch=3, verbose=0,
                        callbacks=[tb.scalar_callback(logs)])
    out["losses"] = history.history["loss"]
    batch = transform.ImageTransform(min_size=64, max_size=160).prepare_batch([np.zeros((30, 40, 3), np.uint8)])
    out["prepared"] = list(batch["images"].shape)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(logs, "train"))
    events.Reload()
    out["logged"] = [e.step for e in events.Scalars("epoch_loss")]
    out["tensorflow_loaded"] = [m for m, v in sys.modules.items() if m.split(".")[0] == "tensorflow" and v is not None]
    print("RESULT " + json.dumps(out))
''')


def test_data_side_without_tensorflow(tmp_path):
    root = _scenes(tmp_path)
    cut_path = tmp_path / "cut.jpg"
    cut_path.write_bytes(_cut_jpeg(0.6))
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, root, str(cut_path), str(tmp_path / "logs")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["backend"] == "jax" and out["pipeline"] == "NumpyDataset" and out["records"] == 5
    assert not out["keras_imported"]
    assert out["eval_ids"] == [[0, 1], [2, 3], [4]] and out["checked"] == 5
    assert out["train_shapes"]["images"][0] == 2 and out["train_shapes"]["gt_boxes"] == [2, 4, 4]
    assert 256 - 256 * 0.65 < out["truncated_rows"] < 256 * 0.5  # the rows that did not arrive are gray
    assert len(out["losses"]) == 2 and all(np.isfinite(out["losses"]))
    assert out["prepared"] == [1, 64, 96, 3] and out["logged"] == [0, 1]
    assert out["tensorflow_loaded"] == []
