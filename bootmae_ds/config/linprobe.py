"""The linear-probing configuration: one validated pydantic tree, like the other jobs'.

    cfg = load_linprobe_config("vit_base", overrides=["init.source=runs/b800"])

Presets live in ``bootmae_ds/presets/linprobe/``; ``vit_base`` (= the defaults) is the official
ViT-B probe (``scripts/linear/bash_linear_BootMAE_Base_800.sh`` running MAE's ``main_linprobe.py``):
the encoder's first 10 blocks frozen, mean-pooled patch tokens, LayerNorm without learnt affine,
BatchNorm without affine, a linear head; RandomResizedCrop (0.08-1, bicubic) + flip every step;
LARS, weight decay 0, lr = 0.1 x 16384 / 256, batch 16384 (1024 x accumulation 2 x 8 GPUs),
10 warm-up of 90 epochs; held-out images resized to 256 and centre-cropped to 224.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import PRESETS_ROOT, Section, load_tree
from .common import EpochJobTree, EpochScheduleConfig, LabelledDataConfig, NonfiniteGuard

PRESET_DIR = PRESETS_ROOT / "linprobe"


class ProbeModelConfig(Section):
    """What the probe looks at and what it predicts."""

    num_classes: int = Field(1000, ge=2, description="Output classes (labels must lie in 0..K-1).")
    depth: int | None = Field(
        10, ge=1, description="Encoder blocks kept (the official --depth): the probe pools the output of "
        "block `depth` (1-based) and never runs the later ones; null = every block.")
    img_size: int | None = Field(None, ge=8, description="Probe resolution; null = the pre-training one.")
    head_init_std: float = Field(0.01, gt=0, description="Linear head weights ~ trunc_normal(std) (MoCo v3).")


class ProbeOptimConfig(NonfiniteGuard):
    """LARS on the head (no scaling and no weight decay for 1-D parameters)."""

    base_lr: float = Field(0.1, gt=0, description="The official --blr: lr = base_lr x global batch / lr_batch_divisor.")
    lr_batch_divisor: int = Field(256, ge=1, description="lr = base_lr * global_batch / this.")
    min_lr: float = Field(0.0, ge=0, description="Cosine floor (absolute).")
    weight_decay: float = Field(0.0, ge=0, description="LARS weight decay of the head's weight (official: 0).")
    momentum: float = Field(0.9, ge=0, lt=1, description="LARS momentum.")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient.")
    clip_grad: float | None = Field(None, gt=0, description="Max grad norm; null = no clipping (official).")


class ProbeScheduleConfig(EpochScheduleConfig):
    """Warm-up then cosine, per optimizer step, in epochs of the training set."""

    epochs: int = Field(90, ge=1, description="Probing epochs.")
    warmup_epochs: float = Field(10, ge=0, description="Linear warm-up epochs.")


class ProbeDataConfig(LabelledDataConfig):
    """Labelled training images (RandomResizedCrop + flip every step) and the held-out set."""

    eval_crop_pct: float = Field(0.875, gt=0, le=1, description="Eval: resize to size/crop_pct (bicubic), "
                                 "centre crop (official: 256 -> 224).")
    micro_batch_size: int = Field(1024, ge=1, description="Images per device per forward.")
    global_batch_size: int = Field(16384, ge=1, description="Images per optimizer step over all devices.")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop scale (official: "
                                            "torchvision's default).")


class LinprobeConfig(EpochJobTree):
    """A whole linear-probing run."""

    JOB = "linprobe"
    NO_COMPILE = "linear probing does not compile the frozen encoder (it runs eagerly)"
    mode: Literal["official", "cached_features"] = Field(
        "official", description="official: every step re-augments its images through the frozen encoder "
        "(the protocol; streams, resumable). cached_features: features of centre crops extracted once "
        "and the same head trained on them (fast yardstick for small data; no augmentation, the training "
        "set's features in memory, no checkpoints).")
    model: ProbeModelConfig = Field(default_factory=ProbeModelConfig, description="Probe.")
    optim: ProbeOptimConfig = Field(default_factory=ProbeOptimConfig, description="Optimizer.")
    schedule: ProbeScheduleConfig = Field(default_factory=ProbeScheduleConfig, description="Schedule.")
    data: ProbeDataConfig = Field(default_factory=ProbeDataConfig, description="Data.")


def load_linprobe_config(source: str | Path = "vit_base", overrides: list[str] | None = None) -> LinprobeConfig:
    """A linear-probing preset name (``bootmae_ds/presets/linprobe/``) or YAML path, plus overrides."""
    return load_tree(source, overrides, LinprobeConfig, PRESET_DIR)
