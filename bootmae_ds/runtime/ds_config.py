"""The DeepSpeed JSON of a run: a template from ``ds_configs/`` filled in from the run config.

Batch sizes, gradient accumulation, clipping and precision are written from the one config tree,
so the two can never disagree; the template holds only what the run config does not model
(ZeRO bucket sizes, overlap, logging).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
Precision = Literal["bf16", "fp32"]


def resolve_precision(cfg: Any, accelerator: str) -> Precision:
    """``run.precision`` with ``auto`` decided by the accelerator: bf16 on GPUs, fp32 on CPU."""
    if cfg.run.precision != "auto":
        return cfg.run.precision
    return "fp32" if accelerator == "cpu" else "bf16"


def load_template(name: str, template_dir: Path = TEMPLATE_DIR) -> dict[str, Any]:
    path = template_dir / name
    if not path.is_file():
        raise ConfigError(f"DeepSpeed template {str(path)!r} is missing; reinstall or restore ds_configs/")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed template {str(path)!r} is not valid JSON: {err}") from None
    data.pop("_comment", None)
    return data


def build_ds_config(
    cfg: Any, world_size: int, precision: Precision, template_dir: Path = TEMPLATE_DIR
) -> dict[str, Any]:
    """The DeepSpeed config for ``world_size`` data-parallel ranks at ``precision``."""
    accum = cfg.data.grad_accum_steps(world_size)
    ds = load_template("zero2_bf16.json" if precision == "bf16" else "zero2_fp32.json", template_dir)
    if precision != "bf16":
        ds.pop("bf16", None)
        ds.pop("data_types", None)
    ds.update(
        train_batch_size=cfg.data.global_batch_size,
        train_micro_batch_size_per_gpu=cfg.data.micro_batch_size,
        gradient_accumulation_steps=accum,
        gradient_clipping=cfg.optim.clip_grad or 0.0,
    )
    return ds
