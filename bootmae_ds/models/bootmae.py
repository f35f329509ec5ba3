"""BootMAE: encoder on visible patches, a pixel regressor and a feature predictor.

    model = build_model(load_config("vit_base_800ep"))
    out = model(images, mask)            # mask [B, N] bool, True = masked
    out.pixels    # [B, N, P*P*3]  patch pixels ordered (row in patch, column, channel)
    out.features  # [B, N, D]      predicted momentum-encoder features
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.layers import trunc_normal_
from torch import nn

from .decoder import Decoder, PatchPixelHead
from .vit import VisionTransformerEncoder

if TYPE_CHECKING:
    from ..config import BootMAEConfig


@dataclass
class BootMAEOutput:
    """Predictions for every patch (only masked ones enter the loss)."""

    pixels: torch.Tensor  # [B, N, P*P*C]
    features: torch.Tensor | None  # [B, N, D], None without the feature branch


def mask_to_ids(mask: torch.Tensor, num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a mask ``[B, N]`` (same count per row) into visible ids ``[B, V]`` and masked ``[B, M]``.

    Ids come out in ascending patch order. Attention is permutation-equivariant, so this order
    gives the same predictions as the official code's shuffled order.

    With ``num_masked`` (the training step: the config's count, every mask checked in the loader
    workers) nothing is read back to the host: the count check is a device-side assertion, so an
    accelerator never waits for it and ``torch.compile`` sees no graph break. Without it the count
    is read from the mask (a device sync; for callers off the step path).
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [B, N], got {mask.dtype} {tuple(mask.shape)}")
    B, N = mask.shape
    if num_masked is None:
        counts = mask.sum(dim=1)
        M = int(counts[0])
        if not bool((counts == M).all()):
            raise ValueError(f"every mask row needs the same masked count, got {counts.tolist()}")
    else:
        M = num_masked
        torch._assert_async((mask.sum(dim=1) == M).all(), f"every mask row must mask exactly {M} patches")
    if not 0 < M < N:
        raise ValueError(f"masked count {M} must be in [1, {N - 1}]")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, ascending ids
    return order[:, : N - M], order[:, N - M :]


class BootMAE(nn.Module):
    """The pre-training model: ``encoder``, ``pixel_decoder`` and optional ``feature_decoder``."""

    def __init__(self, cfg: "BootMAEConfig") -> None:
        super().__init__()
        m = cfg.model
        self.patch_size = m.patch_size
        self.num_masked = cfg.mask.num_masked  # every mask of a batch masks exactly this many
        self.encoder = VisionTransformerEncoder(
            m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads,
            m.mlp_ratio, m.qkv_bias, m.drop_path, m.norm_eps,
        )
        grid = self.encoder.grid_size
        pix = m.pixel_decoder
        pix_dim = pix.dim or m.embed_dim
        self.pixel_context = m.resolve_block(pix.context_block) if pix.context else None
        self.pixel_decoder = Decoder(
            m.embed_dim, pix_dim, pix.depth, pix.num_heads or m.num_heads, grid,
            head=PatchPixelHead(pix_dim, m.patch_size, m.in_chans, m.pixel_head_bias),
            context_dim=m.embed_dim if pix.context else None, head_dim=pix.head_dim,
            mlp_ratio=pix.mlp_ratio, qkv_bias=m.qkv_bias, norm_eps=m.norm_eps,
            pos_embed_visible=pix.pos_embed_visible,
        )
        feat = m.feature_decoder
        self.feature_decoder: Decoder | None = None
        self.feature_context: int | None = None
        if feat.enabled:
            feat_dim = feat.dim or m.embed_dim
            self.feature_context = m.resolve_block(feat.context_block) if feat.context else None
            self.feature_decoder = Decoder(
                m.embed_dim, feat_dim, feat.depth, feat.num_heads or m.num_heads, grid,
                head=nn.Linear(feat_dim, m.embed_dim),
                context_dim=m.embed_dim if feat.context else None, head_dim=feat.head_dim,
                mlp_ratio=feat.mlp_ratio, qkv_bias=m.qkv_bias, norm_eps=m.norm_eps,
                pos_embed_visible=feat.pos_embed_visible,
            )
        self.context_blocks = tuple(
            sorted({b for b in (self.pixel_context, self.feature_context) if b is not None})
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation.

        Linear weights xavier-uniform (a fused qkv as three separate q, k, v matrices), biases
        zero, patch embedding xavier-uniform as a linear layer over the flattened patch, cls token
        N(0, 1e-6), mask tokens normal(0.02) truncated at one std, q/v biases zero.
        """
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith(".qkv"):
                    out, inp = module.weight.shape
                    bound = math.sqrt(6.0 / (out // 3 + inp))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.encoder.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.encoder.cls_token, std=1e-6)
        for decoder in (self.pixel_decoder, self.feature_decoder):
            if decoder is not None:
                trunc_normal_(decoder.mask_token, std=0.02, a=-0.02, b=0.02)
        for name, param in self.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                nn.init.zeros_(param)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> BootMAEOutput:
        """``images [B, C, H, W]`` (normalised), ``mask [B, N]`` bool with ``mask.num_masked`` True
        per row -> predictions per patch."""
        ids_keep, ids_masked = mask_to_ids(mask, self.num_masked)
        enc = self.encoder(images, ids_keep, return_blocks=self.context_blocks)
        ctx = enc.block_outputs
        pixels = self.pixel_decoder(enc.z, ids_keep, ids_masked, ctx.get(self.pixel_context))
        features = None
        if self.feature_decoder is not None:
            features = self.feature_decoder(enc.z, ids_keep, ids_masked, ctx.get(self.feature_context))
        return BootMAEOutput(pixels=pixels, features=features)


def build_model(cfg: "BootMAEConfig") -> BootMAE:
    """The BootMAE pre-training model for a validated config."""
    return BootMAE(cfg)
