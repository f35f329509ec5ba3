"""The classifier that fine-tuning trains: the pre-trained encoder, mean-pooled patch tokens,
LayerNorm, linear head.

This is timm's ``VisionTransformer(global_pool="avg", fc_norm=True)``: the encoder's final norm
becomes the pooled-feature norm (``fc_norm``), as in the export, so a fine-tuned classifier
exports to timm with the export's key mapping plus ``head.*``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from ..config.pretrain import ModelConfig
from .vit import VisionTransformerEncoder


class ViTClassifier(nn.Module):
    """Encoder blocks -> mean of the patch tokens -> ``fc_norm`` (the encoder's norm) -> head."""

    def __init__(self, encoder: VisionTransformerEncoder, num_classes: int, head_init_scale: float = 0.001) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
        nn.init.zeros_(self.head.bias)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """``fc_norm(mean of patch tokens)`` ``[B, D]``."""
        enc = self.encoder
        x = enc._embed(images)
        for block in enc.blocks:
            x = enc._run_block(block, x)
        return enc.norm(x[:, 1:].mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_pooled(images))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping (for layer-wise lr decay) with BEiT's numbering: embeddings, each
        block, then norm and head together (timm's own ViT merges the norm into
        the last block, 99999 = MATCH_PREV_GROUP, and gives the head a layer of its own)."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^(?:encoder\.norm|head)\.", (100000,))]}

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed"}


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
