"""The backbone's activation memory on paper: global attention over the whole image against
windowed attention with a few global blocks (Li et al.), for the paper's 1333x800 input.

    python -m bootmae_ds.detect.memory          # docs/detection.md's table

What one training step keeps for the backward pass of the ViT backbone under bf16 autocast, per
GPU (``batch`` images), counted tensor by tensor for our blocks (``models/pyramid.py``):

- per block, ``40 s b h`` bytes for the token-wise tensors: the fp32 block input and the LayerNorm
  inputs (4 + 4), their bf16 outputs (2 + 2), q, k, v (6), the attention output (2), the two
  layer-scale inputs (2 + 2), the MLP's hidden layer before and after GELU (8 + 8); ``s`` tokens,
  ``b`` images, ``h`` width. The fused attention kernel keeps no ``s x s`` matrix, only a
  log-sum-exp per query and head (``4 a s b``).
- global blocks add the relative position bias the kernel reads as an additive mask, ``[a, s, s]``
  in bf16 (``2 a s^2``, shared by the batch), and the forward's shared relative position index
  (int64 ``s x s``, once). Windowed blocks pad the grid to whole windows and keep a bias of one
  window (``2 a w^4``): negligible.

Not counted: weights, gradients and optimizer state (the same for both), the FPN and heads (the
same for both, ~1-2 GB at this size), and transients (the backward of a global block briefly
holds the bias's gradient, ``2 a s^2 b`` bytes, for one block at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Backbone:
    name: str
    width: int
    heads: int
    depth: int
    patch: int = 16


VIT_B = Backbone("ViT-B/16", 768, 12, 12)
VIT_L = Backbone("ViT-L/16", 1024, 16, 24)


def padded_grid(height: int, width: int, patch: int = 16, divisor: int = 32) -> tuple[int, int]:
    """The token grid of an image padded to ``divisor`` (torchvision's batching)."""
    return (math.ceil(height / divisor) * divisor // patch, math.ceil(width / divisor) * divisor // patch)


def block_bytes(tokens: int, batch: int, m: Backbone) -> float:
    """Token-wise tensors one block keeps for backward, plus the kernel's log-sum-exp."""
    return 40 * tokens * batch * m.width + 4 * m.heads * tokens * batch


def activation_bytes(m: Backbone, grid: tuple[int, int], batch: int, window: int | None = None,
                     global_blocks: int = 0) -> dict[str, float]:
    """Bytes kept for backward by ``m``'s blocks on a ``grid`` of patches: every block global
    (``window=None``) or ``global_blocks`` global and the rest in ``window`` x ``window`` windows."""
    s = grid[0] * grid[1] + 1  # the cls token takes part in global attention
    n_global = m.depth if window is None else global_blocks
    bias = 2 * m.heads * s * s  # [heads, s, s] bf16 additive mask, per global block
    out = {"tokens": n_global * block_bytes(s, batch, m), "bias": n_global * bias,
           "index": 8 * s * s if n_global else 0.0}
    if window is not None:
        padded = math.ceil(grid[0] / window) * window * math.ceil(grid[1] / window) * window
        out["tokens"] += (m.depth - n_global) * block_bytes(padded, batch, m)
        out["bias"] += (m.depth - n_global) * 2 * m.heads * window**4
    out["total"] = sum(out.values())
    return out


def table(height: int = 800, width: int = 1333, batch: int = 2) -> list[tuple[str, str, dict[str, float]]]:
    """docs/detection.md's rows: both sizes, global vs 14x14 windows with 4 global blocks."""
    rows = []
    for m in (VIT_B, VIT_L):
        grid = padded_grid(height, width, m.patch)
        rows.append((m.name, "global, every block", activation_bytes(m, grid, batch)))
        rows.append((m.name, "14x14 windows, 4 global", activation_bytes(m, grid, batch, window=14, global_blocks=4)))
    return rows


def main() -> None:
    grid = padded_grid(800, 1333)
    print(f"1333x800 -> padded 1344x800 -> {grid[0]}x{grid[1]} = {grid[0] * grid[1]} patches, batch 2 per GPU")
    print("| backbone | attention | token tensors | position bias | index | total |")
    print("|---|---|---|---|---|---|")
    for name, how, b in table():
        print(f"| {name} | {how} | {b['tokens'] / GB:.1f} GB | {b['bias'] / GB:.2f} GB | {b['index'] / GB:.2f} GB "
              f"| **{b['total'] / GB:.1f} GB** |")


if __name__ == "__main__":
    main()
