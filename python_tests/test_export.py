"""Sample grids: nearest-neighbour upscaled so that small samples are visible."""
from __future__ import annotations

import numpy as np
import torch

from varweight_kernels.training.sampling import grid_scale, save_grid


def test_grids_upscale_small_samples(tmp_path):
    from PIL import Image
    assert (grid_scale(8, 8), grid_scale(32, 32), grid_scale(28, 28), grid_scale(64, 64), grid_scale(256, 256)) \
        == (8, 2, 3, 1, 1)
    images = torch.arange(4 * 8 * 8, dtype=torch.uint8).reshape(4, 1, 8, 8)
    save_grid(images, str(tmp_path / "grid.png"))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 65 + 1, 2 * 65 + 1)
    first = grid[1:65, 1:65]
    assert np.array_equal(first, images[0, 0].numpy().repeat(8, 0).repeat(8, 1))  # nearest neighbour
