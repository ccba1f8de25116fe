"""Test setup: quiet TensorFlow, deterministic seeds, and the path of the shared raccoon data."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Subprocesses (the tools' scripts, backend workers) import this checkout's frcnn too, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402

RACCOON_ROOT = os.path.join(os.path.dirname(ROOT), "shared", "data", "raccoon")


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def raccoon_root():
    """The real raccoon data (Pascal VOC layout) beside the project; the test is skipped when it is absent."""
    root = os.environ.get("FRCNN_RACCOON", RACCOON_ROOT)
    if not os.path.isdir(os.path.join(root, "Annotations")):
        pytest.skip(f"raccoon data not found at {root}")
    return root


# A small detector trained once per session on held-out-validated synthetic shapes (about two minutes on a 2-core
# CPU), shared by the learning test and the precision tests that need a model whose detections mean something.
LEARN_OVERRIDES = [
    "data.synthetic.num_train=600", "data.synthetic.num_val=16", "data.synthetic.image_size=128",
    "data.synthetic.object_size=[32,72]", "data.synthetic.max_objects=3", "input.min_size=128", "input.max_size=128",
    "model.anchor_sizes=[32.0,64.0,128.0]", "model.pool_size=6", "model.head_pooling=none", "model.num_rois=16",
    "model.roi_positive_fraction=0.5", "train.epochs=3", "train.steps_per_epoch=100", "train.batch_size=2",
    "train.lr=0.001", "train.warmup_steps=20", "train.lr_decay_epochs=[2]", "train.val_every=1",
    "train.checkpoint_every=0",
]


@pytest.fixture(scope="session")
def trained_shapes(tmp_path_factory):
    """``(cfg, model, result, workdir)`` of :func:`frcnn.engine.train` on :data:`LEARN_OVERRIDES`."""
    import keras

    from frcnn import engine
    from frcnn.config import load_config

    root = tmp_path_factory.mktemp("learned")
    cfg = load_config("test.yaml", [f"data.root={root / 'shapes'}", *LEARN_OVERRIDES])
    keras.utils.set_random_seed(0)
    model, result = engine.train(cfg, str(root / "run"), verbose=0)
    return cfg, model, result, str(root / "run")


def tool_script(name):
    """``tools/<name>.py`` loaded as a module (not run): what a user runs from a checkout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
