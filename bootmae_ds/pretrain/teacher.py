"""The teacher that provides BootMAE's feature targets: the sharded momentum encoder (an EMA of
the online encoder's ZeRO partitions), or a fixed encoder loaded from a file (paper Appendix B).

Both offer ``target`` (the encoder whose ``target_features`` give the targets), ``dtype``,
``update(momentum)``, ``gather()`` and ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig
from ..models import BootMAE
from ..runtime.run import DTYPES
from ..runtime.sharded_ema import ShardedEMA

ENCODER_PREFIX = "encoder."


class FrozenTeacher:
    """A fixed teacher loaded from a file: same interface, no updates, nothing to save."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.target = encoder.requires_grad_(False).eval()
        self.dtype = next(encoder.parameters()).dtype

    def update(self, momentum: float) -> None:  # noqa: ARG002
        return None

    def gather(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: ARG002
        return None


def load_frozen_teacher(encoder: torch.nn.Module, path: str) -> None:
    """Load an encoder state dict (safetensors or torch) into the frozen teacher, strictly."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"momentum.teacher_path={path!r} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"momentum.teacher_path={path!r} is not an encoder of this config: {err}") from None


def teacher_copy(cfg: BootMAEConfig, model: BootMAE) -> torch.nn.Module | None:
    """A copy of the freshly built encoder for the teacher, or None without a feature branch.
    Taken before DeepSpeed wraps the model (which casts it to bf16)."""
    return copy.deepcopy(model.encoder) if cfg.uses_teacher else None


def build_teacher(cfg: BootMAEConfig, engine: Any, encoder: torch.nn.Module | None,
                  precision: str, device: torch.device) -> ShardedEMA | FrozenTeacher | None:
    """The teacher of ``cfg.momentum.policy`` around ``encoder`` (from :func:`teacher_copy`)."""
    if encoder is None:
        return None
    m = cfg.momentum
    dtype = DTYPES[precision] if precision == "fp32" else DTYPES[m.target_dtype]
    if m.policy == "frozen":
        load_frozen_teacher(encoder, m.teacher_path)
        return FrozenTeacher(encoder.to(device, dtype))
    return ShardedEMA(engine, encoder, ENCODER_PREFIX, dtype)
