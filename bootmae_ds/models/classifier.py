"""The classifiers on top of a pre-trained encoder: mean-pooled patch tokens, ``fc_norm``, head.

This is timm's ``VisionTransformer(global_pool="avg", fc_norm=True)`` and the official BootMAE
fine-tuning model: the encoder's final norm is not used; a LayerNorm of the pooled tokens
(``fc_norm``) feeds the head. The official model builds ``fc_norm`` fresh (weight 1, bias 0; the
pre-trained final norm is not loaded); ``fc_norm="encoder"`` starts it from the encoder's final
norm instead. Either way the classifier exports to timm with the export's key mapping plus
``fc_norm.*`` and ``head.*``.

The linear probe is the same model cut to the encoder's first blocks (``first_blocks``, the
official ``--depth``), frozen, with :class:`ProbeHead` (BatchNorm without affine + linear) as head.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from ..config.pretrain import ModelConfig
from .vit import VisionTransformerEncoder

FcNorm = Literal["fresh", "encoder"]


class ViTClassifier(nn.Module):
    """Encoder blocks -> mean of the patch tokens -> ``fc_norm`` -> head.

    ``encoder.norm`` is moved out of the encoder (replaced by an identity): it becomes ``fc_norm``
    with ``fc_norm="encoder"`` and is dropped with ``fc_norm="fresh"``, so no parameter sits in the
    optimizer without a gradient. ``head`` replaces the default linear head (the probe's).
    """

    def __init__(self, encoder: VisionTransformerEncoder, num_classes: int, head_init_scale: float = 0.001,
                 fc_norm: FcNorm = "fresh", head: nn.Module | None = None) -> None:
        super().__init__()
        pretrained_norm = encoder.norm
        encoder.norm = nn.Identity()
        self.encoder = encoder
        self.num_classes = num_classes
        if fc_norm == "encoder":
            self.fc_norm = pretrained_norm
        else:
            self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=pretrained_norm.eps)  # weight 1, bias 0
        if head is None:
            head = nn.Linear(encoder.embed_dim, num_classes)
            trunc_normal_(head.weight, std=0.02)
            with torch.no_grad():
                head.weight.mul_(head_init_scale)
            nn.init.zeros_(head.bias)
        self.head = head

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """``fc_norm(mean of patch tokens)`` ``[B, D]``, in ``fc_norm``'s dtype (the probe keeps
        it fp32 behind a bf16 encoder); the mean accumulates in fp32 either way."""
        enc = self.encoder
        x = enc._embed(images)  # [B, 1+N, D]
        for block in enc.blocks:
            x = enc._run_block(block, x)
        pooled = x[:, 1:].mean(dim=1, dtype=torch.float32)  # [B, D]
        return self.fc_norm(pooled.to(self.fc_norm.weight.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_pooled(images))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping (for layer-wise lr decay) with BEiT's numbering: embeddings, each
        block, then fc_norm and head together (timm's own ViT merges the norm into
        the last block, 99999 = MATCH_PREV_GROUP, and gives the head a layer of its own)."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^(?:fc_norm|head)\.", (100000,))]}

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed"}


class ProbeHead(nn.Module):
    """The official linear probe's head: BatchNorm1d without affine (eps 1e-6), then a linear layer
    with weights ~ trunc_normal(std ``init_std``) and zero bias (MoCo v3's initialisation)."""

    def __init__(self, dim: int, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        trunc_normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(features))

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """One linear layer equal to the head in eval mode: the BatchNorm's running statistics
        folded in (``W' = W / sqrt(var + eps)``, ``b' = b - W' mean``), in fp32."""
        scale = (self.bn.running_var.double() + self.bn.eps).rsqrt()  # [D]
        weight = self.linear.weight.double() * scale  # [K, D]
        out = nn.Linear(weight.shape[1], weight.shape[0])
        out.weight.copy_(weight.float())
        out.bias.copy_((self.linear.bias.double() - weight @ self.bn.running_mean.double()).float())
        return out


def first_blocks(encoder: VisionTransformerEncoder, depth: int) -> VisionTransformerEncoder:
    """``encoder`` cut to its first ``depth`` blocks in place (the official probe's ``--depth``)."""
    if not 1 <= depth <= len(encoder.blocks):
        raise ValueError(f"depth {depth}: the encoder has blocks 1..{len(encoder.blocks)}")
    encoder.blocks = encoder.blocks[:depth]
    encoder.depth = depth
    return encoder


def resized_encoder(encoder: VisionTransformerEncoder, m: ModelConfig, img_size: int,
                    drop_path: float) -> VisionTransformerEncoder:
    """A copy of ``encoder`` (of architecture ``m``) at ``img_size`` with stochastic depth
    ``drop_path``, its position embedding resampled (bicubic) when the grid changes."""
    out = VisionTransformerEncoder(img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads,
                                   m.mlp_ratio, m.qkv_bias, drop_path, m.norm_eps)
    state = encoder.state_dict()
    if tuple(out.grid_size) != tuple(encoder.grid_size):
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(out.grid_size),
                                                    list(encoder.grid_size), num_prefix_tokens=1)
    out.load_state_dict(state, strict=True)
    return out
