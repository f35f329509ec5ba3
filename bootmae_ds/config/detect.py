"""The detection configuration: Mask R-CNN + FPN on the pre-trained ViT, one validated tree.

    cfg = load_detect_config("coco_base", overrides=["init.source=runs/b800", "data.root=/data/coco"])

Presets live in ``bootmae_ds/presets/detect/``; ``coco_base`` (= the defaults) is the paper's
appendix ("COCO Object Detection and Instance Segmentation"): Mask R-CNN with FPN on the ViT-B/16's
blocks 4, 6, 8, 12 turned into strides 4, 8, 16, 32; single scale, shorter side 800, longer at
most 1333; 12 epochs ("1x"), lr x0.1 after epochs 8 and 11; AdamW lr 4e-4, weight decay 0.05,
batch 16; layer-wise lr decay 0.75; drop path 0.1. What the appendix leaves open is
mmdetection's Mask R-CNN (the implementation the paper names), where torchvision lets us set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import PRESETS_ROOT, Section, fail, load_tree
from .common import EpochJobTree, NonfiniteGuard, accumulation_steps

PRESET_DIR = PRESETS_ROOT / "detect"


class RpnConfig(Section):
    """The region proposal network (torchvision's, with mmdetection's Mask R-CNN numbers)."""

    pre_nms_top_n_train: int = Field(2000, ge=1, description="Proposals kept per pyramid level before NMS, training.")
    pre_nms_top_n_test: int = Field(1000, ge=1, description="Proposals kept per pyramid level before NMS, testing.")
    post_nms_top_n_train: int = Field(
        1000, ge=1, description="Proposals kept per image after NMS, training (mmdetection: 1000; "
        "torchvision's default 2000).")
    post_nms_top_n_test: int = Field(1000, ge=1, description="Proposals kept per image after NMS, testing.")
    nms_thresh: float = Field(0.7, gt=0, le=1, description="NMS IoU threshold of the proposals.")
    fg_iou_thresh: float = Field(0.7, gt=0, le=1, description="Anchors at or above this IoU are positives.")
    bg_iou_thresh: float = Field(0.3, ge=0, le=1, description="Anchors below this IoU are negatives.")
    batch_size_per_image: int = Field(256, ge=1, description="Anchors sampled per image for the RPN loss.")
    positive_fraction: float = Field(0.5, gt=0, le=1, description="Largest share of positives among them.")


class RoiConfig(Section):
    """The box and mask heads on RoIAlign features (torchvision's, mmdetection's numbers)."""

    batch_size_per_image: int = Field(512, ge=1, description="Proposals sampled per image for the box loss.")
    positive_fraction: float = Field(0.25, gt=0, le=1, description="Largest share of positives among them.")
    fg_iou_thresh: float = Field(0.5, gt=0, le=1, description="Proposals at or above this IoU are positives.")
    bg_iou_thresh: float = Field(0.5, ge=0, le=1, description="Proposals below this IoU are background.")
    box_head_dim: int = Field(1024, ge=1, description="Width of the two fully connected layers of the box head.")
    mask_head_channels: int = Field(256, ge=1, description="Channels of the mask head's four 3x3 convolutions.")
    score_thresh: float = Field(0.05, ge=0, lt=1, description="Detections below this score are dropped.")
    nms_thresh: float = Field(0.5, gt=0, le=1, description="Per-class NMS IoU threshold of the detections.")
    detections_per_image: int = Field(100, ge=1, description="Detections kept per image (COCO scores 100).")
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="Mask probability at which a pixel is inside.")


class DetectorConfig(Section):
    """The ViT backbone turned into a pyramid, the FPN and Mask R-CNN's heads."""

    num_classes: int | None = Field(
        None, ge=1, description="Object classes without the background; null = the categories of the "
        "training json (80 for COCO).")
    out_indices: tuple[int, int, int, int] = Field(
        (3, 5, 7, 11), description="Blocks (0-based) whose tokens become the strides 4, 8, 16, 32 (the paper: "
        "blocks 4, 6, 8, 12 of 12); non-decreasing, so an encoder of fewer than 4 blocks can repeat one.")
    drop_path: float = Field(0.1, ge=0, lt=1, description="Stochastic depth rate of the backbone, linear over blocks.")
    layer_scale: float | None = Field(1.0, gt=0, description="Layer scale init (gamma_1/2) of the backbone "
                                      "blocks, as the segmentation backbone; null = none.")
    rel_pos_bias: bool = Field(
        True, description="A relative position bias table per block (zero at start) for the pre-training grid "
        "(14x14 for ViT-B/16 at 224); farther offsets share the bias of the farthest offset it holds.")
    sync_bn: Literal["auto", "on", "off"] = Field(
        "auto", description="SyncBatchNorm in the backbone's stride-4 branch (patch 16): auto = on GPUs; CPU "
        "ranks (where torch's SyncBatchNorm does not run) use their own batch statistics, and rank 0's "
        "running statistics are broadcast before every evaluation.")
    fpn_channels: int = Field(256, ge=1, description="Channels of every FPN level (and of the RPN head).")
    anchor_scale: float = Field(
        8.0, gt=0, description="Anchor side at ratio 1 = anchor_scale x the level's stride (mmdetection's "
        "scales=[8]: 32 .. 512 px on strides 4 .. 64).")
    anchor_ratios: tuple[float, ...] = Field((0.5, 1.0, 2.0), description="Anchor aspect ratios (h/w).")
    rpn: RpnConfig = Field(default_factory=RpnConfig, description="Region proposals.")
    roi: RoiConfig = Field(default_factory=RoiConfig, description="Box and mask heads.")

    @model_validator(mode="after")
    def _check(self) -> DetectorConfig:
        if list(self.out_indices) != sorted(self.out_indices) or min(self.out_indices) < 0:
            fail("model.out_indices", self.out_indices, "must be 4 non-decreasing 0-based block indices")
        if not self.anchor_ratios or any(r <= 0 for r in self.anchor_ratios):
            fail("model.anchor_ratios", self.anchor_ratios, "must be positive ratios")
        if self.rpn.bg_iou_thresh > self.rpn.fg_iou_thresh:
            fail("model.rpn.bg_iou_thresh", self.rpn.bg_iou_thresh, "must not exceed model.rpn.fg_iou_thresh")
        if self.roi.bg_iou_thresh > self.roi.fg_iou_thresh:
            fail("model.roi.bg_iou_thresh", self.roi.bg_iou_thresh, "must not exceed model.roi.fg_iou_thresh")
        return self


class DetectDataConfig(Section):
    """COCO as distributed (or the demo set in the same layout), sizes and batches."""

    root: str = Field(
        "demo", description="'demo' (the digits-on-canvas set, built on first use) or a COCO directory "
        "holding {train,val} image folders and annotations/instances_<split>.json.")
    train: str = Field("train2017", min_length=1, description="Training split: images in ROOT/<train>/, "
                       "annotations in ROOT/annotations/instances_<train>.json.")
    val: str = Field("val2017", min_length=1, description="Evaluation split, the same layout.")
    min_size: int = Field(800, ge=8, description="Shorter image side after resizing (single scale).")
    max_size: int = Field(1333, ge=8, description="Longer side at most this after resizing.")
    size_divisible: int = Field(
        32, ge=1, description="Batches are padded to a multiple of this (the coarsest pyramid stride, as "
        "mmdetection's size_divisor=32; it must be a multiple of the patch size).")
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability (image, boxes and masks).")
    group_by_aspect: bool = Field(
        True, description="Micro-batches hold images of one orientation (landscape or portrait), as "
        "mmdetection's GroupSampler: less padding.")
    micro_batch_size: int = Field(2, ge=1, description="Images per device per forward (the paper: 2 x 8 GPUs).")
    global_batch_size: int = Field(16, ge=1, description="Images per optimizer step over all devices.")
    eval_batch_size: int = Field(
        1, ge=1, description="Images per device per evaluation forward. 1 (mmdetection's default) keeps "
        "every image's score independent of its batch mates: attention also sees the padding.")
    val_limit: int | None = Field(None, ge=1, description="Evaluate on the first N images (by id); null = all.")
    num_workers: int = Field(4, ge=0, description="Loader worker processes per rank.")
    mean: tuple[float, float, float] | None = Field(None, description="Normalisation mean; null = the pre-training run's.")
    std: tuple[float, float, float] | None = Field(None, description="Normalisation std; null = the pre-training run's.")
    cache_dir: str | None = Field(None, description="Where the demo set is built; null = ~/.cache/bootmae_ds.")

    @model_validator(mode="after")
    def _check(self) -> DetectDataConfig:
        if self.min_size > self.max_size:
            fail("data.min_size", self.min_size, f"must not exceed data.max_size={self.max_size}")
        if self.global_batch_size % self.micro_batch_size:
            fail("data.global_batch_size", self.global_batch_size,
                 f"must be a multiple of data.micro_batch_size={self.micro_batch_size}")
        if self.std is not None and any(s <= 0 for s in self.std):
            fail("data.std", self.std, "every std must be positive")
        return self

    def grad_accum_steps(self, world_size: int) -> int:
        """Accumulation steps for ``world_size`` ranks; raises if the batch does not divide."""
        return accumulation_steps(self.global_batch_size, self.micro_batch_size, world_size)


class DetectOptimConfig(NonfiniteGuard):
    """AdamW with layer-wise lr decay over the backbone (the heads at the full lr)."""

    lr: float = Field(4e-4, gt=0, description="Peak lr at data.global_batch_size (the paper: 4e-4 at 16); "
                      "absolute, as mmdetection's: scale it yourself if you change the batch.")
    layer_decay: float = Field(0.75, gt=0, le=1, description="lr scale decay per backbone block from the top down.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms, biases, tokens, "
                                "position embeddings and tables).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (mmdetection's AdamW default).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    clip_grad: float | None = Field(None, gt=0, description="Max grad norm; null = no clipping (the paper names none).")

    @property
    def base_lr(self) -> float:  # what runtime.optim.adamw reads as the initial lr
        return self.lr


class DetectScheduleConfig(Section):
    """mmdetection's "1x": linear warm-up, then the lr drops by ``decay_factor`` after each epoch of
    ``decay_epochs``."""

    epochs: int = Field(12, ge=1, description="Training epochs (1x = 12).")
    decay_epochs: list[int] = Field(default_factory=lambda: [8, 11], description="After these epochs "
                                    "the lr is multiplied by decay_factor.")
    decay_factor: float = Field(0.1, gt=0, le=1, description="lr factor at each of decay_epochs.")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps (mmdetection's 1x schedule; the "
                              "paper names none).")
    warmup_ratio: float = Field(0.001, gt=0, le=1, description="The warm-up starts at this fraction of the lr.")
    steps_per_epoch: int | None = Field(None, ge=1, description="null = from the training set size.")

    @model_validator(mode="after")
    def _check(self) -> DetectScheduleConfig:
        if sorted(self.decay_epochs) != self.decay_epochs or any(not 0 < e < self.epochs for e in self.decay_epochs):
            fail("schedule.decay_epochs", self.decay_epochs,
                 f"must be increasing epochs between 1 and schedule.epochs-1={self.epochs - 1}")
        return self


class DetectConfig(EpochJobTree):
    """A whole detection (Mask R-CNN) run."""

    JOB = "detect"
    # variable image sizes would recompile every shape
    NO_COMPILE = "detection does not compile the model (every image size would recompile)"
    model: DetectorConfig = Field(default_factory=DetectorConfig, description="Detector.")
    optim: DetectOptimConfig = Field(default_factory=DetectOptimConfig, description="Optimizer.")
    schedule: DetectScheduleConfig = Field(default_factory=DetectScheduleConfig, description="Schedule.")
    data: DetectDataConfig = Field(default_factory=DetectDataConfig, description="Data.")


def load_detect_config(source: str | Path = "coco_base", overrides: list[str] | None = None) -> DetectConfig:
    """A detection preset name (``bootmae_ds/presets/detect/``) or YAML path, plus overrides."""
    return load_tree(source, overrides, DetectConfig, PRESET_DIR)
