"""The pre-training tree: model, masking, losses, teacher, optimizer, schedule, data, logging.

    cfg = load_config("vit_base_800ep", overrides=["optim.base_lr=1e-4", "model.depth=6"])

Presets live in ``bootmae_ds/presets/pretrain/``; ``vit_base_800ep`` (= the defaults) is the
official ViT-B/16 recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import PRESETS_ROOT, Section, available_presets, build_tree, fail, load_tree
from .common import DataConfig, JobTree, LoggingConfig, NonfiniteGuard

PRESET_DIR = PRESETS_ROOT / "pretrain"


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class DecoderConfig(Section):
    """One decoder: the pixel regressor or the feature predictor."""

    enabled: bool = Field(True, description="Build and train this decoder.")
    depth: int = Field(2, ge=1, description="Number of decoder blocks.")
    dim: int | None = Field(None, ge=8, description="Decoder width; null = encoder width.")
    num_heads: int | None = Field(
        None, ge=1, description="Attention heads; null = the encoder's head count (official)."
    )
    head_dim: int | None = Field(
        None, ge=1, description="Per-head width; null = dim // num_heads (official, may leave "
        "heads * head_dim below dim, e.g. 12 x 42 = 504 for the 512-wide regressor)."
    )
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / decoder width.")
    context: bool = Field(
        True, description="Cross-attend to encoder features (target-aware decoder). False = "
        "plain self-attention blocks, as MAE's decoder."
    )
    context_block: int = Field(
        0, description="Encoder block whose (un-normalised) output is the context; negative "
        "counts from the end (-1 = last block)."
    )
    pos_embed_visible: bool = Field(
        False, description="Also add the decoder position embedding to visible tokens (MAE). "
        "The official BootMAE adds it to mask tokens only."
    )


# timm's ViT sizes: width, depth, heads.
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


class ModelConfig(Section):
    """Encoder size and the two decoders."""

    size: Literal["tiny", "small", "base", "large", "huge"] | None = Field(
        None, description="Shorthand for embed_dim/depth/num_heads of timm's ViT-Ti/S/B/L/H; "
        "any of the three given explicitly wins (size then reads null)."
    )
    img_size: int = Field(224, ge=8, description="Input image side in pixels.")
    patch_size: int = Field(16, ge=1, description="Patch side in pixels.")
    in_chans: int = Field(3, ge=1, description="Input channels.")
    embed_dim: int = Field(768, ge=8, description="Encoder width D.")
    depth: int = Field(12, ge=1, description="Encoder blocks.")
    num_heads: int = Field(12, ge=1, description="Encoder attention heads.")
    mlp_ratio: float = Field(4.0, gt=0, description="Encoder MLP hidden width / D.")
    qkv_bias: bool = Field(True, description="BEiT-style q and v biases (no k bias).")
    norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon everywhere.")
    drop_path: float = Field(0.0, ge=0, lt=1, description="Stochastic depth rate (encoder).")
    pixel_decoder: DecoderConfig = Field(
        default_factory=lambda: DecoderConfig(dim=512, context_block=0),
        description="Pixel regressor (official: 2 blocks, 512 wide, context = block 0).",
    )
    feature_decoder: DecoderConfig = Field(
        default_factory=lambda: DecoderConfig(dim=None, context_block=-1),
        description="Feature predictor (official: 2 blocks, encoder width, context = last block).",
    )
    pixel_head_bias: Literal["per_channel", "per_value"] = Field(
        "per_channel", description="Bias of the pixel head: one per output channel (official "
        "ConvTranspose2d head) or one per predicted value (MAE's Linear decoder_pred)."
    )

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def resolve_block(self, index: int) -> int:
        """A (possibly negative) encoder block index as a non-negative one."""
        return index + self.depth if index < 0 else index

    @model_validator(mode="before")
    @classmethod
    def _apply_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("size") in ENCODER_SIZES:
            width, depth, heads = ENCODER_SIZES[data["size"]]
            data = {"embed_dim": width, "depth": depth, "num_heads": heads, **data}
            if (data["embed_dim"], data["depth"], data["num_heads"]) != (width, depth, heads):
                data["size"] = None  # explicit dims won: the name no longer describes the model
        return data

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.img_size % self.patch_size:
            fail("model.img_size", self.img_size,
                  f"must be divisible by model.patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            fail("model.embed_dim", self.embed_dim,
                  f"must be divisible by model.num_heads={self.num_heads}")
        if self.embed_dim % 4:
            fail("model.embed_dim", self.embed_dim, "must be divisible by 4 (2-D sin-cos)")
        if not self.pixel_decoder.enabled:
            fail("model.pixel_decoder.enabled", False, "the pixel branch is always trained")
        for name in ("pixel_decoder", "feature_decoder"):
            dec: DecoderConfig = getattr(self, name)
            idx = dec.context_block
            if not -self.depth <= idx < self.depth:
                fail(f"model.{name}.context_block", idx,
                      f"must index an encoder block: in [{-self.depth}, {self.depth - 1}]")
            dim = dec.dim or self.embed_dim
            heads = dec.num_heads or self.num_heads
            if (dec.head_dim or dim // heads) < 1:
                fail(f"model.{name}.num_heads", heads, f"gives head_dim 0 at width {dim}")
            if dim % 4:
                fail(f"model.{name}.dim", dim, "must be divisible by 4 (2-D sin-cos)")
        return self


# --------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------
class MaskConfig(Section):
    """Which patches are hidden from the encoder."""

    strategy: Literal["block", "random"] = Field(
        "block", description="'block' = BEiT block-wise + random top-up (BootMAE); 'random' = MAE."
    )
    num_masked: int = Field(147, ge=1, description="Masked patches per image (same for all).")
    block_budget: int = Field(120, ge=1, description="Patches covered by blocks before top-up.")
    min_block_patches: int = Field(16, ge=1, description="Smallest block area in patches.")
    max_block_patches: int = Field(60, ge=1, description="Largest block area in patches.")
    min_aspect: float = Field(0.3, gt=0, description="Smallest block aspect ratio.")
    max_aspect: float | None = Field(None, gt=0, description="Largest aspect; null = 1/min_aspect.")

    @model_validator(mode="after")
    def _check(self) -> "MaskConfig":
        if self.strategy == "block":
            if self.block_budget > self.num_masked:
                fail("mask.block_budget", self.block_budget,
                      f"must not exceed mask.num_masked={self.num_masked}")
            if self.min_block_patches > self.max_block_patches:
                fail("mask.min_block_patches", self.min_block_patches,
                      f"must not exceed mask.max_block_patches={self.max_block_patches}")
        if self.max_aspect is not None and self.max_aspect < self.min_aspect:
            fail("mask.max_aspect", self.max_aspect, f"must be >= mask.min_aspect={self.min_aspect}")
        return self


class LossConfig(Section):
    """Pixel and feature losses."""

    pixel_norm: Literal["per_channel", "per_patch", "none"] = Field(
        "per_channel", description="Pixel-target normalisation: each patch per channel (BootMAE),"
        " over the whole patch (MAE), or none."
    )
    pixel_norm_eps: float = Field(1e-5, gt=0, description="Added to the variance in the norm.")
    weighted_mask: bool = Field(
        True, description="Weight masked patch k by 1 + avgpool3x3(mask)_k (official --weight_mask)."
    )
    feature_weight: float = Field(1.0, ge=0, description="lambda, the feature-loss weight.")
    feature_ramp_fraction: float = Field(
        0.25, ge=0, le=1, description="lambda ramps linearly from 0 to full over this fraction "
        "of the epochs (official: 0.25); 0 = full weight from the start."
    )
    feature_norm_eps: float = Field(1e-6, gt=0, description="Eps of the affine-free LayerNorm.")


class MomentumConfig(Section):
    """The teacher that provides feature targets."""

    policy: Literal["ema", "frozen", "hard_copy", "ema_after_warmup"] = Field(
        "ema", description="ema (BootMAE); frozen teacher from a file; hard copy every K epochs "
        "(MAE-K); EMA that starts after a pixel-only warm-up."
    )
    start: float = Field(0.999, gt=0, lt=1, description="EMA momentum at epoch 0.")
    mid: float = Field(0.9999, gt=0, lt=1, description="Momentum reached at mid_epoch.")
    mid_epoch: int = Field(100, ge=1, description="Epoch where momentum reaches `mid`.")
    dynamic: bool = Field(True, description="Go on from `mid` to `end` by end_epoch (ViT-B).")
    end: float = Field(0.99999, gt=0, lt=1, description="Final momentum with `dynamic`.")
    end_epoch: int = Field(400, ge=1, description="Epoch where momentum reaches `end`.")
    target_dtype: Literal["bf16", "fp32"] = Field(
        "bf16", description="Dtype of the gathered target encoder (EMA state stays fp32)."
    )
    input_fraction: float = Field(
        1.0, gt=0, le=1, description="Fraction of patches (sampled among the masked) fed to the "
        "momentum encoder; the feature loss covers that subset (paper Table 5)."
    )
    teacher_path: str | None = Field(None, description="Exported encoder for policy=frozen.")
    copy_every_epochs: int = Field(1, ge=1, description="K of policy=hard_copy.")
    warmup_epochs: int = Field(0, ge=0, description="Pixel-only epochs of ema_after_warmup.")

    @model_validator(mode="after")
    def _check(self) -> "MomentumConfig":
        if self.mid_epoch > self.end_epoch and self.dynamic:
            fail("momentum.end_epoch", self.end_epoch,
                  f"must be >= momentum.mid_epoch={self.mid_epoch}")
        if self.policy == "frozen" and not self.teacher_path:
            fail("momentum.teacher_path", None, "is required when momentum.policy='frozen'")
        return self


class OptimConfig(NonfiniteGuard):
    """AdamW and the learning-rate numbers."""

    base_lr: float = Field(1.5e-4, gt=0, description="lr per 256 images; scaled by global/256.")
    min_lr: float = Field(1e-4, ge=0, description="Cosine floor (absolute, not scaled).")
    lr_batch_divisor: int = Field(256, ge=1, description="lr = base_lr * global_batch / this.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.05, ge=0, description="Weight decay at the start.")
    weight_decay_end: float | None = Field(None, ge=0, description="Cosine end; null = constant.")
    clip_grad: float | None = Field(None, gt=0, description="Max grad norm; null = no clipping.")

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if not all(0 <= b < 1 for b in self.betas):
            fail("optim.betas", self.betas, "each beta must be in [0, 1)")
        return self


class ScheduleConfig(Section):
    """Length of the run in epochs; schedules are pure functions of the global step."""

    epochs: int = Field(800, ge=1, description="Total pre-training epochs.")
    warmup_epochs: float = Field(40, ge=0, description="Linear lr warm-up epochs.")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Optimizer steps per epoch; null = dataset size // global batch."
    )

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        if self.warmup_epochs > self.epochs:
            fail("schedule.warmup_epochs", self.warmup_epochs,
                  f"must not exceed schedule.epochs={self.epochs}")
        return self


# --------------------------------------------------------------------------------------------
# data: one source, or a weighted mixture of several
# --------------------------------------------------------------------------------------------
class SourceEntry(Section):
    """One source of a mixture (``data.train`` as a list)."""

    source: str = Field(description="Any one-source data.train value: 'demo', 'synthetic', a "
                        "manifest.json, a shard URL list or an ImageFolder directory.")
    weight: float = Field(description="Share of every mixture epoch (weights are normalised).")
    name: str | None = Field(None, description="Name in metrics (samples_<name>); null = from "
                             "the source (its folder name).")
    num_samples: int | None = Field(None, ge=1, description="This source's size where it cannot "
                                    "be read off (synthetic, shard URLs without a manifest).")
    mean: tuple[float, float, float] | None = Field(None, description="Must equal data.mean if set "
                                                    "(one normalisation for the run).")
    std: tuple[float, float, float] | None = Field(None, description="Must equal data.std if set.")

    @property
    def label(self) -> str:
        return self.name or source_name(self.source)

    @property
    def identity(self) -> str:
        """What makes two entries the same data: the resolved path (synthetic: its name)."""
        if self.source == "synthetic":
            return f"synthetic:{self.label}"
        if self.source == "demo" or "://" in self.source or self.source.startswith("pipe:"):
            return self.source
        path = Path(self.source).expanduser().absolute()
        return str(path.parent if path.name == "manifest.json" else path)


def source_name(spec: str) -> str:
    """A metrics-safe name for a source: its folder's name (of a manifest or shards: the folder
    holding them), 'demo' or 'synthetic'."""
    if spec in ("demo", "synthetic"):
        return spec
    path = Path(spec.split("::")[0].removeprefix("pipe:").rstrip("/"))
    name = path.parent.name if path.suffix in (".json", ".tar") or "{" in path.name else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "source"


def check_mixture(entries: list[Any], mean: Any, std: Any) -> None:
    """One line naming the first bad entry of a ``data.train`` list, before any work."""
    if not entries:
        fail("data.train", entries, "an empty list; give one source or a list of {source, weight}")
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, raw in enumerate(entries):
        where = f"data.train[{i}]"
        if not isinstance(raw, dict) or "source" not in raw:
            fail(where, raw, "each entry needs a source and a weight, e.g. {source: /data/mine, weight: 0.3}")
        src = raw["source"]
        where += f" ({src!r})"
        if not isinstance(src, str) or not src.strip():
            fail(where, src, "an empty source; name 'demo', 'synthetic', a manifest.json, shard URLs or a folder")
        w = raw.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            fail(f"{where}.weight", w, "must be a positive number")
        entry = SourceEntry.model_validate(raw)
        for field, run in (("mean", mean), ("std", std)):
            own = getattr(entry, field)
            if own is not None and tuple(own) != tuple(run):
                fail(f"{where}.{field}", own, f"differs from data.{field}={tuple(run)}: one "
                     f"normalisation serves the whole run; drop it or set data.{field}")
        if entry.identity in seen:
            fail(where, src, f"the same source as data.train[{seen[entry.identity]}]; list it once "
                 f"(raise its weight instead)")
        seen[entry.identity] = i
        if entry.label in names or entry.label in ("per_s", "per_s_per_device") or entry.label.endswith("_total"):
            fail(f"{where}.name", entry.label, "a name another entry (or a metrics field) already "
                 "has; give the entries distinct `name`s")
        names[entry.label] = i


class PretrainDataConfig(DataConfig):
    """Where pre-training images come from (one source or a weighted mixture), batching and
    augmentation."""

    train: str | list[SourceEntry] = Field(  # type: ignore[assignment]
        "demo", description="'demo' (bundled digits shards), a manifest.json, a brace-expanded "
        "shard URL list, an ImageFolder directory, 'synthetic', or a list of {source, weight} "
        "mixed by weight (each source any of those kinds).")
    epoch_samples: int | None = Field(
        None, ge=1, description="Samples per epoch of a mixture (data.train a list); null = the sum "
        "of the sources' sizes. The schedules' epochs are these.")

    @model_validator(mode="before")
    @classmethod
    def _check_mixture(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("train"), list):
            check_mixture(data["train"], data.get("mean", (0.5, 0.5, 0.5)), data.get("std", (0.5, 0.5, 0.5)))
            if data.get("num_samples") is not None:
                fail("data.num_samples", data["num_samples"], "is for one source; with a list set "
                     "each entry's num_samples and data.epoch_samples for the epoch")
        elif isinstance(data, dict) and data.get("epoch_samples") is not None:
            fail("data.epoch_samples", data["epoch_samples"], "is for a list of sources; one source's "
                 "epoch is data.num_samples")
        return data

    @property
    def mixed(self) -> bool:
        return not isinstance(self.train, str)


# --------------------------------------------------------------------------------------------
# logging and the tree
# --------------------------------------------------------------------------------------------
class PretrainLoggingConfig(LoggingConfig):
    """Console, metrics.jsonl, TensorBoard, reconstruction previews and the k-NN monitor."""

    preview_every_steps: int = Field(1000, ge=1, description="Reconstruction grid every N steps.")
    knn_every_steps: int | None = Field(
        None, ge=1, description="k-NN accuracy of the online encoder every N steps (rank 0); null = off."
    )
    knn_bank: str = Field("demo", description="Labelled images of the k-NN bank (a data.train spec; "
                          "'demo' / 'demo-test' are the digits' splits).")
    knn_queries: str = Field("demo-test", description="Labelled images the k-NN monitor classifies.")
    knn_bank_limit: int | None = Field(10000, ge=1, description="First N bank images; null = all.")
    knn_query_limit: int | None = Field(5000, ge=1, description="First N query images; null = all.")
    knn_crop_pct: float = Field(0.875, gt=0, le=1, description="k-NN images: shorter side to img_size/crop_pct "
                                "(bicubic), centre crop; 1.0 keeps images of img_size whole.")


class PretrainInitConfig(Section):
    """The weights a new run starts from (continued pre-training). Read at the first start only:
    a resume continues from its checkpoint. The optimizer, step and schedules start fresh."""

    source: str = Field(
        "random", description="'random' (a fresh model), a released BootMAE .pth, an MAE .pth, a timm "
        "ViT state dict (.pth/.bin/.safetensors), one of our exports (its directory or model.safetensors) "
        "or a pre-training run directory (weights only)."
    )
    kind: Literal["auto", "bootmae", "mae", "timm", "run"] = Field(
        "auto", description="Layout of init.source; auto = recognised from its keys (the result is "
        "written to config.yaml)."
    )
    which: Literal["online", "momentum"] = Field(
        "online", description="Weights of the online model: a BootMAE file's 'model' or 'model_ema', a "
        "run's online or momentum encoder. The momentum encoder starts from the source's EMA encoder "
        "when it has one, else from a copy of the encoder."
    )
    tag: str | None = Field(None, description="Checkpoint tag of a run source; null = its latest.")
    decoders: bool = Field(
        True, description="Take the decoders the source holds (BootMAE's both, MAE's as the pixel "
        "regressor); false = the encoder only, the decoders start fresh."
    )
    sha256: str | None = Field(
        None, description="sha256 of the source file (of a run source's manifest.json); null = "
        "computed at start and written to config.yaml; given = the file must match it."
    )
    loaded: list[str] | None = Field(
        None, description="Written at start: the parts taken from the source (encoder, pixel_decoder, "
        "feature_decoder, momentum_encoder); the others started fresh."
    )

    @model_validator(mode="after")
    def _check(self) -> "PretrainInitConfig":
        if self.sha256 is not None and (len(self.sha256) != 64 or not all(
                c in "0123456789abcdef" for c in self.sha256.lower())):
            fail("init.sha256", self.sha256, "must be 64 hex digits (sha256sum's output) or null")
        return self


class BootMAEConfig(JobTree):
    """The whole run: every knob of model, method and infrastructure."""

    init: PretrainInitConfig = Field(default_factory=PretrainInitConfig, description="Initial weights.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Architecture.")
    mask: MaskConfig = Field(default_factory=MaskConfig, description="Masking.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Losses.")
    momentum: MomentumConfig = Field(default_factory=MomentumConfig, description="Teacher.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Schedules.")
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig, description="Data.")
    logging: PretrainLoggingConfig = Field(default_factory=PretrainLoggingConfig, description="Logging.")

    @model_validator(mode="after")
    def _check(self) -> "BootMAEConfig":
        n = self.model.num_patches
        if self.mask.num_masked >= n:
            fail("mask.num_masked", self.mask.num_masked,
                  f"must be below the {n} patches of a {self.model.img_size}px image "
                  f"with {self.model.patch_size}px patches")
        fd = self.model.feature_decoder
        if self.loss.feature_weight > 0 and not fd.enabled:
            fail("loss.feature_weight", self.loss.feature_weight,
                  "must be 0 when model.feature_decoder.enabled is false")
        if fd.enabled and self.loss.feature_weight == 0:
            fail("model.feature_decoder.enabled", True,
                  "has no loss when loss.feature_weight=0; disable it or give it a weight")
        return self

    @property
    def uses_teacher(self) -> bool:
        return self.model.feature_decoder.enabled

    def fingerprint(self) -> str:
        """Hash of the fields that define the model and method (not paths or logging)."""
        keep = {k: v for k, v in self.model_dump(mode="json").items()
                if k in ("model", "mask", "loss")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_presets() -> list[str]:
    return available_presets(PRESET_DIR)


def build_config(data: dict[str, Any]) -> BootMAEConfig:
    """Validate a plain dict into a ``BootMAEConfig`` or raise ``ConfigError``."""
    return build_tree(data, BootMAEConfig)


def load_config(source: str | Path = "vit_base_800ep", overrides: list[str] | None = None) -> BootMAEConfig:
    """Load a pre-training preset name or YAML path, apply dotted overrides, validate."""
    return load_tree(source, overrides, BootMAEConfig, PRESET_DIR)
