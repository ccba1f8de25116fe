"""The custom layers of frcnn.heads through the shared layer test (tests/layer_testing.py)."""

import keras
import numpy as np

from frcnn.heads import ROIHead, RPNHead, TimeDistributed
from layer_testing import run_layer_test


def test_time_distributed_layer_contract(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    layer = run_layer_test(TimeDistributed, lambda: {"layer": keras.layers.Dense(4, name="dense")}, [x], [(2, 3, 4)],
                           tmp_path, expect_weights=True)
    # Folding the time axis into the batch computes what the per-step loop computes.
    expected = np.stack([layer.layer(x[:, t]).numpy() for t in range(3)], axis=1)
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-6)


def test_rpn_head_layer_contract(tmp_path):
    """Objectness logits and deltas are float32 by design (they feed the losses and proposal decoding)."""
    features = np.random.default_rng(1).normal(size=(1, 4, 5, 6)).astype(np.float32)
    run_layer_test(RPNHead, dict(num_anchors=3, channels=8), [features], [(1, 60), (1, 60, 4)], tmp_path,
                   float32_outputs=(0, 1), expect_weights=True)


def test_roi_head_layer_contract(tmp_path):
    """TimeDistributed res5 -> pool -> Flatten -> Dense; class probabilities and box deltas are float32 by design."""
    pooled = np.random.default_rng(2).normal(size=(1, 2, 4, 4, 1024)).astype(np.float32)
    run_layer_test(ROIHead, dict(num_classes=3, norm="frozen"), [pooled], [(1, 2, 3), (1, 2, 8)], tmp_path,
                   float32_outputs=(0, 1), expect_weights=True, atol=1e-5)
