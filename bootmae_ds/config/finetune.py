"""The fine-tuning configuration: one validated pydantic tree, like pre-training's.

    cfg = load_finetune_config("vit_base", overrides=["init.source=runs/b800", "model.num_classes=100"])

Presets live in ``bootmae_ds/presets/finetune/``; ``vit_base`` (= the defaults) is the official
ViT-B command (``scripts/finetune/bash_fine_BootMAE_Base_800.sh``): batch 2048, lr 5e-3, layer
decay 0.6, 20 warm-up of 100 epochs, drop path 0.1, weight decay 0.05, mixup 0.8, cutmix 1.0,
label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, model EMA 0.9998,
mean-pooled tokens + a fresh LayerNorm + linear head, position embedding frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import PRESETS_ROOT, Section, fail, load_tree
from .common import EpochJobTree, EpochScheduleConfig, LabelledDataConfig, NonfiniteGuard

PRESET_DIR = PRESETS_ROOT / "finetune"


class ClassifierConfig(Section):
    """The classifier on top of the encoder."""

    num_classes: int = Field(1000, ge=2, description="Output classes (labels must lie in 0..K-1).")
    img_size: int | None = Field(
        None, ge=8, description="Fine-tuning resolution; null = the pre-training one. Another size "
        "resamples the position embedding (bicubic).")
    drop_path: float = Field(0.1, ge=0, lt=1, description="Stochastic depth rate, linear over blocks.")
    head_init_scale: float = Field(0.001, gt=0, description="Head weights ~ trunc_normal(0.02) x this.")
    train_pos_embed: bool = Field(
        False, description="Fine-tune the position embedding. Official: no (the fine-tuning model "
        "rebuilds the fixed sin-cos table with requires_grad=False); true trains it.")
    fc_norm: Literal["fresh", "encoder"] = Field(
        "fresh", description="LayerNorm of the pooled tokens: 'fresh' (weight 1, bias 0: the official "
        "model does not load the pre-trained final norm) or 'encoder' (start from the encoder's final norm).")


class AugmentConfig(Section):
    """Training augmentation (timm's transform factory, Mixup/CutMix and RandomErasing)."""

    auto_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm auto-augment spec; null = off.")
    color_jitter: float | None = Field(0.4, ge=0, description="Used only when auto_augment is off.")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop scale.")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop ratio.")
    interpolation: Literal["bicubic", "bilinear"] = Field("bicubic", description="Resize filter.")
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    reprob: float = Field(0.25, ge=0, le=1, description="Random erasing probability (on the device).")
    remode: Literal["pixel", "rand", "const"] = Field("pixel", description="Random erasing fill.")
    recount: int = Field(1, ge=1, description="Random erasing boxes per image.")
    mixup: float = Field(0.8, ge=0, description="Mixup alpha; 0 = off.")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha; 0 = off.")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="Probability of mixing a batch.")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="Probability of CutMix when both are on.")
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="timm Mixup mode.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing.")
    eval_crop_pct: float = Field(0.875, gt=0, le=1, description="Eval: resize to size/crop_pct, centre crop.")

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


class FinetuneOptimConfig(NonfiniteGuard):
    """AdamW with layer-wise lr decay."""

    base_lr: float = Field(6.25e-4, gt=0, description="lr per 256 images (6.25e-4 x 2048/256 = 5e-3).")
    lr_batch_divisor: int = Field(256, ge=1, description="lr = base_lr * global_batch / this.")
    min_lr: float = Field(1e-6, ge=0, description="Cosine floor (absolute).")
    layer_decay: float = Field(0.6, gt=0, le=1, description="lr scale decay per block from the head down.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms, biases, tokens).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    clip_grad: float | None = Field(None, gt=0, description="Max grad norm; null = no clipping.")
    max_skipped_in_row: int = Field(
        20, ge=1, description="Non-finite steps in a row (skipped by DeepSpeed) before on_nonfinite acts.")


class FinetuneScheduleConfig(EpochScheduleConfig):
    """Cosine lr with linear warm-up, in epochs of the training set."""

    epochs: int = Field(100, ge=1, description="Fine-tuning epochs.")
    warmup_epochs: float = Field(20, ge=0, description="Linear warm-up epochs.")


class ModelEmaConfig(Section):
    """An EMA of the whole classifier, kept as sharded fp32 like the momentum encoder."""

    enabled: bool = Field(True, description="Keep and evaluate a model EMA.")
    decay: float = Field(0.9998, gt=0, lt=1, description="EMA decay per optimizer step.")


class FinetuneDataConfig(LabelledDataConfig):
    """Labelled training images and the evaluation set, at the official fine-tuning batch."""

    micro_batch_size: int = Field(256, ge=1, description="Images per device per forward (official: 256).")
    global_batch_size: int = Field(2048, ge=1, description="Images per optimizer step over all devices.")


class FinetuneConfig(EpochJobTree):
    """A whole fine-tuning run."""

    JOB = "finetune"
    model: ClassifierConfig = Field(default_factory=ClassifierConfig, description="Classifier.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation.")
    optim: FinetuneOptimConfig = Field(default_factory=FinetuneOptimConfig, description="Optimizer.")
    schedule: FinetuneScheduleConfig = Field(default_factory=FinetuneScheduleConfig, description="Schedule.")
    ema: ModelEmaConfig = Field(default_factory=ModelEmaConfig, description="Model EMA.")
    data: FinetuneDataConfig = Field(default_factory=FinetuneDataConfig, description="Data.")

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.augment.mixes and self.data.micro_batch_size % 2:
            fail("data.micro_batch_size", self.data.micro_batch_size,
                  "must be even when mixup/cutmix is on (timm mixes a batch with its flip)")
        return self


def load_finetune_config(source: str | Path = "vit_base", overrides: list[str] | None = None) -> FinetuneConfig:
    """A fine-tuning preset name (``bootmae_ds/presets/finetune/``) or YAML path, plus overrides."""
    return load_tree(source, overrides, FinetuneConfig, PRESET_DIR)
