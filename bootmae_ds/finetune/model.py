"""The fine-tuning classifier of a config: the ``init`` encoder at the fine-tuning resolution
with stochastic depth, its position embedding frozen unless ``model.train_pos_embed``, a fresh
``fc_norm`` (or the encoder's final norm) and a fresh head (``bootmae_ds.models.classifier``)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import BootMAEConfig, FinetuneConfig
from ..interop.encoders import load_init_encoder
from ..models.classifier import ViTClassifier, resized_encoder


def build_classifier(cfg: FinetuneConfig) -> tuple[ViTClassifier, BootMAEConfig, dict[str, Any]]:
    """The classifier for ``cfg`` (pre-trained encoder + fresh head), its pre-training config and
    where the encoder came from."""
    encoder, pre, provenance = load_init_encoder(cfg.init, cfg.run.seed)
    size = cfg.model.img_size or pre.model.img_size
    encoder = resized_encoder(encoder.float(), pre.model, size, cfg.model.drop_path)
    encoder.pos_embed.requires_grad_(cfg.model.train_pos_embed)
    torch.manual_seed(cfg.run.seed)
    model = ViTClassifier(encoder, cfg.model.num_classes, cfg.model.head_init_scale, cfg.model.fc_norm)
    return model, pre, provenance
