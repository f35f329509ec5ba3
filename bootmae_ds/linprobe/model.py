"""The probe of a config: the ``init`` encoder cut to its first ``model.depth`` blocks, frozen,
mean-pooled patch tokens, a LayerNorm without learnt affine and :class:`ProbeHead`.

It is the official fine-tuning model (``ViTClassifier`` with a fresh ``fc_norm``) cut to
``--depth`` blocks, with the BatchNorm + linear head: what MAE's ``main_linprobe.py`` builds. The
fresh ``fc_norm`` is frozen at weight 1, bias 0, so it normalises without an affine map.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig, ConfigError, LinprobeConfig
from ..interop.encoders import EncoderExport, load_init_encoder
from ..interop.export import write_export
from ..models.classifier import ProbeHead, ViTClassifier, first_blocks, resized_encoder

BEST = "best"  # RUN/best: the best probe so far, as a timm classifier


def build_probe(cfg: LinprobeConfig) -> tuple[ViTClassifier, BootMAEConfig, dict[str, Any]]:
    """(probe in fp32 on the CPU, the encoder's pre-training config, where the encoder came from).
    Only ``probe.head`` is trainable."""
    encoder, pre, provenance = load_init_encoder(cfg.init, cfg.run.seed)
    depth = cfg.model.depth or pre.model.depth
    if depth > pre.model.depth:
        raise ConfigError(f"model.depth={depth}: the encoder of init.source={cfg.init.source!r} has "
                          f"{pre.model.depth} blocks; set model.depth to 1..{pre.model.depth} (null = all)")
    size = cfg.model.img_size or pre.model.img_size
    encoder = first_blocks(resized_encoder(encoder.float(), pre.model, size, drop_path=0.0), depth)
    torch.manual_seed(cfg.run.seed)
    head = ProbeHead(encoder.embed_dim, cfg.model.num_classes, cfg.model.head_init_std)
    probe = ViTClassifier(encoder, cfg.model.num_classes, fc_norm="fresh", head=head)
    probe.requires_grad_(False)
    head.requires_grad_(True)
    return probe, pre, provenance


def probe_export_config(pre: BootMAEConfig, cfg: LinprobeConfig, depth: int) -> BootMAEConfig:
    """``pre`` describing the exported probe: ``depth`` blocks at the probe's resolution and
    normalisation (``model.size`` cleared, as timm's registry names describe whole encoders)."""
    c = cfg
    model = pre.model.model_copy(update={"depth": depth, "size": None, "img_size": c.model.img_size})
    data = pre.data.model_copy(update={"mean": c.data.mean, "std": c.data.std})
    return pre.model_copy(update={"model": model, "data": data})


def write_best(out: Path, probe: ViTClassifier, head: ProbeHead, pre: BootMAEConfig, cfg: LinprobeConfig,
               provenance: dict[str, Any]) -> None:
    """``out`` := the probe as a timm classifier (fp32): ``probe``'s encoder blocks and ``fc_norm``
    (weight 1, bias 0), ``head`` with its BatchNorm folded in; plus ``metrics.json``. Atomic."""
    depth = len(probe.encoder.blocks)
    folded = copy.deepcopy(head).float().cpu().folded()
    exp = EncoderExport(probe.encoder, probe_export_config(pre, cfg, depth), provenance | {"depth": depth},
                        head=folded, fc_norm=probe.fc_norm)
    write_export(exp, out, force=True)
    (out / "metrics.json").write_text(json.dumps(exp.provenance, indent=1) + "\n")
