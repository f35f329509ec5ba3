"""Mask generation speed: our bit-set generator vs a plain BEiT-style NumPy loop, side by side.

    python bench/masking.py [--grid 14] [--num-masked 147] [--budget 120] [--n 5000]

The reference is written for this benchmark the way the official data pipeline does it: a NumPy
int grid, rectangle proposals with slice sums, element-by-element filling, then a random top-up
(the official code tops up through a sort of random keys on the GPU; here it is NumPy).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np

from bootmae_ds.data.masking import MaskGenerator


def reference_mask(grid: int, num_masked: int, budget: int, lo: int, hi: int, rng: random.Random) -> np.ndarray:
    """BEiT-style block masking with a plain Python/NumPy loop, then a random top-up."""
    mask = np.zeros((grid, grid), dtype=np.int64)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    count = 0
    while count < budget:
        limit = min(budget - count, hi)
        delta = 0
        for _ in range(1000):
            area = rng.uniform(lo, limit)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top = rng.randint(0, grid - h)
                left = rng.randint(0, grid - w)
                already = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - already <= limit:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    flat = mask.reshape(-1)
    free = np.flatnonzero(flat == 0)
    flat[rng.sample(list(free), num_masked - int(flat.sum()))] = 1
    return flat.astype(bool)


def _time(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--num-masked", type=int, default=147)
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--min-block", type=int, default=16)
    parser.add_argument("--max-block", type=int, default=60)
    parser.add_argument("--n", type=int, default=5000)
    a = parser.parse_args()
    gen = MaskGenerator(a.grid, a.num_masked, "block", a.budget, a.min_block, a.max_block)
    rand = MaskGenerator(a.grid, a.num_masked, "random")
    ours_rng, ref_rng, rand_rng = random.Random(0), random.Random(0), random.Random(0)
    assert int(reference_mask(a.grid, a.num_masked, a.budget, a.min_block, a.max_block, ref_rng).sum()) == a.num_masked
    t_ours = _time(lambda: gen(ours_rng), a.n)
    t_ref = _time(lambda: reference_mask(a.grid, a.num_masked, a.budget, a.min_block, a.max_block, ref_rng), a.n)
    t_rand = _time(lambda: rand(rand_rng), a.n)
    print(f"grid {a.grid}x{a.grid}, {a.num_masked} masked, block budget {a.budget}, {a.n} masks each")
    print(f"  ours, block + top-up (bool tensor) : {t_ours * 1e6:8.1f} us/mask")
    print(f"  reference NumPy loop               : {t_ref * 1e6:8.1f} us/mask")
    print(f"  ours, random (MAE)                 : {t_rand * 1e6:8.1f} us/mask")
    print(f"  speed-up vs reference              : {t_ref / t_ours:8.2f}x")


if __name__ == "__main__":
    main()
