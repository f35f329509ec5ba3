"""Losses against values computed independently with explicit loops over patches."""

from __future__ import annotations

import math

import pytest
import torch

from bootmae_ds.pretrain.losses import (
    feature_loss,
    mask_weights,
    patchify,
    pixel_loss,
    pixel_targets,
    unpatchify,
)


def _loop_patch(images, b, k, p, side):
    """Patch k of image b as a nested list [row][col][chan], by explicit indexing."""
    r, c = divmod(k, side)
    return [[[float(images[b, ch, r * p + i, c * p + j]) for ch in range(images.shape[1])]
             for j in range(p)] for i in range(p)]


def _loop_weight(mask, b, k, side, weighted):
    if not mask[b, k]:
        return 0.0
    if not weighted:
        return 1.0
    r, c = divmod(k, side)
    total = 0.0
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            rr, cc = r + dr, c + dc
            if 0 <= rr < side and 0 <= cc < side:
                total += float(mask[b, rr * side + cc])
    return 1.0 + total / 9.0


def _loop_target(patch, norm, eps=1e-5):
    p = len(patch)
    chans = len(patch[0][0])
    flat = [patch[i][j][ch] for i in range(p) for j in range(p) for ch in range(chans)]
    if norm == "per_patch":
        mean = sum(flat) / len(flat)
        var = sum((v - mean) ** 2 for v in flat) / len(flat)
        return [(v - mean) / math.sqrt(var + eps) for v in flat]
    stats = []
    for ch in range(chans):
        vals = [patch[i][j][ch] for i in range(p) for j in range(p)]
        mean = sum(vals) / len(vals)
        stats.append((mean, sum((v - mean) ** 2 for v in vals) / len(vals)))
    return [(patch[i][j][ch] - stats[ch][0]) / math.sqrt(stats[ch][1] + eps)
            for i in range(p) for j in range(p) for ch in range(chans)]


def _random_mask(B, N, M, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g) < M for _ in range(B)])


def test_patchify_order_and_inverse() -> None:
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    # patch (row 1, col 2) = index 5; value (i=3, j=1, c=2) sits at (3*4 + 1)*3 + 2
    assert patches[1, 5, (3 * 4 + 1) * 3 + 2] == x[1, 2, 4 + 3, 8 + 1]
    assert torch.equal(unpatchify(patches, 4, (2, 3)), x)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("norm", ["per_channel", "per_patch"])
def test_pixel_loss_matches_explicit_loops(weighted, norm) -> None:
    B, C, p, side = 2, 3, 4, 4
    N = side * side
    images = torch.randn(B, C, side * p, side * p, dtype=torch.float64)
    pixels = torch.randn(B, N, p * p * C, dtype=torch.float64)
    mask = _random_mask(B, N, 11, seed=1)
    num = 0.0
    for b in range(B):
        for k in range(N):
            w = _loop_weight(mask, b, k, side, weighted)
            if w:
                target = _loop_target(_loop_patch(images, b, k, p, side), norm)
                num += w * sum((float(pixels[b, k, j]) - t) ** 2 for j, t in enumerate(target)) / len(target)
    expected = num / (B * 11)
    got = pixel_loss(pixels, images, mask, patch_size=p, weighted=weighted, norm=norm)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weighted", [True, False])
def test_feature_loss_matches_explicit_loops(weighted) -> None:
    B, side, D = 3, 5, 16
    N = side * side
    feats = torch.randn(B, N, D, dtype=torch.float64) * 3 + 1
    targets = torch.randn(B, N, D, dtype=torch.float64) * 2 - 1
    mask = _random_mask(B, N, 17, seed=2)

    def ln(v):
        mean = sum(v) / len(v)
        var = sum((x - mean) ** 2 for x in v) / len(v)
        return [(x - mean) / math.sqrt(var + 1e-6) for x in v]

    num = 0.0
    for b in range(B):
        for k in range(N):
            w = _loop_weight(mask, b, k, side, weighted)
            if w:
                a, t = ln(feats[b, k].tolist()), ln(targets[b, k].tolist())
                num += w * sum((x - y) ** 2 for x, y in zip(a, t)) / D
    got = feature_loss(feats, targets, mask, weighted=weighted)
    assert got.item() == pytest.approx(num / (B * 17), rel=1e-6)


def test_weights_of_a_known_mask() -> None:
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [5, 6, 9, 10, 0]] = True  # a 2x2 block in the middle of a 4x4 grid + a corner
    w = mask_weights(mask, weighted=True).view(4, 4)
    assert w[1, 1].item() == pytest.approx(1 + 5 / 9)  # sees the 4 block cells and the corner
    assert w[0, 0].item() == pytest.approx(1 + 2 / 9)
    assert w[3, 3].item() == 0.0 and w.max().item() <= 2.0
    assert torch.equal(mask_weights(mask, weighted=False), mask.float())


def test_targets_are_normalised_and_loss_is_zero_for_perfect_predictions() -> None:
    images = torch.rand(2, 3, 16, 16)
    mask = _random_mask(2, 16, 12, seed=3)
    t = pixel_targets(images, 4, "per_channel").view(2, 16, 16, 3)
    assert torch.allclose(t.mean(dim=2), torch.zeros(2, 16, 3), atol=1e-5)
    perfect = pixel_targets(images, 4, "per_channel")
    assert pixel_loss(perfect, images, mask, patch_size=4, weighted=True).item() < 1e-10
    f = torch.randn(2, 16, 8)
    assert feature_loss(f * 2 + 3, f, mask, weighted=True).item() < 1e-8  # LN removes scale/shift
