"""Masking: exact counts, block structure, top-up, reproducibility."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_config

from bootmae_ds.data.masking import MaskGenerator, bits_to_mask


def _adjacent_pairs(mask: torch.Tensor, side: int) -> int:
    m = mask.view(side, side)
    return int((m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum())


@pytest.mark.parametrize("strategy", ["block", "random"])
@pytest.mark.parametrize("grid,num_masked,budget", [(14, 147, 120), (8, 48, 40), (7, 10, 10), (16, 200, 150)])
def test_exact_count_every_time(strategy, grid, num_masked, budget) -> None:
    gen = MaskGenerator(grid, num_masked, strategy, block_budget=budget, min_block=4, max_block=budget // 2)
    masks = gen.batch(200, random.Random(3))
    assert masks.shape == (200, grid * grid) and masks.dtype == torch.bool
    assert (masks.sum(dim=1) == num_masked).all()


def test_blocks_are_rectangles_that_cover_the_budget_exactly() -> None:
    gen = MaskGenerator(14, 147, "block", block_budget=120, min_block=16, max_block=60)
    rng = random.Random(7)
    for _ in range(100):
        placed: list[tuple[int, int, int, int]] = []
        bits = gen.block_bits(rng, placed)
        assert bits.bit_count() == 120
        covered, union = 0, 0
        for top, left, h, w in placed:
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14 and h < 14 and w < 14
            rect = sum(1 << ((top + r) * 14 + left + c) for r in range(h) for c in range(w))
            added = (rect & ~union).bit_count()
            assert 0 < added <= 60  # every block adds patches, none more than the per-block cap
            union |= rect
            covered += added
        assert union == bits and covered == 120


def test_top_up_keeps_the_blocks_and_adds_random_patches() -> None:
    gen = MaskGenerator(14, 147, "block", block_budget=120, min_block=16, max_block=60)
    for seed in range(50):
        block = bits_to_mask(gen.block_bits(random.Random(seed)), 196)
        full = gen(random.Random(seed))
        assert bool((full | block).eq(full).all())  # blocks are a subset
        assert int(full.sum()) == 147 and int(block.sum()) == 120


def test_block_masks_are_spatially_clustered_random_are_not() -> None:
    rng = random.Random(0)
    block = MaskGenerator(14, 120, "block", block_budget=120, min_block=16, max_block=60).batch(200, rng)
    rand = MaskGenerator(14, 120, "random").batch(200, rng)
    pairs_block = sum(_adjacent_pairs(m, 14) for m in block) / 200
    pairs_rand = sum(_adjacent_pairs(m, 14) for m in rand) / 200
    # 120 of 196 at random: ~364 * (120/196)*(119/195) = 136 adjacent masked pairs expected
    assert 120 < pairs_rand < 152
    assert pairs_block > 1.3 * pairs_rand


def test_reproducible_from_a_seed_and_from_a_torch_generator() -> None:
    gen = MaskGenerator.from_config(tiny_config("mask.strategy=block"))
    assert torch.equal(gen.batch(8, random.Random(5)), gen.batch(8, random.Random(5)))
    assert not torch.equal(gen.batch(8, random.Random(5)), gen.batch(8, random.Random(6)))
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(gen.batch(4, g1), gen.batch(4, g2))
    assert torch.equal(gen(9), gen(9))


def test_random_masking_is_uniform_over_positions() -> None:
    gen = MaskGenerator(8, 48, "random")
    freq = gen.batch(4000, random.Random(1)).float().mean(dim=0)
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.04)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_masked"):
        MaskGenerator(8, 64)
    with pytest.raises(ValueError, match="block_budget"):
        MaskGenerator(8, 40, block_budget=50)
    with pytest.raises(ValueError, match="strategy"):
        MaskGenerator(8, 40, strategy="grid")
    with pytest.raises(TypeError, match="rng"):
        MaskGenerator(8, 40)("seed")
