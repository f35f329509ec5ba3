"""An independent, functional re-statement of the official BootMAE forward pass.

Used by tests/test_official.py (parity of our model with the official computation) and by
bench/step.py (the reference-style step our step is timed against).

It works directly on a state dict in the *official* key layout (no module classes), with the
official token handling: a shuffled index per sample (visible first), explicit softmax
attention, the ConvTranspose2d pixel head producing an image. Written from the method's
description in shared/SPEC.md, not from the official code; it exists so our model can be
checked against a computation done another way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=EPS)


def _heads(x, n):
    B, L, W = x.shape
    return x.reshape(B, L, n, W // n).transpose(1, 2)


def _softmax_attention(q, k, v):
    scale = q.shape[-1] ** -0.5
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn @ v


def _self_attn(x, sd, name, heads):
    q_bias = sd[f"{name}.q_bias"]
    inner = q_bias.numel()
    # k has no bias: zeros on the biases' device and in their dtype (a CPU fp32 zeros would fail
    # on CUDA, and promote the bias, then the bf16 matmul's sum, to fp32)
    bias = torch.cat([q_bias, torch.zeros_like(q_bias), sd[f"{name}.v_bias"]])
    qkv = x @ sd[f"{name}.qkv.weight"].t() + bias
    q, k, v = (_heads(t, heads) for t in qkv.split(inner, dim=-1))
    out = _softmax_attention(q, k, v).transpose(1, 2).flatten(2)
    return out @ sd[f"{name}.proj.weight"].t() + sd[f"{name}.proj.bias"]


def _cross_attn(x, ctx, sd, name, heads):
    q_bias = sd[f"{name}.q_bias"]
    inner = q_bias.numel()
    q = x @ sd[f"{name}.q.weight"].t() + q_bias
    kv = ctx @ sd[f"{name}.kv.weight"].t() + torch.cat([torch.zeros_like(q_bias), sd[f"{name}.v_bias"]])
    k, v = kv.split(inner, dim=-1)
    out = _softmax_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
    out = out.transpose(1, 2).flatten(2)
    return out @ sd[f"{name}.proj.weight"].t() + sd[f"{name}.proj.bias"]


def _mlp(x, sd, name):
    h = F.gelu(x @ sd[f"{name}.fc1.weight"].t() + sd[f"{name}.fc1.bias"])
    return h @ sd[f"{name}.fc2.weight"].t() + sd[f"{name}.fc2.bias"]


def _enc_block(x, sd, name, heads):
    x = x + _self_attn(_ln(x, sd, f"{name}.norm1"), sd, f"{name}.attn", heads)
    return x + _mlp(_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp")


def _dec_block(x, ctx, sd, name, heads):
    x = x + _self_attn(_ln(x, sd, f"{name}.norm1"), sd, f"{name}.attn", heads)
    x = x + _cross_attn(_ln(x, sd, f"{name}.norm3"), _ln(ctx, sd, f"{name}.norm4"), sd, f"{name}.c_attn", heads)
    return x + _mlp(_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp")


def _embed(sd, images, patch):
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + sd["pos_embed"]


def official_forward(sd, images, idx_shuffle, mask_len, *, patch, depth, heads, feature_blocks):
    """Returns (pixel image [B,3,H,W], features [B,N,D]) for the shuffle ``idx_shuffle [B, N]``."""
    B = images.shape[0]
    x = _embed(sd, images, patch)
    N = x.shape[1] - 1
    D = x.shape[2]
    cls_idx = torch.zeros(B, 1, dtype=torch.long, device=idx_shuffle.device)
    idx = torch.cat([cls_idx, idx_shuffle + 1], dim=1)  # cls first
    unshuffle = idx.argsort(dim=1)
    keep = 1 + N - mask_len
    x = torch.gather(x, 1, idx[:, :keep, None].expand(-1, -1, D))
    feats = []
    for i in range(depth):
        x = _enc_block(x, sd, f"blocks.{i}", heads)
        if i in feature_blocks:
            feats.append(x)
    z = _ln(x, sd, "norm")
    masked_idx = idx[:, keep:]

    def decode(prefix, down, token, pos, norm, ctx):
        width = token.shape[-1]
        y = z @ sd[f"{down}.weight"].t() + sd[f"{down}.bias"]
        mask_pe = torch.gather(pos.expand(B, -1, -1), 1, masked_idx[:, :, None].expand(-1, -1, width))
        y = torch.cat([y, token.expand(B, mask_len, -1) + mask_pe], dim=1)
        y = torch.gather(y, 1, unshuffle[:, :, None].expand(-1, -1, width))
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})
        for j in range(n_blocks):
            y = _dec_block(y, ctx, sd, f"{prefix}.{j}", heads)
        return _ln(y, sd, norm)[:, 1:]

    pix = decode("decode_blocks", "down", sd["mask_token"], sd["de_pos_embed"], "decode_norm", feats[0])
    side = int(N**0.5)
    grid = pix.transpose(1, 2).reshape(B, -1, side, side)
    image = F.conv_transpose2d(grid, sd["lm_head.proj.weight"], sd["lm_head.proj.bias"], stride=patch)
    fea = decode("decode_blocks_1", "down_1", sd["mask_token_1"], sd["pos_embed"], "decode_norm_1", feats[-1])
    fea = fea @ sd["lm_head_1.weight"].t() + sd["lm_head_1.bias"]
    return image, fea


def official_target_features(sd, images, *, patch, depth, heads):
    """The momentum-encoder target: every block on the full image, patch tokens, no final norm."""
    x = _embed(sd, images, patch)
    for i in range(depth):
        x = _enc_block(x, sd, f"blocks.{i}", heads)
    return x[:, 1:]
