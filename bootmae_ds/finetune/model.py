"""The fine-tuning classifier: the pre-trained encoder, mean-pooled patch tokens, LayerNorm, linear.

This is timm's ``VisionTransformer(global_pool="avg", fc_norm=True)``: the encoder's final norm
becomes the pooled-feature norm (``fc_norm``), as in the export, so a fine-tuned classifier
exports to timm with the export's key mapping plus ``head.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from ..config import BootMAEConfig, load_config
from ..models import VisionTransformerEncoder
from .config import FinetuneConfig


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


def load_pretrained(cfg: FinetuneConfig) -> tuple[VisionTransformerEncoder, BootMAEConfig, dict[str, Any]]:
    """(fp32 encoder, its pre-training config, provenance) for ``cfg.init``."""
    from ..export import from_official, from_run

    init = cfg.init
    if init.source == "random":
        pre = load_config(init.config)
        torch.manual_seed(cfg.run.seed)
        from ..models import build_model

        return build_model(pre).encoder, pre, {"source": "random", "config": init.config}
    path = Path(init.source)
    if path.is_file():
        exp = from_official(path, init.arch, init.which)
    elif path.is_dir():
        exp = from_run(path, init.tag, init.which)
    else:
        raise FileNotFoundError(f"init.source={init.source!r}: neither a run directory, an official .pth, "
                                f"nor 'random'")
    return exp.encoder, exp.cfg, exp.provenance


def _resized_encoder(encoder: VisionTransformerEncoder, pre: BootMAEConfig, img_size: int,
                     drop_path: float) -> VisionTransformerEncoder:
    """A copy of ``encoder`` at ``img_size`` with stochastic depth, position embedding resampled."""
    m = pre.model
    out = VisionTransformerEncoder(img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads,
                                   m.mlp_ratio, m.qkv_bias, drop_path, m.norm_eps)
    state = encoder.state_dict()
    if tuple(out.grid_size) != tuple(encoder.grid_size):
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(out.grid_size),
                                                    list(encoder.grid_size), num_prefix_tokens=1)
    out.load_state_dict(state, strict=True)
    return out


def build_classifier(cfg: FinetuneConfig) -> tuple[ViTClassifier, BootMAEConfig, dict[str, Any]]:
    """The classifier for ``cfg`` (pre-trained encoder + fresh head), its pre-training config and
    where the encoder came from."""
    encoder, pre, provenance = load_pretrained(cfg)
    size = cfg.model.img_size or pre.model.img_size
    encoder = _resized_encoder(encoder.float(), pre, size, cfg.model.drop_path)
    encoder.pos_embed.requires_grad_(cfg.model.train_pos_embed)
    torch.manual_seed(cfg.run.seed)
    return ViTClassifier(encoder, cfg.model.num_classes, cfg.model.head_init_scale), pre, provenance
