import numpy as np

from frcnn import anchors


def test_count_is_h_w_9_at_stride_16():
    grid = anchors.grid_anchors(38, 63, 16, (128, 256, 512), (0.5, 1.0, 2.0)).numpy()
    assert grid.shape == (38 * 63 * 9, 4)
    assert anchors.num_anchors_per_location((128, 256, 512), (0.5, 1.0, 2.0)) == 9


def test_cell_anchor_shapes_area_and_ratio():
    cell = anchors.cell_anchors((128, 256), (0.5, 1.0, 2.0))
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    np.testing.assert_allclose(w * h, [128**2] * 3 + [256**2] * 3, rtol=1e-5)
    np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0] * 2, rtol=1e-5)
    np.testing.assert_allclose(cell[:, :2] + cell[:, 2:], 0.0, atol=1e-4)  # centred on the origin


def test_order_and_centres():
    sizes, ratios, stride = (32, 64), (0.5, 1.0, 2.0), 16
    grid = anchors.grid_anchors(3, 5, stride, sizes, ratios).numpy().reshape(3, 5, 6, 4)
    cell = anchors.cell_anchors(sizes, ratios)
    for y in range(3):
        for x in range(5):
            centre = np.array([(x + 0.5) * stride, (y + 0.5) * stride] * 2)
            np.testing.assert_allclose(grid[y, x], cell + centre, atol=1e-4)
