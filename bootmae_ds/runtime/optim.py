"""Optimizer parameter groups and the per-step hyperparameters every trainer writes into them.

Pre-training splits {encoder, decoders} x {decay, no decay} so that an EMA of the encoder can
shadow exactly the encoder's ZeRO partitions; fine-tuning uses timm's layer-wise lr decay groups;
dense transfer (segmentation, detection) the official segmentation constructor's, by parameter name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms (1-D), position embeddings, cls and mask tokens are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES


def param_groups(model: nn.Module) -> list[dict]:
    """Up to four groups: {encoder, decoders} x {decay, no decay}, trainable params only.

    Each group carries ``name`` and ``apply_decay``; the trainer sets ``lr`` and
    ``weight_decay`` on every group every step.
    """
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoder" if name.startswith("encoder.") else "decoder"
        kind = "no_decay" if _no_decay(name, param) else "decay"
        buckets.setdefault(f"{part}_{kind}", []).append(param)
    order = ["encoder_decay", "encoder_no_decay", "decoder_decay", "decoder_no_decay"]
    return [
        {"params": buckets[k], "name": k, "apply_decay": not k.endswith("no_decay"),
         "weight_decay": 0.0}
        for k in order if k in buckets
    ]


def adamw(groups: list[dict], optim: Any, device_type: str) -> torch.optim.Optimizer:
    """torch AdamW over ``groups`` with ``optim.{base_lr, betas, eps}`` (fused kernels on CUDA,
    foreach elsewhere), handed to DeepSpeed as a client optimizer."""
    kwargs = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.base_lr, betas=optim.betas, eps=optim.eps, **kwargs)


def build_optimizer(model: nn.Module, cfg: Any, device_type: str) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` of ``model`` with ``cfg.optim``."""
    return adamw(param_groups(model), cfg.optim, device_type)


def layer_decay_groups(model: nn.Module, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay groups (by ``model.group_matcher``), one per layer and decay kind,
    each with ``lr_scale = layer_decay ** (last layer - layer)``, ``name`` and ``apply_decay``."""
    from timm.optim import param_groups_layer_decay

    no_decay = sorted(getattr(model, "no_weight_decay", lambda: set())())
    groups = param_groups_layer_decay(model, weight_decay=1.0, no_weight_decay_list=no_decay,
                                      layer_decay=layer_decay)
    for i, group in enumerate(groups):
        group["apply_decay"] = group.pop("weight_decay") > 0
        group["name"] = f"layer_group_{i}_{'decay' if group['apply_decay'] else 'no_decay'}"
        group["weight_decay"] = 0.0
    return groups


def set_hyperparameters(optimizer, lr: float, weight_decay: float) -> None:
    """Write this step's lr (times a group's ``lr_scale``) and weight decay into every group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("apply_decay") else 0.0


def backbone_layer_id(name: str, num_layers: int, prefix: str = "backbone.") -> int:
    """The layer of parameter ``name`` in the official BEiT/BootMAE dense-transfer constructor
    (``mmcv_custom/layer_decay_optimizer_constructor.py``): embeddings (cls token, mask token,
    position embedding, patch embedding) 0, block i at i+1, everything else (the pyramid, the
    heads) at ``num_layers + 1``."""
    if name in (f"{prefix}cls_token", f"{prefix}mask_token", f"{prefix}pos_embed") or \
            name.startswith(f"{prefix}patch_embed"):
        return 0
    if name.startswith(f"{prefix}blocks."):
        return int(name[len(f"{prefix}blocks."):].split(".")[0]) + 1
    return num_layers + 1


def backbone_layer_decay_groups(model: nn.Module, num_layers: int, layer_decay: float,
                                prefix: str = "backbone.") -> list[dict]:
    """The official dense-transfer constructor's groups (``LayerDecayOptimizerConstructor``, the
    segmentation config's ``paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.65)``): one group
    per layer and decay kind, ``lr_scale = layer_decay ** (num_layers + 1 - layer)`` (the heads 1,
    block 12 ``layer_decay``, the embeddings ``layer_decay ** 13``), each with ``name`` and
    ``apply_decay``; trainable parameters only.

    Not decayed, as there: 1-D parameters (biases, norms, layer scales) and names ending ``.bias``.
    Its further exemption of ``pos_embed`` and ``cls_token`` compares the *full* name (here
    ``backbone.pos_embed``), so under a ``backbone.`` prefix the position embedding, the cls token
    and the relative position tables are decayed: kept as the recipe was run.
    """
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"))
        layer = backbone_layer_id(name, num_layers, prefix)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(key, {"params": [], "name": key, "apply_decay": decay, "weight_decay": 0.0,
                                        "lr_scale": layer_decay ** (num_layers + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())
