"""Training the real detector: learning happens, the train tool writes checkpoints and resumes after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from frcnn import engine
from frcnn.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def test_learning_happens_on_a_handful_of_synthetic_images(tmp_path):
    """Train on 4 synthetic images and evaluate on the same 4: the loss falls a lot and the objects are found."""
    cfg = load_config("test.yaml", [
        f"data.root={tmp_path / 'shapes'}", "data.synthetic.num_train=4", "data.synthetic.num_val=1",
        "data.val_split=train", "input.flip=false",
        "train.epochs=8", "train.steps_per_epoch=20", "train.batch_size=2", "train.lr=0.001",
        "train.warmup_steps=10", "train.lr_decay_epochs=[7]", "train.val_every=0", "train.checkpoint_every=0",
    ])
    model, result = engine.train(cfg, str(tmp_path / "run"), verbose=0)
    loss = result["history"]["loss"]
    assert len(loss) == 8
    assert loss[-1] < loss[0] / 4, loss
    metrics = result["metrics"]
    assert metrics["num_images"] == 4
    assert metrics["AP50"] > 0.8, metrics
    assert os.path.isfile(result["prediction_image"])
