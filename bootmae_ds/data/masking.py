"""Mask generation: BEiT-style block-wise masking topped up to an exact count, and random masking.

Masks are generated in data-loader workers for every sample, so the block placement works on a
Python integer used as a bit set (bit ``i`` = patch ``i`` in row-major order): a rectangle is a
precomputed integer, overlap is ``popcount(rect & mask)``. That keeps a 14x14 mask at a few
microseconds instead of the ~100 us of a NumPy loop (see ``bench/masking.py``).

Every mask is a pure function of the RNG it is given, so a mask is reproducible from a seed.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

MaskStrategy = Literal["block", "random"]

# Safety cap on rectangle proposals per placed block. The official generator retries forever
# until a rectangle adds patches; with the default budgets a block lands within a handful of
# tries, and the cap only guarantees termination for odd configs (the top-up then fills in).
_MAX_PROPOSALS = 1000


@lru_cache(maxsize=4096)
def _rectangle_bits(height: int, width: int, top: int, left: int, h: int, w: int) -> int:
    """The bit set of the ``h x w`` rectangle at (top, left) on a ``height x width`` grid."""
    row = ((1 << w) - 1) << left
    bits = 0
    for r in range(top, top + h):
        bits |= row << (r * width)
    return bits


def _unpack(bits: int, num_patches: int) -> np.ndarray:
    raw = np.frombuffer(bits.to_bytes((num_patches + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:num_patches].astype(np.bool_)


def bits_to_mask(bits: int, num_patches: int) -> torch.Tensor:
    """Turn a patch bit set into a bool tensor ``[N]`` (True = masked)."""
    return torch.from_numpy(_unpack(bits, num_patches))


def _as_random(rng: random.Random | torch.Generator | int | None) -> random.Random:
    """Accept the RNG kinds callers have; a torch.Generator seeds a Python RNG from one draw."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, torch.Generator):
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=rng)))
    if rng is None or isinstance(rng, int):
        return random.Random(rng)
    raise TypeError(f"rng must be random.Random, torch.Generator, int or None, got {type(rng)!r}")


class MaskGenerator:
    """Draws BootMAE masks: ``num_masked`` of the ``grid`` patches, the same count every time.

    ``strategy="block"`` places BEiT rectangles (area uniform in [min_block, max_block] patches,
    log-uniform aspect ratio in [min_aspect, max_aspect]) until ``block_budget`` patches are
    covered, then masks uniformly random extra patches up to ``num_masked``, as the official
    BootMAE runs do (budget 120, blocks of at most 60, 147 in all). ``strategy="random"`` is
    MAE's uniform masking.
    """

    def __init__(
        self,
        grid: tuple[int, int] | int,
        num_masked: int,
        strategy: MaskStrategy = "block",
        block_budget: int | None = None,
        min_block: int = 16,
        max_block: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        self.num_patches = self.height * self.width
        if not 0 < num_masked < self.num_patches:
            raise ValueError(f"num_masked={num_masked} must be in [1, {self.num_patches - 1}]")
        if strategy not in ("block", "random"):
            raise ValueError(f"strategy={strategy!r} must be 'block' or 'random'")
        self.num_masked = num_masked
        self.strategy = strategy
        self.block_budget = num_masked if block_budget is None else block_budget
        if not 0 < self.block_budget <= num_masked:
            raise ValueError(f"block_budget={self.block_budget} must be in [1, num_masked={num_masked}]")
        self.min_block = min_block
        self.max_block = self.block_budget if max_block is None else max_block
        if not 0 < min_block <= self.max_block:
            raise ValueError(f"min_block={min_block} must be in [1, max_block={self.max_block}]")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def from_config(cls, cfg: "BootMAEConfig") -> "MaskGenerator":  # noqa: F821
        """Build from a validated ``BootMAEConfig`` (mask section + the model's patch grid)."""
        m = cfg.mask
        return cls(
            grid=cfg.model.grid_size,
            num_masked=m.num_masked,
            strategy=m.strategy,
            block_budget=m.block_budget,
            min_block=m.min_block_patches,
            max_block=m.max_block_patches,
            min_aspect=m.min_aspect,
            max_aspect=m.max_aspect,
        )

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(grid={self.height}x{self.width}, num_masked={self.num_masked}, "
            f"strategy={self.strategy!r}, block_budget={self.block_budget}, "
            f"blocks=[{self.min_block}, {self.max_block}])"
        )

    # -- block placement -------------------------------------------------------------------
    def _place_block(
        self, bits: int, limit: int, rng: random.Random, placed: list[tuple[int, int, int, int]] | None
    ) -> tuple[int, int]:
        """Add one rectangle adding between 1 and ``limit`` new patches; returns (bits, added)."""
        rand = rng.random  # inlined uniform draws: same values as rng.uniform, fewer calls
        lo, span = self.min_block, limit - self.min_block
        aspect_lo, aspect_span = self.log_aspect[0], self.log_aspect[1] - self.log_aspect[0]
        for _ in range(_MAX_PROPOSALS):
            area = lo + span * rand()
            aspect = math.exp(aspect_lo + aspect_span * rand())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                # int(random() * n) is a uniform draw in [0, n) at a third of randint's cost.
                top = int(rand() * (self.height - h + 1))
                left = int(rand() * (self.width - w + 1))
                rect = _rectangle_bits(self.height, self.width, top, left, h, w)
                added = (rect & ~bits).bit_count()
                if 0 < added <= limit:
                    if placed is not None:
                        placed.append((top, left, h, w))
                    return bits | rect, added
        return bits, 0

    def block_bits(self, rng: random.Random, placed: list[tuple[int, int, int, int]] | None = None) -> int:
        """The block-wise part alone: rectangles until ``block_budget`` patches are covered.

        ``placed``, if given, receives each rectangle as (top, left, height, width).
        """
        bits, count = 0, 0
        while count < self.block_budget:
            limit = min(self.block_budget - count, self.max_block)
            bits, added = self._place_block(bits, limit, rng, placed)
            if added == 0:
                break
            count += added
        return bits

    def sample(self, rng: random.Random | torch.Generator | int | None = None) -> np.ndarray:
        """One mask as a NumPy bool array ``[N]`` (True = masked), exactly ``num_masked`` True."""
        rng = _as_random(rng)
        if self.strategy == "random":
            # Draw whichever side is smaller (the visible patches at 75% masking): same law.
            if self.num_masked <= self.num_patches // 2:
                mask = np.zeros(self.num_patches, dtype=np.bool_)
                mask[rng.sample(range(self.num_patches), self.num_masked)] = True
            else:
                mask = np.ones(self.num_patches, dtype=np.bool_)
                mask[rng.sample(range(self.num_patches), self.num_patches - self.num_masked)] = False
            return mask
        mask = _unpack(self.block_bits(rng), self.num_patches)
        missing = self.num_masked - int(mask.sum())
        if missing > 0:  # top up with uniformly random unmasked patches
            mask[rng.sample(np.flatnonzero(~mask).tolist(), missing)] = True
        return mask

    def __call__(self, rng: random.Random | torch.Generator | int | None = None) -> torch.Tensor:
        """One mask ``[N]`` bool tensor, True = masked, exactly ``num_masked`` True.

        Checked here, in the loader workers, where it costs a microsecond: the training step
        takes the count from the config and never reads a mask back from the device."""
        mask = self.sample(rng)
        count = int(np.count_nonzero(mask))
        if count != self.num_masked:
            raise RuntimeError(f"{self!r} drew a mask of {count} patches instead of {self.num_masked}")
        return torch.from_numpy(mask)

    def batch(
        self, batch_size: int, rng: random.Random | torch.Generator | int | None = None
    ) -> torch.Tensor:
        """``batch_size`` masks ``[B, N]`` from one RNG stream (same count in every row)."""
        rng = _as_random(rng)
        return torch.from_numpy(np.stack([self.sample(rng) for _ in range(batch_size)]))
