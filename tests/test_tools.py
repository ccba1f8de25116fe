"""Smoke tests of the tools (:mod:`frcnn.cli.infer`, ``evaluate`` and ``export``, each called through
``main(argv)``), and of ``tools/*.py``, the scripts that run them from a checkout.

One tiny model (configs/test.yaml, random initialisation, no training) is built for the whole module and saved like
a training run: ``<workdir>/config.yaml`` and ``<workdir>/checkpoints/last.weights.h5`` with optimizer variables.
``roi_heads.score_thresh`` is 0 so that the random model still outputs boxes.

Time: building a model and tracing it for a new input shape cost seconds each on a CPU. So one infer run goes the
whole way (it loads the checkpoint into a new, uncompiled model), the other tool runs get the module's model
through a patched ``load_trained_model`` (loading errors are tested on their own: most fail before a model is
built), and the test images all resize and pad to the same 128 x 128 input (batches of 3 or 1) so that traced
functions are reused.
"""

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
import warnings

import cv2
import keras
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn import inference, loading
from frcnn.inference import detect
from frcnn.config import ConfigError, load_config, save_config
from frcnn.data import load_image
from frcnn.evaluation import COCO_STAT_NAMES
from frcnn.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("circle", "square", "triangle")


def _tool(name):
    """The tool's module, :mod:`frcnn.cli.<name>` (the ``frcnn-<name>`` command)."""
    return importlib.import_module(f"frcnn.cli.{name}")


def _script(name):
    """``tools/<name>.py`` loaded as a module (not run)."""
    spec = importlib.util.spec_from_file_location(f"tool_script_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    cfg = load_config("test.yaml", [f"data.classes=[{','.join(CLASSES)}]", "roi_heads.score_thresh=0.0",
                                    f"data.root={root / 'shapes'}"])
    model = build_model(cfg, load_weights=False)
    # A training checkpoint also holds the optimizer's variables: the tools must load it into a bare model.
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.optimizer.build(model.trainable_variables)
    workdir = root / "run"
    weights = workdir / "checkpoints" / "last.weights.h5"
    weights.parent.mkdir(parents=True)
    model.save_weights(str(weights))
    save_config(cfg, str(workdir / "config.yaml"))
    return types.SimpleNamespace(model=model, cfg=cfg, root=root, workdir=workdir, weights=str(weights),
                                 config_path=str(workdir / "config.yaml"))


@pytest.fixture
def loader(run, monkeypatch):
    """``loading.load_trained_model`` returning the reference model (the tools call it through the module)."""
    calls = []

    def load(weights, config=None, overrides=(), score_thresh=None):
        assert os.path.samefile(weights, run.weights)
        calls.append({"config": config, "overrides": list(overrides), "score_thresh": score_thresh})
        return run.model, run.cfg, run.config_path

    monkeypatch.setattr(loading, "load_trained_model", load)
    return calls


def _scene(height, width, seed):
    """A noisy background with a few filled shapes, RGB uint8."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 180, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        cv2.rectangle(image, (x, y), (x + int(rng.integers(10, 40)), y + int(rng.integers(10, 40))), colour, -1)
    return image


def _write_rgb(path, image):
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]))
    return str(path)


def _good_images(folder):
    """An RGB JPEG, a grayscale PNG and an RGBA PNG; each becomes a 128 x 128 padded input (test.yaml)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _write_rgb(folder / "scene.jpg", _scene(120, 100, 0))
    gray = folder / "gray.png"
    assert cv2.imwrite(str(gray), cv2.cvtColor(_scene(90, 80, 1), cv2.COLOR_RGB2GRAY))
    rgba = folder / "rgba.png"
    scene = _scene(100, 100, 2)
    alpha = np.full((100, 100, 1), 128, np.uint8)
    assert cv2.imwrite(str(rgba), np.concatenate([scene[:, :, ::-1], alpha], axis=2))
    return [rgb, str(gray), str(rgba)]


def _check_entry(entry, det, model):
    """A detections.json entry equals one ``frcnn.inference.detect`` result (score threshold 0)."""
    assert len(entry["scores"]) == len(det["scores"]) > 0
    np.testing.assert_allclose(entry["boxes"], det["boxes"], atol=1e-3)
    np.testing.assert_allclose(entry["scores"], det["scores"], atol=1e-5)
    assert entry["classes"] == det["class_names"]
    assert entry["class_ids"] == [int(c) for c in det["classes"]]
    assert set(entry["classes"]) <= set(model.class_names[1:])


# ------------------------------------------------------------------------------------------------ inference


def test_expand_inputs(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("b.JPG", "a.png", "c.bmp", "notes.txt", "d.jpeg"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    folder = str(tmp_path / "imgs")
    paths, problems = inference.expand_inputs([
        folder, os.path.join(folder, "a.png"), os.path.join(folder, "*.png"), str(tmp_path / "missing.jpg"),
        str(tmp_path / "empty"), str(tmp_path / "nothing" / "*.jpg"),
    ])
    names = [os.path.basename(p) for p in paths]
    assert names == ["a.png", "b.JPG", "c.bmp", "d.jpeg", "missing.jpg"]  # sorted, filtered, each once
    assert [item for item, _ in problems] == [str(tmp_path / "empty"), str(tmp_path / "nothing" / "*.jpg")]


def test_find_config(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    weights = str(ckpt / "best.weights.h5")
    with pytest.raises(ConfigError, match="--config"):
        loading.find_config(weights)
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert loading.find_config(weights) == str(tmp_path / "run" / "config.yaml")
    (ckpt / "config.yaml").write_text("{}")
    assert loading.find_config(weights) == str(ckpt / "config.yaml")


def test_infer_writes_images_and_json(run, tmp_path, capsys):
    files = sorted(_good_images(tmp_path / "imgs"))
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = _tool("infer").main([str(tmp_path / "imgs"), "--weights", run.weights, "--out", str(out),
                                    "--score-thresh", "0.0", "--batch-size", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # The checkpoint's optimizer variables are skipped without a word.
    messages = [str(w.message).lower() for w in caught] + [captured.err.lower()]
    assert not any(word in m for m in messages for word in ("optimizer", "skipping", "could not be loaded"))
    with open(out / "detections.json", encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["failed"] == [] and doc["classes"] == list(CLASSES)
    assert [e["file"] for e in doc["images"]] == files
    images = [load_image(p) for p in files]
    expected = detect(run.model, images, batch_size=3)  # same batch as the tool
    for entry, image, det in zip(doc["images"], images, expected):
        assert (entry["height"], entry["width"]) == image.shape[:2]
        _check_entry(entry, det, run.model)
        drawn = cv2.imread(entry["output"])
        assert drawn is not None and drawn.shape == image.shape
        assert os.path.dirname(entry["output"]) == str(out)
        assert os.path.basename(entry["file"]) in captured.out  # the printed table


def test_infer_reports_bad_files_and_goes_on(run, loader, tmp_path, capsys):
    good = _write_rgb(tmp_path / "good.png", _scene(64, 60, 3))
    missing = str(tmp_path / "missing.jpg")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    code = _tool("infer").main([missing, str(text), good, str(empty), "--weights", run.weights, "--out", str(out),
                                "--score-thresh", "0.0"])
    err = capsys.readouterr().err
    assert code == 1
    for path in (missing, str(text), str(empty)):
        assert path in err
    with open(out / "detections.json", encoding="utf-8") as f:
        doc = json.load(f)
    assert [e["file"] for e in doc["images"]] == [good]
    assert sorted(f["file"] for f in doc["failed"]) == sorted([missing, str(text), str(empty)])
    _check_entry(doc["images"][0], detect(run.model, [load_image(good)])[0], run.model)
    assert os.path.isfile(out / "good.png")


def test_score_threshold_filters_what_is_written(run, loader, tmp_path, capsys):
    image = _write_rgb(tmp_path / "a.png", _scene(64, 64, 4))
    det = detect(run.model, [load_image(image)])[0]
    thresh = float(np.median(det["scores"]))
    out = tmp_path / "out"
    assert _tool("infer").main([image, "--weights", run.weights, "--out", str(out),
                                "--score-thresh", repr(thresh)]) == 0
    assert loader[-1]["score_thresh"] == thresh
    with open(out / "detections.json", encoding="utf-8") as f:
        entry = json.load(f)["images"][0]
    keep = det["scores"] >= thresh
    assert 0 < len(entry["scores"]) == int(keep.sum()) < len(det["scores"])
    np.testing.assert_allclose(entry["boxes"], det["boxes"][keep], atol=1e-3)


def test_bad_checkpoints_are_clear_errors(run, tmp_path, capsys):
    image = _write_rgb(tmp_path / "a.png", _scene(64, 64, 5))
    infer = _tool("infer")
    out = str(tmp_path / "out")
    other = run.cfg.replace(data=dataclasses.replace(run.cfg.data, classes=("cat", "dog")))

    # --config for another number of classes than the run that wrote the weights.
    save_config(other, str(tmp_path / "two.yaml"))
    assert infer.main([image, "--weights", run.weights, "--config", str(tmp_path / "two.yaml"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert run.weights in err and "3 classes" in err and "2" in err

    # A work directory whose config disagrees with its checkpoint: Keras refuses the shapes, the file is named.
    ckpt = tmp_path / "mixed" / "checkpoints"
    ckpt.mkdir(parents=True)
    save_config(other, str(tmp_path / "mixed" / "config.yaml"))
    linked = ckpt / "last.weights.h5"
    os.symlink(run.weights, linked)
    assert infer.main([image, "--weights", str(linked), "--out", out]) == 2
    err = capsys.readouterr().err
    assert str(linked) in err and "same classes" in err

    # Truncated, empty and missing files fail before a model is built.
    workdir = tmp_path / "broken"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copy(run.workdir / "config.yaml", workdir / "config.yaml")
    truncated = workdir / "checkpoints" / "last.weights.h5"
    with open(run.weights, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(1 << 20))
    empty = workdir / "checkpoints" / "empty.weights.h5"
    empty.write_bytes(b"")
    missing = workdir / "checkpoints" / "best.weights.h5"
    for path, words in ((truncated, "complete"), (empty, "empty"), (missing, "does not exist")):
        assert infer.main([image, "--weights", str(path), "--out", out]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and words in err

    # No config beside the weights.
    lone = tmp_path / "lone.weights.h5"
    os.symlink(run.weights, lone)
    assert infer.main([image, "--weights", str(lone), "--out", out]) == 2
    assert "--config" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- evaluation


def _coco_pair(tmp_path):
    """A small COCO annotation file (non-contiguous category ids, a crowd box) and a results file for it."""
    rng = np.random.default_rng(0)
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
    images, annotations, results = [], [], []
    for image_id in (5, 8, 13, 21):
        images.append({"id": image_id, "width": 200, "height": 160, "file_name": f"{image_id}.jpg"})
        for k in range(int(rng.integers(1, 5))):
            x, y = rng.uniform(0, 120, size=2)
            w, h = rng.uniform(15, 70, size=2)
            cat = int(rng.choice([3, 7, 11]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(k == 3)})
            if rng.uniform() < 0.8:  # a detection near the object, sometimes with the wrong class
                jitter = rng.normal(0, 4, size=4)
                det_cat = cat if rng.uniform() < 0.8 else int(rng.choice([3, 7, 11]))
                results.append({"image_id": image_id, "category_id": det_cat,
                                "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)],
                                "score": float(rng.uniform(0.2, 1.0))})
        for _ in range(2):  # false positives
            results.append({"image_id": image_id, "category_id": int(rng.choice([3, 7, 11])),
                            "bbox": list(rng.uniform(0, 100, size=2)) + list(rng.uniform(5, 50, size=2)),
                            "score": float(rng.uniform(0.0, 0.6))})
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    res_path.write_text(json.dumps(results))
    return str(gt_path), str(res_path)


def _pycocotools_stats(gt_path, res_path):
    coco_gt = COCO(gt_path)
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(res_path), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats


def test_evaluate_results_file_reproduces_pycocotools(tmp_path, capsys):
    gt_path, res_path = _coco_pair(tmp_path)
    expected = _pycocotools_stats(gt_path, res_path)
    capsys.readouterr()
    out = tmp_path / "out"
    assert _tool("evaluate").main(["--results", res_path, "--annotations", gt_path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with open(out / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    np.testing.assert_allclose([metrics[k] for k in COCO_STAT_NAMES], expected, rtol=0, atol=1e-12)
    assert set(metrics["per_class_AP"]) == set(metrics["voc07_per_class_AP50"]) == {"cat", "dog", "bird"}
    assert 0.0 <= metrics["voc07_mAP50"] <= 1.0
    assert "cat" in printed and "AP50" in printed

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 999, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    assert _tool("evaluate").main(["--results", str(bad), "--annotations", gt_path, "--out", str(out)]) == 2
    assert "999" in capsys.readouterr().err


def test_evaluate_model_on_a_shapes_split(run, loader, tmp_path, capsys):
    out = tmp_path / "out"
    evaluate = _tool("evaluate")
    assert evaluate.main(["--weights", run.weights, "--out", str(out), "--max-images", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "VOC07" in printed and "split 'val': 3 images" in printed
    with open(out / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    assert all(isinstance(metrics[k], float) for k in COCO_STAT_NAMES)
    assert set(metrics["voc07_per_class_AP50"]) == set(CLASSES) and metrics["num_images"] == 3
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    with open(out / "gt.json", encoding="utf-8") as f:
        gt = json.load(f)
    assert len(results) == metrics["num_detections"] > 0
    assert {r["image_id"] for r in results} <= {image["id"] for image in gt["images"]}
    assert {r["category_id"] for r in results} <= {1, 2, 3}
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)

    # The written pair scores to the same numbers.
    rescored = tmp_path / "rescored"
    assert evaluate.main(["--results", str(out / "results.json"), "--annotations", str(out / "gt.json"),
                          "--out", str(rescored)]) == 0
    with open(rescored / "metrics.json", encoding="utf-8") as f:
        again = json.load(f)
    for key in COCO_STAT_NAMES + ("voc07_mAP50",):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9), key


# --------------------------------------------------------------------------------------------------- export


def test_exported_saved_model_matches_detect(run, loader, tmp_path, capsys):
    import tensorflow as tf

    out = tmp_path / "saved"
    assert _tool("export").main(["--weights", run.weights, "--out", str(out)]) == 0
    assert (out / "assets.extra" / "classes.txt").read_text().split() == ["__background__", *CLASSES]
    loaded = tf.saved_model.load(str(out))

    files = sorted(_good_images(tmp_path / "imgs")[1:])
    files.append(_write_rgb(tmp_path / "imgs" / "scene.png", _scene(120, 100, 0)))
    # PNG only: lossless, so TensorFlow and OpenCV decode the same pixels (JPEG decoders may differ by a level).
    images = [load_image(p) for p in files]
    expected = detect(run.model, images, batch_size=len(images))
    encoded = tf.constant([open(p, "rb").read() for p in files])
    got = loaded.signatures["serving_default"](images=encoded)
    for i, det in enumerate(expected):
        n = int(got["num_detections"][i])
        assert n == len(det["scores"]) > 0
        np.testing.assert_allclose(got["boxes"][i, :n].numpy(), det["boxes"], atol=1e-3)
        np.testing.assert_allclose(got["scores"][i, :n].numpy(), det["scores"], atol=1e-5)
        np.testing.assert_array_equal(got["classes"][i, :n].numpy(), det["classes"])

    single = detect(run.model, [images[0]])[0]
    got = loaded.signatures["detect_image"](image=tf.constant(images[0]))
    n = int(got["num_detections"])
    assert n == len(single["scores"])
    np.testing.assert_allclose(got["boxes"][:n].numpy(), single["boxes"], atol=1e-3)
    np.testing.assert_allclose(got["scores"][:n].numpy(), single["scores"], atol=1e-5)
    np.testing.assert_array_equal(got["classes"][:n].numpy(), single["classes"])


# ---------------------------------------------------------------------------------------------- tools/*.py


TOOLS = ("train", "infer", "evaluate", "export")


def _env_with_checkout():
    """The environment for a tool run from this checkout: frcnn importable (``pip install -e .`` does that for a
    user; here the checkout goes on PYTHONPATH so that the run uses the code under test)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize("name", TOOLS)
def test_scripts_run_the_package_tools(name):
    """Each tools/*.py is frcnn.cli.<name>.main, with no sys.path edit."""
    assert _script(name).main is _tool(name).main
    with open(os.path.join(ROOT, "tools", f"{name}.py"), encoding="utf-8") as f:
        assert "sys.path" not in f.read()


def test_script_help_from_another_folder(tmp_path):
    """``python tools/train.py --help``, as the README runs it, from any folder."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--help"], cwd=tmp_path,
                          env=_env_with_checkout(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--config" in done.stdout and "frcnn-train" in done.stdout


def test_script_without_the_package_says_how_to_install(tmp_path):
    """Without frcnn installed (``-S``: no site-packages, so no editable install either), a script says what to
    run instead of printing a traceback."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "tools", "infer.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install -r requirements.txt" in done.stderr and "Traceback" not in done.stderr
