"""The dense-transfer backbone: a pre-trained ViT turned into a 4-level feature pyramid.

This is the official BootMAE ``Segmentation/backbone/beit.py`` backbone (BEiT's), with its
parameter names, so that released segmentation checkpoints (``backbone.*``) load strictly:

- patch embedding, cls token, a *learned* absolute position embedding (taken from the
  pre-trained encoder and resampled bicubically to the input grid);
- pre-norm blocks with BEiT's q/v bias, a relative position bias per block (a table of
  ``(2Wh-1)(2Ww-1)+3`` entries per head: every patch-to-patch offset plus cls->patch, patch->cls
  and cls->cls; zero at the start), layer scale ``gamma_1``/``gamma_2`` (``init_values``) and
  stochastic depth rising linearly to ``drop_path_rate``;
- the patch tokens of blocks ``out_indices`` (official: 3, 5, 7, 11, i.e. blocks 4, 6, 8, 12;
  a block may serve two levels, for encoders of fewer than 4 blocks) as maps of stride 16, turned into strides 4, 8, 16, 32 by ``fpn1`` (2x transposed conv, BN,
  GELU, 2x transposed conv), ``fpn2`` (2x transposed conv), ``fpn3`` (identity) and ``fpn4``
  (2x2 max-pool). The encoder's final LayerNorm is not used (the official backbone has none).

Unlike the official one it runs at any input size divisible by the patch size: the position
embedding is resampled to the input's grid (bicubic, as the official loader does once for 512 px),
and a grid other than the one the relative position tables were built for reads the offsets it
needs from them (see :func:`relative_position_bias`). ``fpn1``'s BatchNorm is ``norm_layer``
(``nn.BatchNorm2d``; a job converts it to ``nn.SyncBatchNorm`` on GPUs, the keys are the same).

    backbone = ViTPyramid.from_encoder(encoder, img_size=512, drop_path_rate=0.1)
    c2, c3, c4, c5 = backbone(images)   # [B, 768, H/4, W/4] ... [B, 768, H/32, W/32]
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed
from timm.layers.pos_embed_rel import gen_relative_position_index
from torch import nn
from torch.utils.checkpoint import checkpoint

from .vit import VisionTransformerEncoder

Grid = tuple[int, int]
EXTRA_OFFSETS = 3  # the table's last rows: cls->patch, patch->cls, cls->cls


def relative_position_bias(table: torch.Tensor, table_grid: Grid, grid: Grid,
                           index: torch.Tensor | None = None) -> torch.Tensor:
    """The attention bias ``[heads, 1+N, 1+N]`` of a ``grid`` of patches plus the cls token from a
    BEiT table ``[(2Wh-1)(2Ww-1)+3, heads]`` built for ``table_grid`` (``index``: the grid's
    precomputed BEiT index, else computed).

    For another grid the patch-to-patch part of the table, an image of offsets
    ``(-(Wh-1)..Wh-1, -(Ww-1)..Ww-1)``, is cut to the offsets the grid has (exact: the same bias per
    offset as in the table's grid) or padded by repeating its edge (offsets the table never saw
    take the bias of the farthest one it did): patches keep their size, so an offset keeps its meaning.
    """
    if tuple(grid) != tuple(table_grid):
        heads = table.shape[1]
        (th, tw), (h, w) = table_grid, grid
        offsets = table[:-EXTRA_OFFSETS].t().reshape(1, heads, 2 * th - 1, 2 * tw - 1)
        pad = (max(w - tw, 0), max(w - tw, 0), max(h - th, 0), max(h - th, 0))
        if any(pad):
            offsets = F.pad(offsets, pad, mode="replicate")
        ch, cw = (offsets.shape[2] - (2 * h - 1)) // 2, (offsets.shape[3] - (2 * w - 1)) // 2
        offsets = offsets[0, :, ch:ch + 2 * h - 1, cw:cw + 2 * w - 1].reshape(heads, -1).t()
        table = torch.cat([offsets, table[-EXTRA_OFFSETS:]])  # [(2h-1)(2w-1)+3, heads]
        index = None
    if index is None:
        index = grid_index(tuple(grid), table.device)
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)  # [heads, 1+N, 1+N]


@functools.lru_cache(maxsize=2)
def grid_index(grid: Grid, device: torch.device) -> torch.Tensor:
    """BEiT's relative position index ``[1+N, 1+N]`` of ``grid`` (cls token included), made once per
    grid and device and shared: every block of a forward reads (and autograd keeps) one copy, which
    matters at detection sizes (4,201 tokens: 141 MB of int64). The last two grids are kept."""
    return relative_position_index(grid, device)


def relative_position_index(grid: Grid, device: torch.device | None = None,
                            index_fn: Callable[..., torch.Tensor] = gen_relative_position_index) -> torch.Tensor:
    """timm's index made on ``device``. timm releases before its ``device`` argument (a GPU
    machine's preinstalled timm may be older than the one the tests ran) make it on the CPU: it is
    moved once."""
    if "device" in inspect.signature(index_fn).parameters:
        return index_fn(grid, class_token=True, device=device)
    return index_fn(grid, class_token=True).to(device)


class RelPosAttention(nn.Module):
    """BEiT attention: fused qkv without bias, q/v biases, an optional relative position bias
    table (``window``: the patch grid it is built for), through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, window: Grid | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.window = tuple(window) if window else None
        if self.window:
            wh, ww = self.window
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1) + EXTRA_OFFSETS, num_heads))
            # Not saved: a constant (12 x 8 MB at 512 px), recomputed; released files' copies are checked.
            self.register_buffer("relative_position_index",
                                 gen_relative_position_index(self.window, class_token=True), persistent=False)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, L, D = x.shape
        bias = None if self.q_bias is None else torch.cat(
            (self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if self.relative_position_bias_table is not None:
            index = self.relative_position_index if tuple(grid) == self.window else None
            rel = relative_position_bias(self.relative_position_bias_table, self.window, grid, index)
            mask = rel.unsqueeze(0).to(q.dtype)  # [1, H, L, L], added to the logits
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, hd]
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class LayerScaleBlock(nn.Module):
    """``x += drop_path(gamma_1 * attn(norm1(x))); x += drop_path(gamma_2 * mlp(norm2(x)))``
    (no ``gamma`` with ``init_values=None``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, init_values: float | None = 1.0, window: Grid | None = None,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RelPosAttention(dim, num_heads, qkv_bias, window)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        if init_values is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        a = self.attn(self.norm1(x), grid)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)


def _pyramid_ops(patch_size: int, dim: int, norm_layer: type[nn.Module]) -> list[nn.Module]:
    """``fpn1..fpn4``: the stride-``patch_size`` maps to strides 4, 8, 16, 32 (the official layouts
    for patch 16 and 8; for patch 4 identity and max-pools)."""
    def up() -> nn.ConvTranspose2d:
        return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)

    if patch_size == 16:
        return [nn.Sequential(up(), norm_layer(dim), nn.GELU(), up()), nn.Sequential(up()), nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2)]
    if patch_size == 8:
        return [nn.Sequential(up()), nn.Identity(), nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2)),
                nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4))]
    if patch_size == 4:  # not in the official file: patch 8's pattern one octave down (the CPU demo)
        return [nn.Identity(), nn.MaxPool2d(kernel_size=2, stride=2), nn.MaxPool2d(kernel_size=4, stride=4),
                nn.MaxPool2d(kernel_size=8, stride=8)]
    raise ValueError(f"patch_size={patch_size}: the feature pyramid is defined for patch sizes 16, 8 and 4")


class ViTPyramid(nn.Module):
    """ViT -> features of strides 4, 8, 16, 32 (``embed_dim`` channels each); official key names."""

    strides = (4, 8, 16, 32)

    def __init__(
        self,
        img_size: int | Grid = 512,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        init_values: float | None = 1.0,
        use_abs_pos_emb: bool = True,
        use_rel_pos_bias: bool = True,
        out_indices: tuple[int, ...] = (3, 5, 7, 11),
        norm_eps: float = 1e-6,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(out_indices) != 4 or list(out_indices) != sorted(out_indices) or \
                not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices={tuple(out_indices)}: need 4 non-decreasing block indices in "
                             f"0..{depth - 1}")
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid_size: Grid = tuple(self.patch_embed.grid_size)  # type: ignore[assignment]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        n = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, embed_dim)) if use_abs_pos_emb else None
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace(0, rate, depth)
        window = self.grid_size if use_rel_pos_bias else None
        self.blocks = nn.ModuleList(
            LayerScaleBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, r, init_values, window, norm_eps)
            for r in rates)
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = _pyramid_ops(patch_size, embed_dim, norm_layer)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: linear layers ~ trunc-normal(0.02) with zero bias, LayerNorms
        at (1, 0), cls token and position embedding ~ trunc-normal(0.02); convolutions and BN keep
        PyTorch's defaults. Pre-trained weights overwrite all but the new parts."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim] * 4

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Patch tokens with the cls token first and positions added ``[B, 1+N, D]``, and the grid."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W}: height and width must be multiples of the patch size {p}")
        grid = (H // p, W // p)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(images)], dim=1)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid != self.grid_size:
                pos = resample_abs_pos_embed(pos, list(grid), list(self.grid_size), num_prefix_tokens=1,
                                             antialias=False)
            x = x + pos
        return x, grid

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, C, H, W]`` (H, W multiples of the patch size) -> 4 maps ``[B, D, H/s, W/s]``
        for s = 4, 8, 16, 32."""
        x, grid = self._tokens(images)  # [B, 1+N, D]
        B, D = x.shape[0], x.shape[2]
        maps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[:self.out_indices[-1] + 1]):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, grid, use_reentrant=False)
            else:
                x = block(x, grid)
            if i in self.out_indices:
                maps[i] = x[:, 1:].transpose(1, 2).reshape(B, D, *grid)  # [B, D, H/p, W/p]
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [op(maps[i]) for op, i in zip(ops, self.out_indices)]

    @classmethod
    def from_encoder(cls, encoder: VisionTransformerEncoder, img_size: int | Grid = 512, **kwargs) -> ViTPyramid:
        """The backbone of ``encoder``'s architecture at ``img_size``, holding its weights: patch
        embedding, cls token, blocks, and its position table (fixed sin-cos in pre-training, a
        learned parameter here) resampled bicubically to the new grid, as the official loader does.
        Layer scales start at ``init_values``, relative position tables at zero, the pyramid fresh;
        the encoder's final norm is not used. ``kwargs``: the other constructor arguments."""
        block = encoder.blocks[0]
        model = cls(img_size, encoder.patch_size, encoder.patch_embed.proj.in_channels, encoder.embed_dim,
                    len(encoder.blocks), block.attn.num_heads, block.mlp.fc1.out_features / encoder.embed_dim,
                    block.attn.q_bias is not None, norm_eps=block.norm1.eps, **kwargs)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("norm.")}
        pos = state.pop("pos_embed")
        if model.pos_embed is not None:
            state["pos_embed"] = pos if tuple(encoder.grid_size) == model.grid_size else resample_abs_pos_embed(
                pos.float(), list(model.grid_size), list(encoder.grid_size), num_prefix_tokens=1, antialias=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        fresh = ("gamma_", "relative_position_bias_table", "fpn")
        if unexpected or any(not any(f in k for f in fresh) for k in missing):
            raise ValueError(f"encoder does not fit the pyramid backbone: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model


def drop_relative_position_index(state: dict[str, torch.Tensor], backbone: ViTPyramid,
                                 prefix: str = "") -> dict[str, torch.Tensor]:
    """``state`` without the ``{prefix}blocks.N.attn.relative_position_index`` buffers that official
    files carry (constants here, recomputed, not saved), after checking that each equals ours;
    a ValueError names the first that does not (a file of another grid)."""
    out = {}
    for key, value in state.items():
        if not key.endswith(".attn.relative_position_index"):
            out[key] = value
            continue
        block = key[len(prefix):].split(".")[1]
        ours = backbone.blocks[int(block)].attn.relative_position_index
        grid = f"{backbone.grid_size[0]}x{backbone.grid_size[1]} patch grid the model is built for"
        if tuple(value.shape) != tuple(ours.shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} is not the relative position index of the {grid}")
        differ = (value.to(ours) != ours).nonzero()
        if len(differ):
            i, j = (int(v) for v in differ[0])
            raise ValueError(f"{key}: {len(differ)} of {ours.numel()} values differ from the relative position "
                             f"index of the {grid} (first at [{i}, {j}]: {int(value[i, j])} in the file, "
                             f"{int(ours[i, j])} here); the file was written for another token layout")
    return out
