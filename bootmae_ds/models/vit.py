"""The ViT encoder of BootMAE: BEiT-style q/v bias, fixed 2-D sin-cos position embedding.

Pre-training runs it on the cls token plus the visible patches only (MAE-style gather); the
momentum copy runs it on the full image to produce feature targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Block
from .pos_embed import sincos_2d


@dataclass
class EncoderOutput:
    """What the decoders consume; every tensor holds the cls token then the visible patches."""

    z: torch.Tensor  # [B, 1+V, D] final LayerNorm output
    block_outputs: dict[int, torch.Tensor]  # block index -> [B, 1+V, D], un-normalised


class VisionTransformerEncoder(nn.Module):
    """ViT encoder: patch embedding, cls token, fixed sin-cos positions, pre-norm blocks."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A frozen parameter, as in the official model: stored in checkpoints, never trained.
        self.pos_embed = nn.Parameter(sincos_2d(self.grid_size, embed_dim), requires_grad=False)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=r, norm_eps=norm_eps) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.grad_checkpointing = False

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions added, cls first: ``[B, 1+N, D]``."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # [B, N, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(
        self, images: torch.Tensor, ids_keep: torch.Tensor | None = None, return_blocks: tuple[int, ...] = ()
    ) -> EncoderOutput:
        """Encode the patches ``ids_keep [B, V]`` (all patches if None) plus the cls token."""
        x = self._embed(images)  # [B, 1+N, D]
        if ids_keep is not None:
            D = x.shape[-1]
            visible = torch.gather(x[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # [B, V, D]
            x = torch.cat([x[:, :1], visible], dim=1)  # [B, 1+V, D]
        outputs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x)
            if i in return_blocks:
                outputs[i] = x
        return EncoderOutput(z=self.norm(x), block_outputs=outputs)

    def target_features(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feature targets ``[B, N, D]``: last block output before the final norm, patches only.

        With ``ids [B, K]`` only the cls token and those patches are fed (paper Table 5's
        momentum-input fraction) and ``[B, K, D]`` comes back.
        """
        return self.forward(images, ids, return_blocks=(self.depth - 1,)).block_outputs[self.depth - 1][:, 1:]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Full-image tokens after the final norm ``[B, 1+N, D]`` (fine-tuning, probing)."""
        return self.forward(images).z
