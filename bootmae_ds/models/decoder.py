"""The two BootMAE decoders: the pixel regressor and the feature predictor.

Both share one structure: project the encoder output, add a learned mask token plus a fixed
position embedding for every masked patch, restore image order (cls first), run decoder blocks
that cross-attend to an encoder block's output, normalise, and apply a per-patch head.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import DecoderBlock
from .pos_embed import sincos_2d


class PatchPixelHead(nn.Module):
    """Per-patch linear map to ``P*P*C`` pixel values ordered (row, column, channel).

    With ``bias="per_channel"`` it is exactly the official ``ConvTranspose2d(dim, C, P, stride=P)``
    over the patch grid, including its single bias per output channel, so official weights map
    onto it losslessly. ``bias="per_value"`` is MAE's ``decoder_pred`` instead: a Linear with one
    bias per predicted value (``P*P*C``), so MAE's decoder maps onto it exactly.
    """

    def __init__(self, dim: int, patch_size: int, out_chans: int = 3, bias: str = "per_channel") -> None:
        super().__init__()
        if bias not in ("per_channel", "per_value"):
            raise ValueError(f"pixel head bias {bias!r}: must be 'per_channel' or 'per_value'")
        self.patch_size = patch_size
        self.out_chans = out_chans
        self.per_value = bias == "per_value"
        out = patch_size * patch_size * out_chans
        self.weight = nn.Parameter(torch.empty(out, dim))
        self.bias = nn.Parameter(torch.zeros(out if self.per_value else out_chans))
        if self.per_value:  # MAE's init of every Linear: xavier-uniform weight, zero bias
            nn.init.xavier_uniform_(self.weight)
        else:  # the official head keeps ConvTranspose2d's default init: U(+-1/sqrt(C*P*P)) for both
            bound = (out_chans * patch_size * patch_size) ** -0.5
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.per_value else self.bias.repeat(self.patch_size * self.patch_size)  # [(p, q, c)]
        return nn.functional.linear(x, self.weight, bias)


class Decoder(nn.Module):
    """A BootMAE decoder producing one prediction per patch: ``[B, N, out_dim]``."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid_size: tuple[int, int],
        head: nn.Module,
        context_dim: int | None,
        head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        pos_embed_visible: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.pos_embed_visible = pos_embed_visible
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(grid_size, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, context_dim, mlp_ratio, qkv_bias, head_dim, norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = head

    def forward(
        self,
        z: torch.Tensor,
        ids_keep: torch.Tensor,
        ids_masked: torch.Tensor,
        context: torch.Tensor | None,
    ) -> torch.Tensor:
        """``z [B, 1+V, D_enc]`` (cls + visible), patch ids ``[B, V]`` / ``[B, M]`` -> ``[B, N, out]``."""
        B, M = ids_masked.shape
        x = self.embed(z)  # [B, 1+V, d]
        pos = self.pos_embed[:, 1:].expand(B, -1, -1)  # [B, N, d]
        mask_tokens = self.mask_token + torch.gather(pos, 1, ids_masked.unsqueeze(-1).expand(-1, -1, self.dim))
        visible = x[:, 1:]
        if self.pos_embed_visible:
            visible = visible + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, self.dim))
        ids_restore = torch.argsort(torch.cat([ids_keep, ids_masked], dim=1), dim=1)  # [B, N]
        patches = torch.cat([visible, mask_tokens], dim=1)  # [B, N, d] in (visible, masked) order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, self.dim))
        x = torch.cat([x[:, :1], patches], dim=1)  # the cls slot of pos_embed is zero
        for block in self.blocks:
            x = block(x, context)
        return self.head(self.norm(x[:, 1:]))  # cls dropped: [B, N, out]
