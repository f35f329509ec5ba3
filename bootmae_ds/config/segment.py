"""The semantic segmentation configuration: one validated pydantic tree, like the other jobs'.

    cfg = load_segment_config("ade20k_base", overrides=["init.source=runs/b800"])

Presets live in ``bootmae_ds/presets/segment/``. The defaults are the official
``Segmentation/configs/bootmae/BootMAE_Base_800_PT.py`` (UperNet on the ViT-B/16 at 512 px, ADE20K,
160k iterations of batch 16); ``tests/test_segment.py`` checks every value against that file's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import PRESETS_ROOT, Section, fail, load_tree
from .common import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    NonfiniteGuard,
    TransferJobTree,
)

PRESET_DIR = PRESETS_ROOT / "segment"


class SegmentorConfig(Section):
    """The backbone (the pre-trained ViT as a feature pyramid) and the UperNet + FCN heads."""

    num_classes: int = Field(150, ge=2, description="Classes (ADE20K: 150; labels 0..K-1, 255 ignored).")
    img_size: int = Field(512, ge=8, description="Training crop and sliding window side; the backbone's "
                          "position embedding and relative position tables are built for this grid.")
    out_indices: tuple[int, int, int, int] = Field(
        (3, 5, 7, 11), description="Blocks (0-based) whose tokens become the strides 4, 8, 16, 32 "
        "(official: blocks 4, 6, 8, 12 of 12).")
    drop_path: float = Field(0.1, ge=0, lt=1, description="Stochastic depth, linear over the blocks.")
    layer_scale: float | None = Field(1.0, gt=0, description="Layer scale init (gamma_1/2); null = none.")
    rel_pos_bias: bool = Field(True, description="A relative position bias table per block (zero at start).")
    channels: int = Field(768, ge=1, description="UperNet width (PPM, lateral and FPN convs, bottlenecks).")
    pool_scales: tuple[int, ...] = Field((1, 2, 3, 6), description="UperNet's pyramid pooling scales.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout2d before each head's classifier.")
    aux_head: bool = Field(True, description="The auxiliary FCN head (training only).")
    aux_in_index: int = Field(2, ge=0, le=3, description="Pyramid level the FCN head reads (2: stride 16).")
    aux_channels: int = Field(256, ge=1, description="FCN head width.")
    aux_num_convs: int = Field(1, ge=1, description="FCN head 3x3 convs.")
    aux_loss_weight: float = Field(0.4, ge=0, description="Weight of the auxiliary loss.")
    loss_average: Literal["all_pixels", "labelled_pixels"] = Field(
        "all_pixels", description="Cross-entropy mean over every pixel of the batch, ignored ones counting "
        "zero (mmseg 0.x, which the official run used), or over the labelled pixels only (mmseg >= 0.23's "
        "avg_non_ignore).")
    sync_bn: Literal["auto", "on", "off"] = Field(
        "auto", description="SyncBatchNorm across ranks: auto = on GPUs (official), off on CPU ranks, where "
        "torch's SyncBatchNorm does not run: each CPU rank normalises with its own micro-batch statistics "
        "and rank 0's running statistics are broadcast before every evaluation.")


class SegmentOptimConfig(NonfiniteGuard):
    """AdamW with the official constructor's layer-wise lr decay, gradient clipping."""

    lr: float = Field(4e-4, gt=0, description="Peak learning rate (the heads'; official 4e-4 at batch 16).")
    min_lr: float = Field(0.0, ge=0, description="Poly decay floor.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (see backbone_layer_decay_groups).")
    layer_decay: float = Field(0.65, gt=0, le=1, description="lr scale decay per layer from the heads down.")
    layer_decay_num_layers: int | None = Field(
        None, ge=1, description="num_layers of the official constructor; null = the encoder's depth (12).")
    clip_grad: float | None = Field(3.0, gt=0, description="Max global grad norm; null = none.")

    @property
    def base_lr(self) -> float:  # what runtime.optim.adamw reads
        return self.lr


class SegmentScheduleConfig(Section):
    """mmcv's iteration-based poly schedule with a linear warm-up."""

    iters: int = Field(160000, ge=1, description="Optimizer steps.")
    warmup_iters: int = Field(1500, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float = Field(1e-6, gt=0, le=1, description="lr factor at step 0 of the warm-up.")
    power: float = Field(1.0, gt=0, description="Poly power (1: linear decay to min_lr).")

    @model_validator(mode="after")
    def _check(self) -> SegmentScheduleConfig:
        if self.warmup_iters >= self.iters:
            fail("schedule.warmup_iters", self.warmup_iters, f"must be below schedule.iters={self.iters}")
        return self


class SegmentDataConfig(Section):
    """ADE20K-style data (a folder or segmentation shards) and the official augmentation."""

    train: str = Field("ADEChallengeData2016", description="Training data: an ADE20K-style root "
                       "(images/<split>, annotations/<split>), a manifest.json of segmentation shards "
                       "(data_prep/build_shards.py --segmentation), or 'demo'.")
    val: str = Field("ADEChallengeData2016", description="Evaluation data, as data.train, or 'demo'.")
    train_split: str = Field("training", description="Split folder of an ADE20K-style training root.")
    val_split: str = Field("validation", description="Split folder of an ADE20K-style evaluation root.")
    val_limit: int | None = Field(None, ge=1, description="Evaluate the first N images; null = all.")
    num_samples: int | None = Field(None, ge=1, description="Training images per epoch; null = all.")
    micro_batch_size: int = Field(2, ge=1, description="Images per device per forward (official 2).")
    global_batch_size: int = Field(16, ge=1, description="Images per step over all devices (official 2 x 8).")
    num_workers: int = Field(2, ge=0, description="Loader worker processes per rank (official 2).")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples each worker shuffles among.")
    shard_url_template: str | None = Field(None, description="How to open remote shards, with {name}.")
    cache_dir: str | None = Field(None, description="Where the demo set is built; null = ~/.cache/bootmae_ds.")
    reduce_zero_label: bool = Field(True, description="Label 0 ('other') -> ignored, the rest minus 1 (ADE20K).")
    ignore_index: int = Field(255, ge=0, description="Label value left out of loss and scores.")
    label_map: dict[int, int] = Field(default_factory=dict, description="Raw label value -> new value, "
                                      "applied before reduce_zero_label (mmseg's label_map: merge classes).")
    classes: list[str] | None = Field(None, description="Class names for the per-class tables; null = "
                                      "classes.txt beside the evaluation root when it has model.num_classes lines.")
    img_scale: tuple[int, int] = Field((2048, 512), description="Resize target (long, short) side bound, "
                                       "keeping the ratio (training: times a random ratio; evaluation: as is).")
    ratio_range: tuple[float, float] = Field((0.5, 2.0), description="Training scale ratio, uniform.")
    cat_max_ratio: float = Field(0.75, gt=0, le=1, description="Random crop: redraw (up to 10 times) while "
                                 "one class covers this share of the crop's labelled pixels or more.")
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    photometric: bool = Field(True, description="mmseg's PhotoMetricDistortion (brightness, contrast, "
                              "saturation, hue, each with probability 0.5).")
    mean: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="Normalisation mean in 0..1 "
                                             "units (official 127.5 of 255).")
    std: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="Normalisation std in 0..1 units.")

    grad_accum_steps = DataConfig.grad_accum_steps  # the same rule as every job's data section

    @model_validator(mode="after")
    def _check(self) -> SegmentDataConfig:
        if self.global_batch_size % self.micro_batch_size:
            fail("data.global_batch_size", self.global_batch_size,
                 f"must be a multiple of data.micro_batch_size={self.micro_batch_size}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            fail("data.ratio_range", self.ratio_range, "needs 0 < low <= high")
        if min(self.img_scale) < 1:
            fail("data.img_scale", self.img_scale, "sides must be positive")
        if any(not 0 <= k <= 255 or not 0 <= v <= 255 for k, v in self.label_map.items()):
            fail("data.label_map", self.label_map, "maps label values 0..255 to 0..255")
        return self


class SegmentEvalConfig(Section):
    """Sliding-window evaluation, single scale by default (the ``_ms_test`` config as an option)."""

    every_steps: int = Field(16000, ge=1, description="Evaluate (and checkpoint) every N steps and at the end.")
    stride: int = Field(341, ge=1, description="Sliding window stride (window: model.img_size).")
    ratios: list[float] = Field(default_factory=list, description="Multi-scale: the official _ms_test "
                                "ratios [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] (SETR resize: short side "
                                "max(img_size, ratio x scale short side)); empty = single scale.")
    flip: bool = Field(False, description="Also score the flipped image (probabilities averaged).")
    windows_per_forward: int = Field(8, ge=1, description="Sliding windows batched into one forward.")

    @model_validator(mode="after")
    def _check(self) -> SegmentEvalConfig:
        if any(r <= 0 for r in self.ratios):
            fail("eval.ratios", self.ratios, "must be positive")
        return self


class SegmentConfig(TransferJobTree):
    """A whole segmentation run."""

    JOB = "segment"
    model: SegmentorConfig = Field(default_factory=SegmentorConfig, description="Segmentor.")
    optim: SegmentOptimConfig = Field(default_factory=SegmentOptimConfig, description="Optimizer.")
    schedule: SegmentScheduleConfig = Field(default_factory=SegmentScheduleConfig, description="Schedule.")
    data: SegmentDataConfig = Field(default_factory=SegmentDataConfig, description="Data.")
    eval: SegmentEvalConfig = Field(default_factory=SegmentEvalConfig, description="Evaluation.")
    checkpoint: CheckpointConfig = Field(
        default_factory=lambda: CheckpointConfig(every_steps=16000), description="Saving.")
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig(every_steps=50), description="Logging.")

    @model_validator(mode="after")
    def _check(self) -> SegmentConfig:
        if self.eval.stride > self.model.img_size:
            fail("eval.stride", self.eval.stride, f"must not exceed the window model.img_size={self.model.img_size}")
        if sorted(self.model.out_indices) != list(self.model.out_indices) or min(self.model.out_indices) < 0:
            fail("model.out_indices", self.model.out_indices, "must be 4 non-decreasing block indices")
        return self


def load_segment_config(source: str | Path = "ade20k_base", overrides: list[str] | None = None) -> SegmentConfig:
    """A segmentation preset name (``bootmae_ds/presets/segment/``) or YAML path, plus overrides."""
    return load_tree(source, overrides, SegmentConfig, PRESET_DIR)
