"""Reconstruction previews for TensorBoard: input, masked input, prediction (pasted into the mask)."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid

from .losses import patchify, unpatchify


def reconstruction_grid(images: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor, patch_size: int,
                        max_images: int = 8) -> torch.Tensor:
    """``images`` uint8 [B,3,H,W], ``mask`` [B,N], ``pixels`` normalised per-patch predictions
    -> a float [3, 3H, kW] grid in [0, 1]: rows input / masked input / visible + prediction.

    Predictions are shown with each patch's own per-channel mean and std, the statistics the
    normalised target removed (the official previews do the same).
    """
    imgs = images[:max_images].float().cpu() / 255
    m = mask[:max_images].cpu()
    B, C, H, W = imgs.shape
    grid = (H // patch_size, W // patch_size)
    patches = patchify(imgs, patch_size).view(B, m.shape[1], patch_size * patch_size, C)
    mean, std = patches.mean(dim=2, keepdim=True), patches.std(dim=2, unbiased=False, keepdim=True)
    pred = pixels[:max_images].float().cpu().view_as(patches) * std + mean
    keep = (~m)[:, :, None, None].float()
    masked = unpatchify((patches * keep).reshape(B, m.shape[1], -1), patch_size, grid, C)
    pasted = unpatchify((patches * keep + pred * (1 - keep)).reshape(B, m.shape[1], -1), patch_size, grid, C)
    rows = torch.cat([imgs, masked, pasted.clamp(0, 1)], dim=0)
    return make_grid(rows, nrow=B, padding=1)
