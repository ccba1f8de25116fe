"""Test setup: quiet TensorFlow, deterministic seeds, and the path of the shared raccoon data."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
