"""Reconstruction previews: layout and content of the grid."""

from __future__ import annotations

import torch

from bootmae_ds.pretrain.losses import pixel_targets
from bootmae_ds.pretrain.preview import reconstruction_grid


def test_grid_rows_show_input_masked_input_and_pasted_prediction() -> None:
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True  # top half masked
    perfect = pixel_targets(images.float() / 255, 4, "per_channel", eps=0.0)
    grid = reconstruction_grid(images, mask, perfect, patch_size=4)
    assert grid.shape == (3, 3 * 16 + 4, 2 * 16 + 3)  # make_grid pads by 1 pixel
    first = images[0].float() / 255
    torch.testing.assert_close(grid[:, 1:17, 1:17], first)  # row 1: input
    assert grid[:, 18:26, 1:17].abs().max() == 0  # row 2: masked half blanked
    torch.testing.assert_close(grid[:, 26:34, 1:17], first[:, 8:])
    torch.testing.assert_close(grid[:, 35:51, 1:17], first, atol=1e-4, rtol=0)  # row 3: perfect prediction
