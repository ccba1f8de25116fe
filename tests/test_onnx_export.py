"""frcnn.export on every backend: which format each backend can make (and the message when it cannot), the ONNX
folder, and an exported ONNX file run with onnxruntime against the model's own detections.

The round trip exports the tiny model (configs/test.yaml, random weights, ``roi_heads.score_thresh=0`` so that it
outputs boxes) through ``frcnn-export --format onnx`` and is skipped where the backend's converter (tf2onnx on
TensorFlow, onnxscript on PyTorch) or onnxruntime is not installed: CI installs neither (``frcnn[onnx]`` is an
extra). Run it with those installed, once per backend:

    KERAS_BACKEND=tensorflow python -m pytest -q tests/test_onnx_export.py
    KERAS_BACKEND=torch python -m pytest -q tests/test_onnx_export.py

Time: one export of the tiny model is 1-2 minutes on the 2-core development CPU (docs/NOTES.md, Session 8).
"""

import importlib.util
import json
import os

import keras
import numpy as np
import pytest

from frcnn import export, loading
from frcnn.config import ConfigError, load_config, save_config
from frcnn.transform import ImageTransform

BACKEND = keras.backend.backend()
CLASSES = ("circle", "square", "triangle")


def _transform(**overrides):
    cfg = load_config("test.yaml", [f"input.{key}={value}" for key, value in overrides.items()])
    return ImageTransform.from_input_config(cfg.input)


# ------------------------------------------------------------------------------------------- what is available


def test_default_format_per_backend():
    assert export.default_format("tensorflow") == "saved_model"
    assert export.default_format("jax") == "onnx"
    assert export.default_format("torch") == "onnx"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_saved_model_needs_tensorflow(backend):
    with pytest.raises(export.ExportError, match="SavedModel export needs the TensorFlow backend.*--format onnx"):
        export.check_format("saved_model", backend)


def test_onnx_on_jax_names_the_reason_and_the_way_out():
    with pytest.raises(export.ExportError) as err:
        export.check_format("onnx", "jax")
    message = str(err.value)
    assert "jax2onnx" in message and "jax2tf, needs TensorFlow" in message and "KERAS_BACKEND=torch" in message


@pytest.mark.parametrize("backend, packages", [("tensorflow", ["tf2onnx", "onnx"]), ("torch", ["onnx", "onnxscript"])])
def test_onnx_names_the_missing_packages(monkeypatch, backend, packages):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(export.ExportError) as err:
        export.check_format("onnx", backend)
    assert f"needs {' and '.join(packages)}" in str(err.value) and "frcnn[onnx]" in str(err.value)


def test_unknown_format_is_refused():
    with pytest.raises(export.ExportError, match="unknown export format 'tflite'"):
        export.check_format("tflite", "tensorflow")


def test_cli_refuses_a_format_the_backend_cannot_make_before_building_a_model(monkeypatch, tmp_path, capsys):
    from frcnn.cli import export as tool

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_trained_model", no_model)
    other = {"tensorflow": "jax", "jax": "torch", "torch": "jax"}[BACKEND]
    monkeypatch.setattr(keras.backend, "backend", lambda: other)
    fmt = "onnx" if other == "jax" else "saved_model"
    assert tool.main(["--weights", str(tmp_path / "w.weights.h5"), "--out", str(tmp_path / "x"),
                      "--format", fmt]) == 2
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ the helpers


def test_padded_canvas_and_input_size():
    transform = _transform(min_size=600, max_size=1000, size_divisibility=32)
    assert export.padded_canvas(transform) == (1024, 1024)
    assert export.check_input_size(transform, None) == (1024, 1024)
    assert export.check_input_size(transform, (608, 800)) == (608, 800)
    with pytest.raises(ConfigError, match="multiples of input.size_divisibility"):
        export.check_input_size(transform, (600, 800))


def test_pad_batch_adds_zeros_bottom_right_only():
    transform = _transform()
    rng = np.random.default_rng(0)
    batch = transform.prepare_batch([rng.integers(0, 256, (100, 60, 3), dtype=np.uint8)])
    assert batch["images"].shape == (1, 128, 96, 3)  # 100 x 60 scaled by 1.28, padded to multiples of 32
    padded = export.pad_batch(batch, 160, 192)
    assert padded["images"].shape == (1, 160, 192, 3)
    np.testing.assert_array_equal(padded["images"][:, :128, :96], batch["images"])
    assert not padded["images"][:, 128:].any() and not padded["images"][:, :, 96:].any()
    for key in ("image_sizes", "scales", "original_sizes"):
        np.testing.assert_array_equal(padded[key], batch[key])
    with pytest.raises(ValueError, match="larger than the model's fixed input 96 x 192"):
        export.pad_batch(batch, 96, 192)


def _padded(rows, d=None):
    """Padded detections from per-image lists of (class, score, box), ``d`` rows (default: one more than needed)."""
    d = d or max(len(r) for r in rows) + 1
    out = {"boxes": np.zeros((len(rows), d, 4), np.float32), "scores": np.zeros((len(rows), d), np.float32),
           "classes": np.zeros((len(rows), d), np.int32), "num_detections": np.asarray([len(r) for r in rows])}
    for i, row in enumerate(rows):
        for j, (c, s, box) in enumerate(row):
            out["classes"][i, j], out["scores"][i, j], out["boxes"][i, j] = c, s, box
    return out


def test_compare_detections_takes_near_ties_in_either_order_and_names_a_difference():
    a = (1, 0.5, [10, 10, 50, 50])
    b = (2, 0.5, [60, 10, 90, 40])
    report = export.compare_detections(_padded([[a, b], []]), _padded([[b, a], []]))
    assert report == {"detections": 2, "ties": 0, "max_box_diff": 0.0, "max_score_diff": 0.0}
    with pytest.raises(AssertionError, match=r"detections per image \[1, 0\] instead of \[2, 0\]"):
        export.compare_detections(_padded([[a, b], []]), _padded([[a], []]))
    with pytest.raises(AssertionError, match="detection 0 .class 1, score 0.5. has no match within 0.05 px"):
        export.compare_detections(_padded([[a]]), _padded([[(1, 0.5, [60, 60, 90, 90])]]))
    with pytest.raises(AssertionError, match="image 0: scores differ by up to 0.1"):
        export.compare_detections(_padded([[a]]), _padded([[(1, 0.4, [10, 10, 50, 50])]]))


def test_compare_detections_accepts_flipped_near_ties_only():
    """Two overlapping candidates 1e-6 apart: NMS may keep either; a class at the cut of the D kept may change."""
    kept = (1, 0.700001, [10, 10, 50, 50])
    other = (1, 0.7, [12, 10, 52, 50])  # the one NMS suppressed on the other side
    last_e, last_g = (2, 0.300001, [0, 0, 5, 5]), (3, 0.3, [70, 70, 90, 90])  # the last slot
    report = export.compare_detections(_padded([[kept, last_e]], d=2), _padded([[other, last_g]], d=2))
    assert report["detections"] == 2 and report["ties"] == 2
    with pytest.raises(AssertionError, match="has no match"):  # fewer than D kept: the last one is no near-tie
        export.compare_detections(_padded([[kept, last_e]]), _padded([[kept, last_g]]))
    with pytest.raises(AssertionError, match="has no match"):  # a tie of one class must overlap
        export.compare_detections(_padded([[kept]]), _padded([[(1, 0.7, [60, 60, 90, 90])]]))


def test_export_folder_replaces_an_earlier_export_and_refuses_anything_else(tmp_path):
    def write(name):
        return lambda tmp: open(os.path.join(tmp, name), "w").close()

    out = tmp_path / "model"
    export.write_export_folder(out, write(export.ONNX_FILE))
    export.write_export_folder(out, write("saved_model.pb"))  # an earlier export of the other format: replaced
    assert sorted(os.listdir(out)) == ["saved_model.pb"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an export folder"):
        export.write_export_folder(other, write(export.ONNX_FILE))
    assert (other / "todo.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes"]  # no temporary folder left


# ------------------------------------------------------------------------------------- the ONNX round trip


def _onnx_ready():
    try:
        export.check_format("onnx", BACKEND)
    except export.ExportError as err:
        return str(err)
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    why = _onnx_ready()
    if why:
        pytest.skip(f"ONNX round trip on {BACKEND}: {why}")
    from frcnn.model import build_model

    root = tmp_path_factory.mktemp("onnx")
    cfg = load_config("test.yaml", [f"data.classes=[{','.join(CLASSES)}]", "roi_heads.score_thresh=0.0"])
    keras.utils.set_random_seed(0)
    model = build_model(cfg, load_weights=False)
    weights = root / "run" / "checkpoints" / "last.weights.h5"
    weights.parent.mkdir(parents=True)
    model.save_weights(str(weights))
    save_config(cfg, str(root / "run" / "config.yaml"))
    return model, cfg, str(weights), root


def test_onnx_export_gives_the_models_detections(tiny, monkeypatch, capsys):
    import onnx
    import onnxruntime

    from frcnn.cli import export as tool

    model, cfg, weights, root = tiny
    calls = []

    def load(weights_path, config=None, overrides=(), score_thresh=None):  # the module's model: one build
        calls.append(list(overrides))
        return model, cfg, str(root / "run" / "config.yaml")

    monkeypatch.setattr(loading, "load_trained_model", load)
    out = root / "exported"
    assert tool.main(["--weights", weights, "--out", str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "checked with onnxruntime: " in printed, printed
    assert calls == [["train.mixed_precision=off"]]
    assert sorted(os.listdir(out)) == sorted([export.CONFIG_FILE, export.META_FILE, export.ONNX_FILE])

    with open(out / export.META_FILE, encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["class_names"] == ["__background__", *CLASSES]
    assert meta["transform"] == model.transform.get_config()
    assert meta["exported_on"] == BACKEND
    proto = onnx.load(str(out / export.ONNX_FILE), load_external_data=False)
    assert json.loads({p.key: p.value for p in proto.metadata_props}[export.METADATA_KEY]) == meta

    session = onnxruntime.InferenceSession(str(out / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(export.ONNX_INPUTS)
    assert [o.name for o in session.get_outputs()] == list(export.ONNX_OUTPUTS) or BACKEND == "tensorflow"
    fixed = meta["fixed_input_size"]
    rng = np.random.default_rng(1)
    # A consumer's path: the transform from model.json, then the fixed size where there is one. Batches of 3 and 1
    # (the batch dimension is free on both backends), images smaller than the canvas.
    transform = ImageTransform(**meta["transform"])
    for shapes in ([(100, 120), (128, 90), (64, 64)], [(77, 128)]):
        batch = transform.prepare_batch([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes])
        if fixed:
            batch = export.pad_batch(batch, *fixed)
        got = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {i.name: batch[i.name] for i in session.get_inputs()})))
        expected = model.predict_on_batch(batch)
        assert np.asarray(expected["num_detections"]).min() > 0  # score_thresh 0: every image has detections
        # Float round-off between the runtimes: boxes within 1e-3 px, scores within 1e-5 (measured: 3e-5 px, 2e-7).
        report = export.compare_detections(expected, got, box_atol=1e-3, score_atol=1e-5)
        assert report["detections"] == int(np.sum(expected["num_detections"]))


@pytest.mark.skipif(BACKEND != "torch", reason="the torch NMS loop of the ONNX export")
def test_torch_export_nms_loop_keeps_the_same_boxes():
    """frcnn.torch_export.greedy_keep (torch.while_loop, plain torch) keeps what frcnn.ops.greedy_keep keeps,
    ties, empty boxes and rows with nothing valid included."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch

    from frcnn import ops
    from frcnn.torch_export import greedy_keep

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (3, 60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (3, 60, 2))], axis=-1).astype(np.float32)
    boxes[0, 5] = boxes[0, 6] = 0.0  # empty boxes: IoU 0 with everything
    boxes[1, 10] = boxes[1, 11]  # an exact duplicate
    alive = rng.uniform(size=(3, 60)) < 0.8
    alive[2] = False  # a row with nothing valid
    for max_output, threshold in ((100, 0.5), (7, 0.3)):
        expected = keras.ops.convert_to_numpy(ops.greedy_keep(boxes, alive, max_output, threshold))
        got = greedy_keep(torch.as_tensor(boxes), torch.as_tensor(alive), max_output, threshold).cpu().numpy()
        np.testing.assert_array_equal(got, expected)
        assert got.sum(axis=1).max() <= max_output

