"""Training the real detector: learning happens, the train tool writes checkpoints and resumes after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from frcnn import engine
from frcnn.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _event_tags(log_dir):
    """Tags of the image summaries written under ``log_dir`` (TensorBoard event files)."""
    import tensorflow as tf

    tags = set()
    for name in os.listdir(log_dir):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_learning_generalises_to_held_out_images(trained_shapes):
    """A small detector trains within the test budget and finds objects in validation images it never saw (a
    different split, generated with other seeds): AP50 far above chance, which is about 0 for boxes placed and
    labelled at random."""
    cfg, _, result, workdir = trained_shapes
    loss = result["history"]["loss"]
    assert all(later < earlier for earlier, later in zip(loss, loss[1:])) and loss[-1] < 0.9 * loss[0], loss
    metrics = result["metrics"]
    assert metrics["num_images"] == cfg.data.synthetic.num_val
    assert metrics["AP50"] > 0.15, {k: metrics[k] for k in ("AP", "AP50", "voc07_mAP50")}
    assert os.path.isfile(result["prediction_image"])
    # Every validation also drew a few validation images with their detections into TensorBoard.
    tags = _event_tags(os.path.join(workdir, "logs", "images"))
    assert len([t for t in tags if t.startswith("validation/")]) == 3, tags


def _train_args(raccoon_root, workdir):
    return [
        "--config", "test.yaml", "--workdir", str(workdir), "--quiet",
        "--set", "data.format=voc", "--set", f"data.root={raccoon_root}", "--set", "data.classes=null",
        "--set", "data.train_split=train", "--set", "data.val_split=val", "--set", "train.val_max_images=2",
        "--set", "train.epochs=2", "--set", "train.steps_per_epoch=3", "--set", "train.batch_size=1",
        "--set", "train.checkpoint_every=1", "--set", "train.val_every=1",
    ]


def _state(workdir):
    try:
        with open(os.path.join(workdir, "checkpoints", "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def test_raccoon_training_survives_sigkill_and_resumes(raccoon_root, tmp_path):
    """Real photos: train.py writes checkpoints; killed with SIGKILL mid-run, the same command resumes."""
    workdir = tmp_path / "run"
    args = _train_args(raccoon_root, workdir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "train.py"), *args], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            state = _state(workdir)
            if state and state["global_step"] >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    killed_at = _state(workdir)["global_step"]
    assert 2 <= killed_at < 6
    # Nothing half-written: the checkpoint the state names loads, and no temporary file is left as a checkpoint.
    checkpoints = sorted(os.listdir(workdir / "checkpoints"))
    assert "last.weights.h5" in checkpoints and "state.json" in checkpoints

    import train as train_tool

    assert train_tool.main(args) == 0
    state = _state(workdir)
    assert state["global_step"] == 6 and state["epoch"] == 2
    assert os.path.isfile(workdir / "config.yaml")
    cfg = load_config(str(workdir / "config.yaml"))
    assert cfg.data.classes == ("raccoon",)
    assert not [f for f in os.listdir(workdir / "checkpoints") if f.startswith(".tmp-")]
    # The validation callback ran each epoch and drove the best checkpoint.
    assert os.path.isfile(workdir / "checkpoints" / "best.weights.h5")
    assert state["best"] is not None
    with open(workdir / "val_metrics.json") as f:
        assert json.load(f)["num_images"] == 2
    assert os.listdir(workdir / "logs")  # TensorBoard logs


def test_train_tool_refuses_bad_override(capsys):
    import train as train_tool

    assert train_tool.main(["--config", "test.yaml", "--set", "model.no_such_key=1"]) == 2
    assert "model.no_such_key" in capsys.readouterr().err


def test_frozen_norm_from_random_weights_is_refused_before_any_work(tmp_path):
    """norm=frozen keeps the identity statistics of random weights and diverges: refused by name, before the work
    directory or the dataset is touched, with what to use instead."""
    from frcnn.errors import TrainingError

    cfg = load_config("voc.yaml", ["model.backbone_weights=none", f"data.root={tmp_path / 'no_such_voc'}"])
    assert cfg.model.norm == "frozen"
    with pytest.raises(TrainingError, match="model.norm=frozen with model.backbone_weights=none") as err:
        engine.train(cfg, str(tmp_path / "run"), verbose=0)
    assert "model.norm=group" in str(err.value) and "imagenet" in str(err.value)
    assert not (tmp_path / "run").exists()

    import train as train_tool

    assert train_tool.main(["--config", "voc.yaml", "--set", "model.backbone_weights=none",
                            "--workdir", str(tmp_path / "run2")]) == 2
    assert not (tmp_path / "run2").exists()
