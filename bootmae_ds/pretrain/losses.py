"""BootMAE losses as pure functions (SPEC: targets and losses).

    L_pix  = (1/|M|) sum_{k in M} w_k * mean_j (pred_kj - target_kj)^2
    L_feat = (1/|M|) sum_{k in M} w_k * mean_d (LN(pred_kd) - LN(target_kd))^2

with ``w_k = 1 + avgpool3x3(m)_k`` for masked patches when ``weighted`` (zero padding, divisor
always 9), ``w_k = 1`` otherwise, and 0 for visible patches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PixelNorm = Literal["per_channel", "per_patch", "none"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, N, P*P*C]``, patches row-major, values ordered (row, column, channel)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible into {p}px patches")
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, P*P*C]`` -> ``[B, C, H, W]``."""
    B = patches.shape[0]
    h, w = grid
    p = patch_size
    x = patches.reshape(B, h, w, p, p, chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, chans, h * p, w * p)


def pixel_targets(
    images: torch.Tensor, patch_size: int, norm: PixelNorm = "per_channel", eps: float = 1e-5
) -> torch.Tensor:
    """Normalised patch targets ``[B, N, P*P*C]`` (biased variance, ``eps`` inside the sqrt)."""
    target = patchify(images.float(), patch_size)
    if norm == "none":
        return target
    if norm == "per_patch":
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, unbiased=False, keepdim=True)
        return (target - mean) / (var + eps).sqrt()
    if norm != "per_channel":
        raise ValueError(f"pixel norm {norm!r} must be 'per_channel', 'per_patch' or 'none'")
    B, N, _ = target.shape
    per_chan = target.view(B, N, patch_size * patch_size, -1)  # [B, N, P*P, C]
    mean = per_chan.mean(dim=2, keepdim=True)
    var = per_chan.var(dim=2, unbiased=False, keepdim=True)
    return ((per_chan - mean) / (var + eps).sqrt()).view(B, N, -1)


def _grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        return grid
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches is not a square grid; pass grid=(h, w)")
    return side, side


def mask_weights(mask: torch.Tensor, weighted: bool, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-patch loss weights ``[B, N]``: 0 visible, 1 (+ avgpool3x3 of the mask if weighted) masked."""
    m = mask.float()
    if not weighted:
        return m
    h, w = _grid(m.shape[1], grid)
    pooled = F.avg_pool2d(m.view(-1, 1, h, w), 3, stride=1, padding=1, count_include_pad=True)
    return m * (1.0 + pooled.view_as(m))


def _weighted_mean(per_patch: torch.Tensor, mask: torch.Tensor, weighted: bool, grid: tuple[int, int] | None) -> torch.Tensor:
    w = mask_weights(mask, weighted, grid)
    return (per_patch * w).sum() / mask.sum().clamp(min=1)


def pixel_loss(
    pixels: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch_size: int,
    weighted: bool,
    norm: PixelNorm = "per_channel",
    eps: float = 1e-5,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Pixel reconstruction loss over masked patches; ``images`` are the model's input."""
    target = pixel_targets(images, patch_size, norm, eps)
    per_patch = (pixels.float() - target).pow(2).mean(dim=-1)  # [B, N]
    return _weighted_mean(per_patch, mask, weighted, grid)


def feature_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    weighted: bool,
    eps: float = 1e-6,
    grid: tuple[int, int] | None = None,
    subset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feature prediction loss over masked patches, both sides through an affine-free LayerNorm.

    With ``subset [B, K]`` (masked patch ids, paper Table 5) ``targets`` is ``[B, K, D]`` and
    the loss covers those patches only, each keeping its weight from the full mask.
    """
    D = features.shape[-1]
    if subset is not None:
        features = torch.gather(features, 1, subset.unsqueeze(-1).expand(-1, -1, D))
    pred = F.layer_norm(features.float(), (D,), eps=eps)
    target = F.layer_norm(targets.float(), (D,), eps=eps)
    per_patch = (pred - target).pow(2).mean(dim=-1)  # [B, N] or [B, K]
    if subset is None:
        return _weighted_mean(per_patch, mask, weighted, grid)
    w = torch.gather(mask_weights(mask, weighted, grid), 1, subset)
    return (per_patch * w).sum() / subset.numel()
