"""Fixed 2-D sin-cos position embeddings (MoCo v3 layout, zero vector in the cls slot)."""

from __future__ import annotations

import torch

LAYOUTS = ("row_first", "col_first")


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0,
              layout: str = "row_first") -> torch.Tensor:
    """Position embedding ``[1, 1 + H*W, dim]`` for patches in row-major order, cls slot zero.

    For patch ``(row, col)`` the vector is ``[sin(row*w), cos(row*w), sin(col*w), cos(col*w)]``
    with ``w_k = temperature ** (-k / (dim/4))``: the row comes first, exactly as the released
    BootMAE checkpoints store it. ``layout="col_first"`` puts the column half first, as MAE's
    ``get_2d_sincos_pos_embed`` does (its meshgrid puts w first).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"sin-cos layout {layout!r}: must be one of {LAYOUTS}")
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    height, width = grid
    rows = torch.arange(height, dtype=torch.float32).repeat_interleave(width)  # [N]
    cols = torch.arange(width, dtype=torch.float32).repeat(height)  # [N]
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [D/4]
    out_r = rows[:, None] * omega[None]  # [N, D/4]
    out_c = cols[:, None] * omega[None]
    first, second = (out_r, out_c) if layout == "row_first" else (out_c, out_r)
    emb = torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)  # [N, D]
    return torch.cat([torch.zeros(1, dim), emb], dim=0)[None]  # [1, 1+N, D]
