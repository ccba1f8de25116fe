"""Reliability and security, round three (issue 26): no file can run code, no write escapes its folder, any signal
keeps the work, names are data.

Each test is named after the defect it shows. Most use tiny Keras models or stubs and files built in tmp_path; the
SIGTERM test trains configs/test.yaml in a subprocess (two short runs: about a minute on a 2-core CPU).
"""

import errno
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from conftest import tool_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    return tool_script(name)


# ------------------------------------------------------------------------------ 1. a .pkl must not run code


class _RunsCode:
    """Unpickled by plain ``pickle.load``, this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_pkl(tmp_path, name="model_final_evil.pkl"):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.stem.conv1.weight": _RunsCode(marker)}, "__author__": "Detectron2"}, f)
    return str(path), marker


def test_hostile_pkl_as_infer_weights_is_refused_and_runs_nothing(tmp_path, capsys):
    import cv2

    path, marker = _hostile_pkl(tmp_path)
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    code = _tool("infer").main([str(image), "--weights", path, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert not marker.exists()
    assert path in err and "posix.system" in err and "refused" in err and "nothing in it was run" in err


def test_hostile_pkl_as_backbone_weights_is_refused_and_runs_nothing(tmp_path):
    from frcnn import pretrained
    from frcnn.config import load_config

    path, marker = _hostile_pkl(tmp_path, "R-50.pkl")
    # What training does with model.backbone_weights=<.pkl>: build_model -> pretrained.load_backbone, which reads
    # the file before it touches the model (so no model is needed to show it).
    cfg = load_config("test.yaml", [f"model.backbone_weights={path}", "model.norm=frozen"])
    with pytest.raises(pretrained.PretrainedError, match=r"R-50\.pkl' is refused: it contains the object posix\.system"):
        pretrained.load_backbone(None, cfg.model.backbone_weights)
    assert not marker.exists()


def _py2_caffe2_pickle(blob):
    """A protocol-2 pickle as Python 2 and NumPy 1.x wrote MSRA's R-50.pkl: byte strings (``U``/``T``), NumPy's
    ``numpy.core.multiarray._reconstruct``, ``ndarray.__setstate__`` with the data as a byte string."""
    data = blob.tobytes()
    return (b"\x80\x02}q\x00(U\x05blobs}(U\x07conv1_wcnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            b"K\x00\x85U\x01b\x87R(K\x01" + b"".join(b"K" + bytes([d]) for d in blob.shape) + b"\x86cnumpy\ndtype\n"
            b"U\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
            + struct.pack("<i", len(data)) + data + b"tbuU\x0a__author__U\x06Caffe2u.")


@pytest.mark.filterwarnings("ignore:numpy.core:DeprecationWarning")
def test_safe_unpickler_reads_what_numpy_1_and_2_and_python_2_write(tmp_path, monkeypatch):
    from frcnn.pretrained.reader import safe_load

    obj = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "f": np.asfortranarray(np.eye(3)),
                     "empty": np.zeros((0, 4), np.float32), "flag": np.array([True, False])},
           "step": np.int64(7), "lr": np.float64(0.5), "meta": (1, "x", [2.0, None]), "__author__": "me"}

    def check(loaded):
        for key, value in obj["model"].items():
            assert type(loaded["model"][key]) is np.ndarray
            np.testing.assert_array_equal(loaded["model"][key], value)
        assert loaded["step"] == 7 and type(loaded["step"]) is np.int64 and loaded["lr"] == 0.5
        assert loaded["meta"] == (1, "x", [2.0, None])

    path = tmp_path / "x.pkl"
    for protocol in range(6):  # NumPy 2 names (numpy._core...), every protocol (5: _frombuffer)
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        check(safe_load(str(path)))
    # NumPy 1.x wrote numpy.core.*: pickle under those names (NumPy 2 still resolves them when pickling).
    core = np._core
    for fn, module in ((core.multiarray._reconstruct, "numpy.core.multiarray"),
                       (core.multiarray.scalar, "numpy.core.multiarray"), (core.numeric._frombuffer, "numpy.core.numeric")):
        monkeypatch.setattr(fn, "__module__", module)
    for protocol in (2, 5):
        data = pickle.dumps(obj, protocol=protocol)
        assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
        path.write_bytes(data)
        check(safe_load(str(path)))
    monkeypatch.undo()
    blob = np.arange(12, dtype=np.float32).reshape(3, 4)
    path.write_bytes(_py2_caffe2_pickle(blob))
    loaded = safe_load(str(path))
    assert loaded["__author__"] == "Caffe2"
    np.testing.assert_array_equal(loaded["blobs"]["conv1_w"], blob)


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _State:
    """Pickles as NumPy's own ``_reconstruct`` + ``__setstate__``, with a state that declares ``shape``."""

    def __init__(self, shape, data=b""):
        self.shape, self.data = shape, data

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, self.shape, np.dtype("float32"), False, self.data))


@pytest.mark.parametrize("payload", [
    _Reduce(np._core.multiarray._reconstruct, np.ndarray, (4 << 30,), b"b"),  # the 99-byte file
    _State((1 << 30,)),  # a 4 GB float32 state with no data
    _Reduce(np.ndarray, (4 << 30,), "u1"),  # ndarray(shape) called directly
    _Reduce(np._core.numeric._frombuffer, b"", np.dtype("float32"), (1 << 30,), "C"),
], ids=["reconstruct_shape", "setstate_shape", "ndarray_call", "frombuffer"])
def test_small_pickle_declaring_a_4gb_array_is_refused_before_allocation(tmp_path, payload):
    from frcnn.pretrained.reader import UnsafePickleError, safe_load

    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    assert path.stat().st_size < 200
    tracemalloc.start()  # NumPy reports its array buffers to tracemalloc, even those never touched
    start = time.perf_counter()
    try:
        with pytest.raises(UnsafePickleError, match=r"big\.pkl' is refused"):
            safe_load(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("payload, named", [
    (np.array([None, 1], dtype=object), "not a number type"),  # an object array holds arbitrary objects
    (_Reduce(getattr, "x", "upper"), r"__builtin__\.getattr"),  # protocol 2 writes Python 2 names
    (_Reduce(np.zeros, (3,)), "numpy.zeros"),
    (_Reduce(bytes, 1 << 32), r"bytes\(\) was called with an argument"),
], ids=["object_array", "getattr", "numpy_zeros", "bytes_of_a_size"])
def test_pickle_asking_for_anything_outside_the_allow_list_is_refused_naming_it(tmp_path, payload, named):
    from frcnn.pretrained.reader import UnsafePickleError, safe_load

    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"model": {"a": payload}}, protocol=2))
    with pytest.raises(UnsafePickleError, match=named):
        safe_load(str(path))


def _touching_lambda(path):
    return lambda x: (open(path, "w").close(), x)[1]  # a lambda: Keras saves its bytecode (and this closure)


def test_hostile_keras_archive_is_read_for_weights_only(tmp_path):
    """A ``.keras`` file (accepted as weights) may carry a Lambda layer's bytecode in config.json; the project reads
    only its weights (``load_weights``), never the config, so the code does not run."""
    import keras

    from frcnn import checkpoints

    marker = tmp_path / "MARKER"
    touch = _touching_lambda(str(marker))
    inputs = keras.Input((3,))
    hostile = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Lambda(touch)(inputs)))
    path = tmp_path / "model.keras"
    hostile.save(path)
    marker.unlink()  # building the model above called the function once
    keras.saving.load_model(path, safe_mode=False)  # what this project never does: the file's code runs
    assert marker.exists()
    marker.unlink()
    plain = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Lambda(lambda x: x)(inputs)))
    checkpoints.load_weights(plain, str(path))
    assert not marker.exists()
    np.testing.assert_array_equal(plain.layers[-1].kernel.numpy(), hostile.layers[-1].kernel.numpy())


def test_no_module_uses_a_loader_that_can_run_code():
    import re

    banned = re.compile(r"pickle\.loads?\(|yaml\.(unsafe_)?load\(|yaml\.Loader|load_model\(|allow_pickle=True|"
                        r"torch\.load\(|enable_unsafe_deserialization|safe_mode=False|(?<![\w.])(eval|exec)\(|marshal\.")
    found = []
    for folder in ("frcnn", "tools"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(base, name), encoding="utf-8") as f:
                        found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1) if banned.search(line)]
    assert not found, found
    # The builtins, not methods of the same name (torch's ``module.eval()`` sets inference mode).
    assert banned.search("x = eval(text)") and banned.search("exec(code)") and not banned.search("net.eval()")


# ------------------------------------------------------------------------- 2. writes stay where the user said


def test_annotated_image_is_not_written_through_a_symlink_in_out(tmp_path):
    from frcnn.visualize import save_image

    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    link = out / "img.png"
    link.symlink_to(outside)
    save_image(str(link), np.zeros((8, 8, 3), np.uint8))
    assert outside.read_text() == "keep me"
    assert not link.is_symlink() and link.read_bytes().startswith(b"\x89PNG")


def test_lock_file_never_writes_through_a_planted_link(tmp_path):
    from frcnn.fileio import UnusableDirectory, lock_directory

    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(outside)
    with pytest.raises(UnusableDirectory, match=r"\.lock is a symbolic link"):
        with lock_directory(str(out)):
            pass
    assert outside.read_text() == "keep me"  # the lock used to truncate and rewrite its target


def test_workdir_folder_that_links_outside_is_refused(tmp_path):
    from frcnn.workdir import own_workdir
    from frcnn.errors import TrainingError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(TrainingError, match=r"checkpoints is a symbolic link to .*elsewhere, outside"):
        with own_workdir(str(workdir)):
            pass
    assert os.listdir(elsewhere) == []
    (workdir / "checkpoints").unlink()
    (workdir / "checkpoints").symlink_to("logs")  # a link that stays inside is the user's layout: fine
    (workdir / "logs").mkdir()
    with own_workdir(str(workdir)):
        pass


def _coco_with_paths(tmp_path, file_names):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images = [{"id": i + 1, "file_name": name, "width": 8, "height": 8} for i, name in enumerate(file_names)]
    (root / "annotations" / "instances_val.json").write_text(json.dumps(
        {"images": images, "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    return root


def test_dataset_paths_leaving_the_root_are_refused_and_never_logged(tmp_path, caplog):
    from frcnn.config import load_config
    from frcnn.data import load_records
    from frcnn.data.imageio import ImageProblem, inspect_image

    secret = tmp_path / "secret.jpg"
    secret.write_text("TOPSECRET contents\n")
    root = _coco_with_paths(tmp_path, ["../../secret.jpg", str(secret)])
    cfg = load_config("test.yaml", ["data.format=coco", f"data.root={root}", "data.classes=[cat]"])
    with caplog.at_level(logging.WARNING):
        records, _, report = load_records(cfg, "val")
    assert len(records) == 0 and len(report.skipped) == 2
    assert all("image path outside the image folder" in i.problem for i in report.skipped)
    assert "TOPSECRET" not in caplog.text and "outside the image folder" in caplog.text
    # VOC: an image id of the split file that climbs out of the dataset.
    voc = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("../../secret\n")
    cfg = load_config("test.yaml", ["data.format=voc", f"data.root={voc}", "data.classes=[cat]",
                                    "data.train_split=train"])
    records, _, report = load_records(cfg, "train")
    assert len(records) == 0 and "image path outside the dataset" in report.skipped[0].problem
    # A file that is no image is named as such, without quoting its bytes.
    with pytest.raises(ImageProblem) as err:
        inspect_image(str(secret))
    assert "TOPSECRET" not in str(err.value) and "TOP" not in str(err.value)


# ------------------------------------------------------------------- 3. every fault a named error, nothing lost


@pytest.mark.parametrize("case", ["file_in_the_way", "file_on_the_path", "read_only"])
def test_bad_workdir_exits_2_with_one_line_naming_path_and_reason(tmp_path, capsys, monkeypatch, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    workdir = {"file_in_the_way": blocker, "file_on_the_path": blocker / "run",
               "read_only": tmp_path / "ro"}[case]
    reason = {"file_in_the_way": "it is a file", "file_on_the_path": f"{blocker} on its path is a file",
              "read_only": "read-only file system"}[case]
    if case == "read_only":
        workdir.mkdir()
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):  # what a read-only mount answers (root ignores chmod)
            if str(path).startswith(str(workdir)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    code = _tool("train").main(["--config", "test.yaml", "--workdir", str(workdir), "--quiet",
                                "--set", f"data.root={tmp_path / 'shapes'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: --workdir") and str(workdir) in err
    assert reason in err and "Traceback" not in err


def _train_command(workdir, data_root, epochs):
    return [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config", "test.yaml", "--workdir",
            str(workdir), "--quiet", "--set", f"data.root={data_root}", "--set", "data.val_split=null",
            "--set", "train.val_every=0", "--set", "train.steps_per_epoch=1", "--set", f"train.epochs={epochs}",
            "--set", "train.checkpoint_every=0"]


def test_sigterm_saves_a_checkpoint_exits_143_and_the_run_resumes_at_that_step(tmp_path):
    workdir, data = tmp_path / "run", tmp_path / "shapes"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    state = workdir / "checkpoints" / "state.json"
    proc = subprocess.Popen(_train_command(workdir, data, 50), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.time() + 400
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)  # training goes on after its first checkpoint (end of epoch 1, step 1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM: checkpoint saved" in out and "Traceback" not in err
    step = json.loads(state.read_text())["global_step"]
    assert step >= 1
    # Run again. With train.epochs cut to the steps already made, the resumed run restores and has nothing left to
    # train (that fit_resumable goes on from a restored step exactly is shown in test_reliability.py).
    epochs = step
    again = subprocess.run(_train_command(workdir, data, epochs), capture_output=True, text=True, env=env,
                           timeout=400)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {workdir / 'checkpoints'}: epoch {step}, global step {step}" in again.stdout
    assert f"train.epochs 50 -> {epochs}" in again.stderr  # the changed setting is named
    assert json.loads(state.read_text())["global_step"] == step


def _fake_run(tmp_path, overrides=()):
    """A work directory as a run of configs/test.yaml leaves it: config.yaml, a checkpoint, its state."""
    from frcnn.config import load_config, save_config

    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    cfg = load_config("test.yaml", [f"data.root={tmp_path / 'shapes'}", "data.classes=[circle,square,triangle]",
                                    "train.steps_per_epoch=4", "data.val_split=null", *overrides])
    save_config(cfg, str(workdir / "config.yaml"))
    (workdir / "checkpoints" / "last.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # truncated
    (workdir / "checkpoints" / "state.json").write_text(json.dumps(
        {"epoch": 0, "global_step": 2, "best": None, "monitor": "val_AP", "steps_per_epoch": 4}))
    return workdir, cfg


def test_resume_with_reordered_classes_is_refused_and_config_yaml_is_kept(tmp_path):
    from frcnn import engine
    from frcnn.config import load_config
    from frcnn.errors import TrainingError

    workdir, _ = _fake_run(tmp_path)
    before = (workdir / "config.yaml").read_bytes()
    reordered = load_config("test.yaml", [f"data.root={tmp_path / 'shapes'}", "train.steps_per_epoch=4",
                                          "data.val_split=null", "data.classes=[square,circle,triangle]"])
    with pytest.raises(TrainingError, match=r"trained with the classes \[circle, square, triangle\].*"
                                            r"\[square, circle, triangle\] \(in another order\)"):
        engine.train(reordered, str(workdir), verbose=0)
    assert (workdir / "config.yaml").read_bytes() == before


def test_refused_resume_changes_nothing_and_names_changed_settings_and_the_intact_checkpoint(tmp_path, caplog):
    from frcnn import engine
    from frcnn.config import load_config
    from frcnn.errors import TrainingError

    workdir, _ = _fake_run(tmp_path)
    # The lock file (which a real run leaves) gets the new owner's pid: by design, the one file that changes.
    files = lambda: {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    cfg = load_config("test.yaml", [f"data.root={tmp_path / 'shapes'}", "train.steps_per_epoch=4",
                                    "data.val_split=null", "train.batch_size=1", "roi_heads.num_rois=16"])
    with caplog.at_level(logging.WARNING, logger="frcnn.checkpoints"):
        with pytest.raises(TrainingError, match="last.weights.h5' is damaged"):
            engine.train(cfg, str(workdir), verbose=0)
    assert "train.batch_size 2 -> 1" in caplog.text and "roi_heads.num_rois 8 -> 16" in caplog.text
    assert files() == before  # config.yaml included: it still describes the checkpoint


def _tiny(units=4, inputs=3):
    import keras

    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(units), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    return model


def test_truncated_checkpoint_names_the_intact_one(tmp_path):
    from frcnn import checkpoints, loading
    from frcnn.errors import TrainingError

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    model = _tiny()
    last, best = folder / "last.weights.h5", folder / "best.weights.h5"
    model.save_weights(str(last))
    model.save_weights(str(best))
    last.write_bytes(last.read_bytes()[:2000])
    with pytest.raises(TrainingError, match=rf"damaged .* {best} is intact: use it .*copying it over"):
        checkpoints.load_checkpoint(_tiny(), str(last))
    with pytest.raises(TrainingError, match=rf"is it complete\? {best} is intact"):
        loading.check_weights_file(str(last))
    best.write_bytes(best.read_bytes()[:2000])  # both damaged: nothing to suggest
    with pytest.raises(TrainingError) as err:
        checkpoints.load_checkpoint(_tiny(), str(last))
    assert "intact" not in str(err.value)


def test_wrong_models_weights_give_one_clear_line(tmp_path):
    import keras

    from frcnn import checkpoints
    from frcnn.errors import TrainingError

    path = tmp_path / "other.weights.h5"
    _tiny().save_weights(str(path))
    wide = keras.Sequential([keras.Input((5,))] + [keras.layers.Dense(4) for _ in range(30)])
    with pytest.raises(TrainingError) as err:
        checkpoints.load_checkpoint(wide, str(path))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and len(message) < 500
    assert "does not fit this model" in message and "kernel has the shape (5, 4) here but (3, 4) in the file" in message


def test_concurrent_infer_runs_into_one_out_are_refused(tmp_path, capsys):
    from frcnn import inference

    out = tmp_path / "out"
    with inference.own_output_dir(str(out)):
        code = _tool("infer").main(["whatever.jpg", "--weights", "w.weights.h5", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "in use by another infer run" in err and f"process {os.getpid()}" in err
    with inference.own_output_dir(str(out)):  # released at the end of the first run
        pass


def test_orphaned_shapes_folder_is_removed_and_the_data_folder_is_not_private(tmp_path):
    from frcnn.config import load_config
    from frcnn.data.shapes import ensure_shapes
    from frcnn.fileio import temporary_directory

    # What a generation killed by SIGKILL leaves: its temporary folder, its owner lock released by the kernel.
    killed = subprocess.run([sys.executable, "-c", (
        "import importlib.util, os, sys\n"
        "spec = importlib.util.spec_from_file_location('fileio', sys.argv[1])\n"
        "fileio = importlib.util.module_from_spec(spec); spec.loader.exec_module(fileio)\n"
        "with fileio.temporary_directory(sys.argv[2], '.shapes-tmp-') as tmp:\n"
        "    open(os.path.join(tmp, 'half.jpg'), 'wb').write(b'x' * 1000)\n"
        "    os.kill(os.getpid(), 9)\n"), os.path.join(ROOT, "frcnn", "fileio.py"), str(tmp_path)])
    assert killed.returncode == -9
    (orphan,) = [p for p in tmp_path.iterdir() if p.name.startswith(".shapes-tmp-")]
    with temporary_directory(str(tmp_path), ".shapes-tmp-") as live:  # another generation, alive: kept
        cfg = load_config("test.yaml", [f"data.root={tmp_path / 'shapes'}", "data.synthetic.num_train=2",
                                        "data.synthetic.num_val=1", "data.synthetic.image_size=64"])
        old = os.umask(0o022)
        try:
            root = ensure_shapes(cfg)
        finally:
            os.umask(old)
        assert not orphan.exists() and os.path.isdir(live)
    assert os.stat(root).st_mode & 0o777 == 0o755
    assert not os.path.exists(os.path.join(root, ".owner"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shapes-")] == []


# --------------------------------------------------------------------------------- 4. names are data, not layout


def test_class_name_with_a_newline_is_refused_wherever_names_are_read(tmp_path):
    from frcnn.config import ConfigError, load_config
    from frcnn.data import DataError, load_records

    with pytest.raises(ConfigError, match=r"data\.classes' has a name that cannot be a class name: 'cir\\ncle'"):
        load_config("test.yaml", ['data.classes=["cir\\ncle", square]'])
    for bad in ('"tab\\there"', '"nul\\0"', '"sep\\u2028x"', '""'):  # YAML escapes
        with pytest.raises(ConfigError, match="cannot be a class name"):
            load_config("test.yaml", [f"data.classes=[ok, {bad}]"])
    root = _coco_with_paths(tmp_path, [])
    ann = root / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "do\ng"}]}))
    cfg = load_config("test.yaml", ["data.format=coco", f"data.root={root}"])
    with pytest.raises(DataError, match=r"category id 2 cannot be a class name: 'do\\ng'"):
        load_records(cfg, "val")
    # VOC: the object is dropped with a warning naming it; the class list never sees the name.
    import cv2

    voc = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    cv2.imwrite(str(voc / "JPEGImages" / "a.jpg"), np.zeros((20, 20, 3), np.uint8))
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (voc / "Annotations" / "a.xml").write_text(
        "<annotation><size><width>20</width><height>20</height></size>"
        "<object><name>ca&#10;t</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
        "</object><object><name>dog</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax>"
        "</bndbox></object></annotation>")
    cfg = load_config("test.yaml", ["data.format=voc", f"data.root={voc}", "data.train_split=train"])
    records, names, report = load_records(cfg, "train")
    assert names == ("dog",) and len(records[0].boxes) == 1
    assert "class name with control characters" in report.warnings[0].problem


class _StubDetector:
    """What tf_export reads of a model (``transform``, ``variables``, ``class_names``) and a call that returns a
    fixed detection per image, so the SavedModel functions can be traced in a second."""

    def __init__(self, class_names=("__background__", "circle", "square")):
        from frcnn.config import load_config
        from frcnn.transform import ImageTransform

        self.transform = ImageTransform.from_input_config(load_config("test.yaml").input)
        self.variables = []
        self.class_names = list(class_names)

    def __call__(self, batch, training=False):
        import tensorflow as tf

        n = tf.shape(batch["images"])[0]
        return {"boxes": tf.ones([n, 2, 4]), "scores": tf.fill([n, 2], 0.9), "classes": tf.ones([n, 2], tf.int32),
                "num_detections": tf.fill([n], 2)}


def test_export_writes_names_that_cannot_shift_ids(tmp_path):
    from frcnn.config import ConfigError
    from frcnn.tf_export import EXTRA_DIR, export_saved_model

    with pytest.raises(ConfigError, match="control character"):
        export_saved_model(_StubDetector(("__background__", "cir\ncle", "square")), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    out = export_saved_model(_StubDetector(), tmp_path / "model")
    extra = os.path.join(out, EXTRA_DIR)
    with open(os.path.join(extra, "classes.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == ["__background__", "circle", "square"]
    with open(os.path.join(extra, "classes.json"), encoding="utf-8") as f:
        assert json.load(f) == ["__background__", "circle", "square"]


# ------------------------------------------------------------------------------------------ 5. the weaker cases


@pytest.mark.parametrize("entries, words", [
    ([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 0.9}] * 2, "entry 1: duplicate of entry 0"),
    ([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 1.5}], "score 1.5 is outside [0, 1]"),
    ([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "score": -0.1}], "outside [0, 1]"),
    ([{"image_id": True, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 0.9}],
     "image_id True is a boolean, not an id"),
], ids=["duplicate", "score_above_1", "negative_score", "boolean_image_id"])
def test_results_file_with_duplicates_scores_outside_0_1_or_boolean_ids_is_refused(tmp_path, entries, words):
    from frcnn.evaluation import score_results_file

    gt = {"images": [{"id": 1, "width": 100, "height": 80, "file_name": "1.jpg"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600,
                           "iscrowd": 0}],
          "categories": [{"id": 3, "name": "cat"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError) as err:
        score_results_file(str(tmp_path / "res.json"), str(tmp_path / "gt.json"))
    assert words in str(err.value)


def test_savedmodel_batch_with_a_bad_image_gives_zero_detections_and_a_flag():
    import cv2
    import tensorflow as tf

    from frcnn.tf_export import DetectorModule

    module = DetectorModule(_StubDetector())
    good = cv2.imencode(".png", np.full((40, 50, 3), 128, np.uint8))[1].tobytes()
    jpeg = cv2.imencode(".jpg", np.full((40, 50, 3), 128, np.uint8))[1].tobytes()
    out = module.serve_encoded(tf.constant([good, b"not an image", jpeg[: len(jpeg) // 3], b"", good]))
    assert out["decoded"].numpy().tolist() == [True, False, False, False, True]
    assert out["num_detections"].numpy().tolist() == [2, 0, 0, 0, 2]
    assert float(tf.reduce_sum(out["scores"][1:4])) == 0.0
    out = module.serve_encoded(tf.constant([b"junk"]))  # nothing decodes: still an answer, not an error
    assert out["decoded"].numpy().tolist() == [False] and out["num_detections"].numpy().tolist() == [0]
