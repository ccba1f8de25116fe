"""Reliability round two (runs that collide, disks that fill, results that lie, images that half-decode).

Every test builds its own small files in tmp_path and uses tiny Keras models (no detector), so the file runs fast.
"""

import dataclasses
import json
import os

import pytest

from conftest import tool_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    return tool_script(name)


# ------------------------------------------------------------------------------- defect 4: results files


def _annotations(tmp_path):
    gt = {
        "images": [{"id": 1, "width": 100, "height": 80, "file_name": "1.jpg"},
                   {"id": 2, "width": 100, "height": 80, "file_name": "2.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600,
                         "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [50, 30, 20, 20], "area": 400,
                         "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return str(path)


GOOD = {"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 0.9}


@pytest.mark.parametrize("bad, words", [
    ({"image_id": 2, "category_id": 3, "bbox": [float("nan")] * 4, "score": 0.8}, "non-finite"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, -20, 20], "score": 0.8}, "not positive"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, 20, 20], "score": "0.8"}, "score '0.8' is not a number"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, 20, 20], "score": float("inf")}, "not finite"),
    ({"image_id": 7, "category_id": 3, "bbox": [50, 30, 20, 20], "score": 0.8}, "image_id 7"),
    ({"image_id": 2, "category_id": 4, "bbox": [50, 30, 20, 20], "score": 0.8}, "category_id 4"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, True, 20], "score": 0.8}, "4 numbers"),
], ids=["nan_box", "negative_width", "string_score", "inf_score", "unknown_image", "unknown_category", "bool"])
def test_results_file_with_a_bad_entry_is_refused(tmp_path, capsys, bad, words):
    gt = _annotations(tmp_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([GOOD, bad, dict(bad)]))  # json writes NaN/Infinity, as a careless writer would
    out = tmp_path / "out"
    assert _tool("evaluate").main(["--results", str(res), "--annotations", gt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "res.json" in err and "2 of 3 entries" in err and "entry 1:" in err and "entry 2:" in err
    assert words in err
    assert not (out / "metrics.json").exists()  # nothing scored, nothing written


def test_results_file_names_the_first_bad_entries_and_counts_the_rest(tmp_path, capsys):
    gt = _annotations(tmp_path)
    res = tmp_path / "res.json"
    bad = dict(GOOD, bbox=[1, 1, 0, 5])
    res.write_text(json.dumps([GOOD] + [bad] * 9))
    assert _tool("evaluate").main(["--results", str(res), "--annotations", gt, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "9 of 10 entries" in err and "entry 5:" in err and "entry 6:" not in err and "(and 4 more)" in err
    # The good entries alone still score (the check refuses nothing valid).
    res.write_text(json.dumps([GOOD, dict(GOOD, image_id=2, bbox=[50, 30, 20, 20])]))
    assert _tool("evaluate").main(["--results", str(res), "--annotations", gt, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "metrics.json", encoding="utf-8") as f:
        assert json.load(f)["AP"] == pytest.approx(1.0)


# --------------------------------------------------------------------- defect 1: one run per work directory

_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("fileio", sys.argv[1])
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
with fileio.lock_directory(sys.argv[2], "training run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold_lock(workdir):
    """A process that owns ``workdir`` as a training run does (the same lock), without importing TensorFlow."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, os.path.join(ROOT, "frcnn", "fileio.py"), str(workdir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_training_run_in_a_work_directory_is_refused_and_a_killed_owner_frees_it(tmp_path, capsys):
    from frcnn.workdir import own_workdir
    from frcnn.errors import TrainingError

    workdir = tmp_path / "run"
    owner = _hold_lock(workdir)
    try:
        # The train tool in this process is the second run: refused before it writes anything, naming the owner.
        code = _tool("train").main(["--config", "test.yaml", "--workdir", str(workdir), "--quiet",
                                    "--set", f"data.root={tmp_path / 'shapes'}"])
        err = capsys.readouterr().err
        assert code == 2
        assert str(workdir) in err and f"process {owner.pid}" in err and "in use by another training run" in err
        assert sorted(os.listdir(workdir)) == [".lock"]  # no config.yaml, no checkpoints
        # A non-chief worker of a multi-worker run shares the chief's directory: never refused.
        with own_workdir(str(workdir), chief=False):
            pass
        with pytest.raises(TrainingError, match=f"process {owner.pid}"):
            with own_workdir(str(workdir)):
                pass
    finally:
        owner.kill()  # SIGKILL: no cleanup code runs in the owner
        owner.wait()
        owner.stdout.close()
    with own_workdir(str(workdir)):  # the kernel released the dead owner's lock
        with pytest.raises(TrainingError, match=f"process {os.getpid()}"):
            with own_workdir(str(workdir)):  # and a second claim in the same process is refused too
                pass
    with own_workdir(str(workdir)):  # released on exit
        pass


# ---------------------------------------------------------- defect 2: a kill at any point of a checkpoint write


def _tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    model.build((None, 3))
    return model


def _data():
    import numpy as np
    import tensorflow as tf

    # Every batch is the same, so only the restored weights, optimizer state and step can make runs differ.
    x = np.tile(np.float32([[0.5, -1.0, 2.0]]), (8, 1))
    return tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))).batch(1).repeat()


EPOCHS, STEPS = 2, 4


def _fit(model, ckpt, start_step=0, best=None):
    from frcnn import callbacks, checkpoints, engine

    stop = callbacks.StopOnNonFinite()
    manager = checkpoints.CheckpointManager(str(ckpt), STEPS, every_steps=1, best=best)
    engine.fit_resumable(model, _data(), EPOCHS, STEPS, [stop, manager], manager, stop, start_step=start_step,
                           verbose=0)


def _resume(ckpt):
    """What frcnn.engine.train does on a restart: clear temporaries, restore, go on to the end."""
    from frcnn import checkpoints
    from frcnn.fileio import remove_stale_temporaries

    remove_stale_temporaries(str(ckpt))
    model = _tiny_model()
    state = checkpoints.restore_checkpoint(model, str(ckpt), STEPS, checkpoints.read_state(str(ckpt)))
    start = state["global_step"]
    _fit(model, ckpt, start_step=start, best=state.get("best"))
    return model, start


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the training code catches it."""


KILL_POINTS = ["in_weights_write", "after_weights_rename", "in_state_write", "after_state_rename"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_any_point_of_a_checkpoint_write_resumes_exactly(tmp_path, monkeypatch, point):
    import shutil

    import numpy as np

    from frcnn import checkpoints

    reference = _tiny_model()
    _fit(reference, tmp_path / "reference")

    ckpt = tmp_path / "ckpt"
    kill_step = 3
    real_weights, real_json = checkpoints.atomic_save_weights, checkpoints.atomic_write_json

    def leave_partial(path, data):
        # What a SIGKILL mid-write leaves: a partial temporary beside the target (atomic_path removes its own
        # temporary when an exception passes; a killed process could not).
        (tmp_path / "ckpt" / f".tmp-killed{os.path.splitext(path)[1]}").write_bytes(data)

    def weights(model, path):
        if int(model.optimizer.iterations.numpy()) == kill_step and point == "in_weights_write":
            real_weights(model, str(tmp_path / "whole.weights.h5"))
            leave_partial(path, (tmp_path / "whole.weights.h5").read_bytes()[:1000])
            raise Killed
        real_weights(model, path)
        if int(model.optimizer.iterations.numpy()) == kill_step and point == "after_weights_rename":
            raise Killed

    def write_json(obj, path):
        if obj["global_step"] == kill_step and point == "in_state_write":
            leave_partial(path, json.dumps(obj).encode()[:10])
            raise Killed
        real_json(obj, path)
        if obj["global_step"] == kill_step and point == "after_state_rename":
            raise Killed

    monkeypatch.setattr(checkpoints, "atomic_save_weights", weights)
    monkeypatch.setattr(checkpoints, "atomic_write_json", write_json)
    with pytest.raises(Killed):
        _fit(_tiny_model(), ckpt)
    monkeypatch.undo()
    # The files as the kill left them: the weights may be one checkpoint ahead of the state, never behind.
    weights_step = 2 if point == "in_weights_write" else 3
    state_step = 3 if point == "after_state_rename" else 2
    assert checkpoints.read_state(str(ckpt))["global_step"] == state_step

    resumed, start = _resume(ckpt)
    assert start == weights_step
    assert int(resumed.optimizer.iterations.numpy()) == EPOCHS * STEPS  # not one step more or less
    state = checkpoints.read_state(str(ckpt))
    assert state["global_step"] == EPOCHS * STEPS and state["epoch"] == EPOCHS
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not [n for n in os.listdir(ckpt) if n.startswith(".tmp-")]
    shutil.rmtree(ckpt)


def test_weights_without_state_resume_from_their_own_step(tmp_path):
    from frcnn import checkpoints

    model = _tiny_model()
    _fit(model, tmp_path)
    os.remove(tmp_path / checkpoints.STATE_FILE)  # e.g. killed after the very first weights rename
    assert checkpoints.has_checkpoint(str(tmp_path)) and checkpoints.read_state(str(tmp_path)) is None
    state = checkpoints.restore_checkpoint(_tiny_model(), str(tmp_path), STEPS)
    assert state["global_step"] == EPOCHS * STEPS and state["epoch"] == EPOCHS


# ------------------------------------------------------------------------ defect 3: a disk that fills up


def test_disk_full_during_a_checkpoint_write_stops_with_a_message_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from frcnn import checkpoints
    from frcnn.errors import TrainingError

    model = _tiny_model()
    manager = checkpoints.CheckpointManager(str(tmp_path), STEPS)
    manager.set_model(model)
    model.optimizer.build(model.trainable_variables)
    manager.save()
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    model.layers[0].kernel.assign(model.layers[0].kernel.numpy() + 1.0)

    def full_disk(path, overwrite=True):
        with open(path, "wb") as f:
            f.write(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)  # a partial file, as h5py leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_weights", full_disk)
    with pytest.raises(TrainingError) as err:
        manager.save()
    message = str(err.value)
    needed = checkpoints.checkpoint_bytes(model)
    assert str(tmp_path) in message and f"{needed} bytes" in message and "last good checkpoint" in message
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # old files intact, no temp

    # Known in advance: too little free space refuses the write before it starts (save_weights never called).
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil_usage(free=needed - 1))
    monkeypatch.setattr(model, "save_weights", lambda *a, **k: pytest.fail("wrote with too little free space"))
    with pytest.raises(TrainingError, match=rf"needs about {needed} bytes .*{needed - 1} bytes are free"):
        manager.save()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def shutil_usage(free):
    import shutil

    return shutil._ntuple_diskusage(total=free * 2, used=free, free=free)


def test_checkpoint_size_estimate_covers_the_written_file(tmp_path):
    from frcnn import checkpoints

    model = _tiny_model()
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / "x.weights.h5"
    checkpoints.atomic_save_weights(model, str(path))
    assert checkpoints.checkpoint_bytes(model) >= os.path.getsize(path)
    assert checkpoints.checkpoint_bytes(model, str(path)) >= os.path.getsize(path)


# ------------------------------------------------------------ defect 5: images that do not decode are named


def _voc_with_corrupt_png(tmp_path, n=3, bad="b"):
    """A VOC root of ``n`` noise images with one box each; image ``bad`` is a PNG whose header and IEND chunk are
    sound (so indexing keeps it) but whose pixel data is garbage."""
    import cv2

    sys_path_tests()
    from test_data import make_voc, noise_image

    ids = [chr(ord("a") + i) for i in range(n)]
    root = make_voc(tmp_path / "voc", [(i, noise_image(40, 48, k), [{"name": "dog", "box": (5, 6, 30, 32)}], "real")
                                       for k, i in enumerate(ids)])
    png = cv2.imencode(".png", noise_image(40, 48))[1].tobytes()
    with open(os.path.join(root, "JPEGImages", f"{bad}.jpg"), "wb") as f:
        f.write(png[:60] + b"\x00" * 200 + b"IEND\xaeB`\x82")
    return root


def sys_path_tests():
    import sys

    if os.path.join(ROOT, "tests") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "tests"))


def test_training_names_an_image_that_does_not_decode(tmp_path, caplog):
    import logging

    from frcnn import data

    sys_path_tests()
    from test_data import make_cfg

    root = _voc_with_corrupt_png(tmp_path)
    cfg = make_cfg(root, data_extra={"classes": ["dog"]})
    records, _, report = data.load_records(cfg, "train")
    assert len(records) == 3 and not report  # the header check passes it
    with caplog.at_level(logging.WARNING, logger="frcnn.data"):
        batches = list(data.build_dataset(cfg, records, training=True, batch_size=2).take(4))
    ids = {int(i) for b in batches for i in b["image_ids"].numpy()}
    assert ids == {0, 2}  # b (id 1) is skipped, the others train
    named = [r.getMessage() for r in caplog.records if "b.jpg" in r.getMessage()]
    assert len(named) == 1, named  # named once, not once per epoch
    assert "image does not decode" in named[0] and "image skipped" in named[0]


def test_a_dataset_whose_every_image_fails_ends_instead_of_spinning(tmp_path):
    from frcnn import data

    sys_path_tests()
    from test_data import make_cfg

    root = _voc_with_corrupt_png(tmp_path, n=1, bad="a")
    cfg = make_cfg(root, data_extra={"classes": ["dog"]})
    records, _, _ = data.load_records(cfg, "train")
    assert list(data.build_dataset(cfg, records, training=True, batch_size=1)) == []


class _Oracle:
    """A stand-in detector that returns every training box of the batch exactly (score 1): perfect detections."""

    def predict_on_batch(self, batch):
        import numpy as np

        valid = batch["gt_valid"].numpy()
        scales = batch["scales"].numpy()[:, None, None]
        return {"num_detections": valid.sum(1).astype(np.int32), "image_ids": batch["image_ids"].numpy(),
                "boxes": batch["gt_boxes"].numpy() / scales, "scores": valid.astype(np.float32),
                "classes": batch["gt_classes"].numpy()}


def test_evaluation_counts_the_objects_of_an_unreadable_image_as_missed(tmp_path, caplog):
    import logging

    from frcnn import data, evaluation

    sys_path_tests()
    from test_data import make_cfg

    root = _voc_with_corrupt_png(tmp_path)
    cfg = make_cfg(root, data_extra={"classes": ["dog"]})
    records, names, _ = data.load_records(cfg, "train")
    with caplog.at_level(logging.WARNING, logger="frcnn.evaluation.runner"):
        metrics, detections = evaluation.evaluate_records(_Oracle(), cfg, records, names, verbose=0)
    assert metrics["unreadable_images"] == [records[1].file_name]
    assert any("b.jpg" in r.getMessage() and "count as missed" in r.getMessage() for r in caplog.records)
    assert metrics["num_images"] == 3 and [d["image_id"] for d in detections] == [0, 1, 2]
    # Two of the three objects are found: recall 2/3, not the perfect score that dropping the image would give.
    assert metrics["AR100"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["voc07_mAP50"] < 0.9 and metrics["AP50"] < 0.9


# ----------------------------------------------------------------- weak case: a JPEG cut short (download stopped)


def _cut_jpeg_voc(tmp_path, fraction):
    import cv2

    sys_path_tests()
    from test_data import make_voc, noise_image

    # Smooth content: noise compresses to the same bytes per row everywhere, so the fraction of bytes kept is about
    # the fraction of rows that arrive (to the 16-row MCU).
    image = cv2.GaussianBlur(noise_image(256, 192), (0, 0), 3)
    root = make_voc(tmp_path / "voc", [("a", noise_image(64, 64), [{"name": "dog", "box": (5, 5, 30, 30)}], "real"),
                                       ("cut", image, [{"name": "dog", "box": (5, 5, 100, 60)}], "real")])
    path = os.path.join(root, "JPEGImages", "cut.jpg")
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: int(len(content) * fraction)])
    import tensorflow as tf

    full = tf.io.decode_jpeg(content, channels=3).numpy()  # the decoder the pipeline uses (OpenCV rounds apart)
    return root, path, full


def test_jpeg_cut_at_60_percent_is_used_with_a_warning_naming_the_fraction(tmp_path, caplog):
    import logging

    import numpy as np

    from frcnn import data
    from frcnn.data.imageio import TRUNCATED_FILL

    sys_path_tests()
    from test_data import make_cfg

    root, path, full = _cut_jpeg_voc(tmp_path, 0.6)
    cfg = make_cfg(root, data_extra={"classes": ["dog"]}, input_extra={"min_size": 256, "max_size": 256,
                                                                      "flip": False})
    records, _, report = data.load_records(cfg, "train")
    assert [r.source_id for r in records] == ["a", "cut"]
    cut = records[1]
    assert 0.5 <= cut.valid_rows / 256 <= 0.65, cut.valid_rows
    warning = [i for i in report.warnings if i.path == path]
    assert len(warning) == 1 and "truncated JPEG" in warning[0].problem
    assert f"{cut.valid_rows / 256:.0%} of its rows arrived" in warning[0].problem

    # The pipeline decodes the rows that arrived, exactly, and fills the rest with gray.
    batch = next(iter(data.build_dataset(cfg, records[1:], training=False, batch_size=1)))
    image = batch["images"][0].numpy()[:256, :192]
    arrived = cut.valid_rows
    np.testing.assert_allclose(image[: arrived - 16], full[: arrived - 16], atol=1)  # resize 256 -> 256: identity
    assert np.all(image[arrived + 1:] == TRUNCATED_FILL)

    # Inference reads it the same way (OpenCV alone returns nothing), naming the file and the fraction. It decodes
    # with libjpeg's accurate IDCT (Pillow), TensorFlow with its fast one: the same rows, a few levels apart.
    with caplog.at_level(logging.WARNING, logger="frcnn.data"):
        loaded = data.load_image(path)
    assert loaded.shape == full.shape and np.abs(loaded[:arrived].astype(int) - image[:arrived]).max() <= 8
    assert np.all(loaded[arrived:] == TRUNCATED_FILL)
    assert any("cut.jpg" in r.getMessage() and "% of its rows arrived" in r.getMessage() for r in caplog.records)


def test_jpeg_with_too_few_rows_is_skipped_naming_the_threshold(tmp_path):
    from frcnn import data

    sys_path_tests()
    from test_data import make_cfg

    root, path, _ = _cut_jpeg_voc(tmp_path, 0.3)
    records, _, report = data.load_records(make_cfg(root, data_extra={"classes": ["dog"]}), "train")
    assert [r.source_id for r in records] == ["a"]
    [issue] = report.skipped
    assert issue.path == path and "truncated JPEG" in issue.problem and "fewer than the 50% needed" in issue.problem
    with pytest.raises(data.DataError, match="cut.jpg.*fewer than the 50% needed"):
        data.load_image(path)


# ---------------------------------------------------------------------------------------- other weak cases


def test_infer_checks_the_output_location_before_any_work(tmp_path, capsys):
    infer = _tool("infer")
    image = tmp_path / "x.png"
    image.write_bytes(b"not read: the run must stop before")
    missing_weights = str(tmp_path / "no.weights.h5")  # loading it would be the first error otherwise
    blocker = tmp_path / "out_file"
    blocker.write_text("an existing file")
    assert infer.main([str(image), "--weights", missing_weights, "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker} cannot be used as a folder: it is a file" in err and ".tmp-" not in err
    out = tmp_path / "out"
    (out / "detections.json").mkdir(parents=True)
    assert infer.main([str(image), "--weights", missing_weights, "--out", str(out)]) == 2
    assert "detections.json is a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        assert infer.main([str(image), "--weights", missing_weights, "--out", str(readonly)]) == 2
        assert f"--out {readonly} is not writable" in capsys.readouterr().err


def test_glob_through_a_symlink_loop_gives_each_image_once(tmp_path):
    from frcnn import inference

    folder = tmp_path / "shots"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"x")
    (folder / "sub" / "b.png").write_bytes(b"x")
    os.symlink(folder, folder / "sub" / "loop")  # shots/sub/loop -> shots
    os.symlink(folder / "a.png", folder / "alias.png")
    paths, problems = inference.expand_inputs([str(folder / "**" / "*.png"), str(folder)])
    assert not problems
    assert sorted(os.path.realpath(p) for p in paths) == sorted(
        os.path.realpath(folder / n) for n in ("a.png", "sub/b.png"))


def _voc_ids(tmp_path, lines, ids):
    sys_path_tests()
    from test_data import make_cfg, make_voc, noise_image

    root = make_voc(tmp_path / "voc", [(i, noise_image(32, 32), [{"name": "dog", "box": (2, 2, 20, 20)}], "real")
                                       for i in ids])
    with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
        f.write(lines)
    return root, make_cfg(root)


def test_split_file_problems_say_what_is_wrong(tmp_path, caplog):
    import logging

    from frcnn import data

    root, cfg = _voc_ids(tmp_path / "empty", "\n  \n", ["a"])
    with pytest.raises(data.DataError, match=r"train\.txt lists no image ids \(it is empty\)") as err:
        data.load_records(cfg, "train")
    assert "data.classes" not in str(err.value)

    # An id with a space is one id (not 'my' plus a flag); a trailing VOC flag is not part of the id.
    root, cfg = _voc_ids(tmp_path / "space", "my photo\nb  1\nb\nc -1\nc\n", ["my photo", "b", "c"])
    with caplog.at_level(logging.WARNING, logger="frcnn.data"):
        records, _, report = data.load_records(cfg, "train")
    assert [r.source_id for r in records] == ["my photo", "b", "c"] and not report.skipped
    assert any("more than once ('b', 'c')" in r.getMessage() for r in caplog.records)


def _coco_root(tmp_path, annotations):
    sys_path_tests()
    from test_data import make_cfg, noise_image, write_image

    root = tmp_path / "coco"
    write_image(str(root / "train" / "1.png"), noise_image(40, 50))
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png", "width": 50, "height": 40}],
        "annotations": annotations, "categories": [{"id": 1, "name": "dog"}]}))
    return make_cfg(str(root), fmt="coco", val=None)


def test_negative_coco_width_is_named_as_such(tmp_path):
    from frcnn import data

    cfg = _coco_root(tmp_path, [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [30, 5, -10, 10]},
                                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [3, 5, 10, 10]}])
    records, _, report = data.load_records(cfg, "train")
    assert records[0].num_boxes == 1
    [issue] = report.warnings
    assert "negative width" in issue.problem and "annotation id 9" in issue.problem and "zero-area" not in issue.problem


def test_training_on_crowd_boxes_only_is_refused_with_the_reason(tmp_path):
    from frcnn import engine
    from frcnn.errors import TrainingError

    cfg = _coco_root(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 5, 10, 10], "iscrowd": 1}])
    # A norm that trains from random weights: frozen norms without pretrained weights are refused even earlier.
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, norm="group", freeze_at=0))
    with pytest.raises(TrainingError, match="no box to train on: all 1 boxes are crowd"):
        engine.train(cfg, str(tmp_path / "run"), verbose=0)
