"""Transformer building blocks: BEiT-style attention (q/v bias), cross-attention, blocks.

Attention widths follow the official code: ``head_dim`` defaults to ``dim // num_heads`` and the
inner width is ``num_heads * head_dim``, which may be below ``dim`` (12 heads x 42 = 504 in the
512-wide pixel regressor). All attention goes through ``scaled_dot_product_attention`` so GPUs
get flash / memory-efficient kernels and no attention matrix is materialised.

Flash attention takes head dims that are multiples of 8 only; 42 would fall back to a slower
kernel. On CUDA such heads are zero-padded (42 -> 48) for the kernel and cut back after it, with
the softmax scale of the true head dim: q.k and the weighted sum of v are unchanged by zero
columns, so the output is the same and the parameters (hence official checkpoints) are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

# Whether attention pads head dims to a multiple of 8: None = on CUDA only (where flash needs it);
# True / False force it (tests compare both paths on the CPU).
PAD_HEAD_DIM: bool | None = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` of ``[B, H, L, hd]`` tensors, with ``hd`` zero-padded to a
    multiple of 8 when the fast kernels need it (see the module docstring)."""
    hd = q.shape[-1]
    pad = -hd % 8
    if not pad or not (q.is_cuda if PAD_HEAD_DIM is None else PAD_HEAD_DIM):
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5)[..., :hd]


def _qv_bias(q_bias: torch.Tensor | None, v_bias: torch.Tensor | None, parts: int) -> torch.Tensor | None:
    """The fused projection bias: q bias, a zero k bias, v bias (``parts`` = 3 for qkv, 2 for kv)."""
    if v_bias is None:
        return None
    zeros = torch.zeros_like(v_bias)
    return torch.cat((q_bias, zeros, v_bias)) if parts == 3 else torch.cat((zeros, v_bias))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and BEiT's q/v-only bias."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, _qv_bias(self.q_bias, self.v_bias, 3))
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attend(q, k, v)  # [B, H, L, hd]
        return self.proj(x.transpose(1, 2).reshape(B, L, -1))


class CrossAttention(nn.Module):
    """Queries from ``x`` (width ``dim``), keys/values from a context of width ``context_dim``."""

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, head_dim: int | None = None, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        S = context.shape[1]
        q = F.linear(x, self.q.weight, self.q_bias).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        kv = F.linear(context, self.kv.weight, _qv_bias(self.q_bias, self.v_bias, 2))
        k, v = kv.view(B, S, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attend(q, k, v)  # [B, H, L, hd]
        return self.proj(x.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    """Pre-norm ViT block: ``x += attn(norm1(x)); x += mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        head_dim: int | None = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """BootMAE's target-aware decoder block.

    ``x += attn(norm1(x)); x += cross_attn(norm3(x), norm4(context)); x += mlp(norm2(x))``.
    With ``context_dim=None`` it is a plain ViT block (MAE's decoder) with no cross-attention.
    The odd norm numbering keeps the official parameter names.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        head_dim: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias)
        self.has_context = context_dim is not None
        if self.has_context:
            self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
            self.norm4 = nn.LayerNorm(context_dim, eps=norm_eps)
            self.c_attn = CrossAttention(dim, context_dim, num_heads, head_dim, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.has_context:
            x = x + self.c_attn(self.norm3(x), self.norm4(context))
        return x + self.mlp(self.norm2(x))
