"""Analytic FLOPs of a BootMAE training step, for MFU: matmuls only (norms etc. are negligible)."""

from __future__ import annotations

from ..config import BootMAEConfig
from ..models import BootMAE


def _linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _block_flops(tokens: int, dim: int, inner: int, mlp: int, ctx_tokens: int = 0, ctx_dim: int = 0) -> float:
    """Forward FLOPs of one (decoder) block on ``tokens`` tokens."""
    f = _linear(tokens, dim, 3 * inner) + 4.0 * tokens * tokens * inner + _linear(tokens, inner, dim)
    f += _linear(tokens, dim, mlp) + _linear(tokens, mlp, dim)
    if ctx_tokens:
        f += _linear(tokens, dim, inner) + _linear(ctx_tokens, ctx_dim, 2 * inner)
        f += 4.0 * tokens * ctx_tokens * inner + _linear(tokens, inner, dim)
    return f


def flops_per_image(model: BootMAE, cfg: BootMAEConfig) -> dict[str, float]:
    """Analytic forward FLOPs per image of each part (matmuls only; norms etc. are negligible)."""
    m = cfg.model
    n = m.num_patches
    visible = 1 + n - cfg.mask.num_masked
    d = m.embed_dim
    mlp = int(d * m.mlp_ratio)
    patch = _linear(n, m.in_chans * m.patch_size**2, d)
    enc_block = lambda t: _block_flops(t, d, d, mlp)  # noqa: E731
    parts = {"encoder": patch * visible / n + m.depth * enc_block(visible)}
    fraction = cfg.momentum.input_fraction
    teacher_tokens = 1 + (n if fraction == 1 else round(fraction * cfg.mask.num_masked))
    if model.feature_decoder is not None:
        parts["momentum_encoder"] = patch + m.depth * enc_block(teacher_tokens)
    for name, dec in (("pixel_decoder", model.pixel_decoder), ("feature_decoder", model.feature_decoder)):
        if dec is None:
            continue
        blk = dec.blocks[0]
        inner = blk.attn.num_heads * blk.attn.head_dim
        dmlp = blk.mlp.fc1.out_features
        ctx = visible if blk.has_context else 0
        f = _linear(visible, d, dec.dim) + len(dec.blocks) * _block_flops(1 + n, dec.dim, inner, dmlp, ctx, d)
        out = dec.head.weight.shape[0]
        parts[name] = f + _linear(n, dec.dim, out)
    return parts


def training_flops_per_image(parts: dict[str, float]) -> float:
    """Forward + backward (3x) for trained parts, forward only for the momentum encoder."""
    return sum(v if k == "momentum_encoder" else 3 * v for k, v in parts.items())
