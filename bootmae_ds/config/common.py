"""Sections shared by every job's tree: data, checkpoints, run identity."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .base import ConfigError, Section, Tree, fail


class DataConfig(Section):
    """Where images come from and how they are batched and augmented."""

    train: str = Field(
        "demo", description="'demo' (bundled digits shards), a manifest.json, a brace-expanded "
        "shard URL list, an ImageFolder directory, or 'synthetic'."
    )
    num_samples: int | None = Field(
        None, ge=1, description="Training images per epoch; null = from the manifest."
    )
    micro_batch_size: int = Field(256, ge=1, description="Images per device per forward.")
    global_batch_size: int = Field(
        4096, ge=1, description="Images per optimizer step over all devices; must equal "
        "micro_batch_size x world_size x gradient accumulation."
    )
    num_workers: int = Field(10, ge=0, description="Loader worker processes per rank.")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop scale.")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop ratio.")
    interpolation: Literal["bicubic", "bilinear"] = Field("bicubic", description="Resize filter.")
    hflip: bool = Field(True, description="Random horizontal flip.")
    mean: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="Normalisation mean.")
    std: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="Normalisation std.")
    cache_dir: str | None = Field(None, description="Where the demo shards are built; null = "
                                  "~/.cache/bootmae_ds.")
    shuffle_buffer: int = Field(
        1000, ge=1, description="Raw (encoded) samples each loader worker holds to shuffle its "
        "stream; the sample order within a worker's share is a buffered shuffle of this size."
    )
    shard_url_template: str | None = Field(
        None, description="How to open the shards a manifest lists, with {name} the shard file "
        "name, e.g. 'pipe:aws s3 cp s3://bucket/train/{name} -'; null = beside the manifest."
    )

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            fail("data.crop_scale", self.crop_scale, "needs 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            fail("data.crop_ratio", self.crop_ratio, "needs 0 < low <= high")
        if self.std is not None and any(s <= 0 for s in self.std):  # None: fine-tuning inherits it
            fail("data.std", self.std, "every std must be positive")
        if self.shard_url_template is not None and "{name}" not in self.shard_url_template:
            fail("data.shard_url_template", self.shard_url_template, "must contain {name}")
        if self.global_batch_size % self.micro_batch_size:
            fail("data.global_batch_size", self.global_batch_size,
                  f"must be a multiple of data.micro_batch_size={self.micro_batch_size}")
        return self

    def grad_accum_steps(self, world_size: int) -> int:
        """Accumulation steps for ``world_size`` ranks; raises if the batch does not divide."""
        return accumulation_steps(self.global_batch_size, self.micro_batch_size, world_size)


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """``data.global_batch_size / (data.micro_batch_size x world_size)``, or a ``ConfigError``
    naming both fields when it does not divide (every job's data section asks this)."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"data.global_batch_size={global_batch}: must be a multiple of "
            f"data.micro_batch_size x world_size = {micro_batch} x {world_size}; "
            f"set data.global_batch_size or data.micro_batch_size to fit {world_size} ranks"
        )
    return global_batch // per_step


class LabelledDataConfig(DataConfig):
    """Labelled training images (shards with labels, or an ImageFolder) and the held-out set, for
    the jobs that classify (fine-tuning, probing)."""

    val: str = Field("demo-test", description="Labelled evaluation images: 'demo-test', a manifest.json, "
                     "a shard URL list or an ImageFolder directory.")
    val_limit: int | None = Field(None, ge=1, description="Evaluate on the first N images; null = all.")
    eval_batch_size: int = Field(256, ge=1, description="Images per device per evaluation forward.")
    mean: tuple[float, float, float] | None = Field(  # type: ignore[assignment]
        None, description="Normalisation mean; null = the pre-training run's.")
    std: tuple[float, float, float] | None = Field(  # type: ignore[assignment]
        None, description="Normalisation std; null = the pre-training run's.")


class EpochScheduleConfig(Section):
    """A schedule in epochs of the training set with a linear warm-up (fine-tuning, probing: each
    sets its own lengths)."""

    epochs: int = Field(100, ge=1, description="Training epochs.")
    warmup_epochs: float = Field(20, ge=0, description="Linear warm-up epochs.")
    steps_per_epoch: int | None = Field(None, ge=1, description="null = from the training set size.")

    @model_validator(mode="after")
    def _check(self) -> EpochScheduleConfig:
        if self.warmup_epochs >= self.epochs:
            fail("schedule.warmup_epochs", self.warmup_epochs, f"must be below schedule.epochs={self.epochs}")
        return self


class EvalConfig(Section):
    """When the held-out set is evaluated."""

    every_epochs: int = Field(1, ge=1, description="Evaluate (and checkpoint) every N epochs and at the end.")


class CheckpointConfig(Section):
    """When and where checkpoints are written."""

    every_steps: int = Field(1000, ge=1, description="Save every N optimizer steps (and at end).")
    keep_last: int = Field(3, ge=1, description="Complete checkpoints kept; older are removed.")
    dir: str | None = Field(None, description="Checkpoint directory; null = RUN/checkpoints.")
    allow_resize: bool = Field(
        False, description="Resume a checkpoint saved by another world size through DeepSpeed's "
        "universal format; the data stream restarts at the next epoch boundary."
    )


class RunConfig(Section):
    """Identity, precision and reproducibility of the run."""

    name: str | None = Field(None, min_length=1, description="Run name, printed with each rank's start-up line "
                             "and given to the trackers; null = the job's name (bootmae, finetune, linprobe, "
                             "segment, detect).")
    seed: int = Field(0, ge=0, description="Seed of everything random.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU."
    )
    compile: bool = Field(
        False, description="torch.compile the model (in place; checkpoints are unchanged). The first "
        "step then takes a minute or more to compile; off by default as it does not pay on CPU."
    )
    activation_checkpointing: bool = Field(False, description="Recompute encoder blocks.")
    deterministic: bool = Field(
        False, description="Deterministic kernels on GPUs (torch.use_deterministic_algorithms, no cuDNN "
        "autotuning, attention through the math SDPA backend instead of flash/cuDNN, whose backward "
        "is not deterministic): a resumed run then repeats an uninterrupted one bit for bit on the "
        "same GPUs and software, slower (attention most). An op with no deterministic kernel warns "
        "once, naming itself, and runs. CPU runs are deterministic anyway."
    )


class NonfiniteGuard(Section):
    """What a run does about non-finite losses and loss spikes (the optimizer sections of every
    job extend it)."""

    max_skipped_in_row: int = Field(
        10, ge=1, description="Non-finite steps in a row (skipped by DeepSpeed) before on_nonfinite acts."
    )
    on_nonfinite: Literal["stop", "rewind"] = Field(
        "stop", description="stop: exit with status 3, the last checkpoint intact. rewind: reload the "
        "newest complete checkpoint, move the data stream past the window that failed, go on."
    )
    max_rewinds: int = Field(3, ge=0, description="Rewinds allowed in one run; one more stops it (status 3).")
    spike_factor: float | None = Field(
        3.0, gt=1, description="Warn (and mark metrics.jsonl) when a step's loss exceeds this many times "
        "the running median; null = off."
    )
    spike_window: int = Field(100, ge=5, description="Steps in the running median of the spike detector.")


class DebugConfig(Section):
    """Fault injection for tests and drills; empty in real runs."""

    nan_steps: list[int] = Field(
        default_factory=list, description="Optimizer steps (0-based) whose inputs are replaced by NaN, on "
        "the data they consume in an uninterrupted run: after a rewind the stream has moved past them."
    )
    slow_save_s: float = Field(
        0.0, ge=0, description="Pause each checkpoint save this long between DeepSpeed's files and "
        "ours (a window in which kill drills leave a half-written checkpoint)."
    )


TRACKERS = ("tensorboard", "wandb", "mlflow", "csv")


class LoggingConfig(Section):
    """Console, metrics.jsonl and experiment trackers (every job; pre-training adds its monitors)."""

    every_steps: int = Field(10, ge=1, description="Console/TensorBoard scalars every N steps.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "csv"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Where rank 0 also logs (beside "
        "metrics.jsonl): tensorboard (RUN/tensorboard), wandb (WANDB_* env; pip install -e '.[wandb]'), "
        "mlflow (MLFLOW_TRACKING_URI, else RUN/mlruns; '.[mlflow]'), csv (RUN/metrics.csv)."
    )
    project: str = Field("bootmae-ds", min_length=1, description="wandb project / MLflow experiment name.")
    peak_tflops: float | None = Field(
        None, gt=0, description="Device matmul peak for MFU; null = known GPU table or none."
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate_tensorboard(cls, data: Any) -> Any:
        """Configs written before ``trackers`` existed say ``tensorboard: true|false``."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            on = data.pop("tensorboard")
            if not isinstance(on, bool):
                fail("logging.tensorboard", on, "must be true or false (better: list it in logging.trackers)")
            trackers = [t for t in data.get("trackers", ["tensorboard"]) if t != "tensorboard"]
            data["trackers"] = (["tensorboard"] if on else []) + trackers
        return data

    @model_validator(mode="after")
    def _check_trackers(self) -> "LoggingConfig":
        if len(set(self.trackers)) != len(self.trackers):
            fail("logging.trackers", self.trackers, "lists a tracker twice")
        return self


class InitConfig(Section):
    """Which pre-trained encoder a job starts from."""

    source: str = Field(
        "random", description="A pre-training run directory (its latest or --tag checkpoint), a "
        "released BootMAE_*_PT.pth, or 'random' (a fresh encoder of init.config). Segmentation and "
        "detection also take an MAE or timm ViT state dict, or an export (its directory or "
        "model.safetensors).")
    tag: str | None = Field(None, description="Checkpoint tag of a run source; null = latest.")
    which: Literal["online", "momentum"] = Field(
        "online", description="Online encoder, or the momentum encoder (fp32 EMA shards / model_ema).")
    arch: Literal["base", "large"] = Field("base", description="Architecture of an official .pth source.")
    config: str = Field("vit_base_800ep", description="Pre-training preset or YAML giving the "
                        "architecture of source=random.")


def inherit_from_pretraining(cfg: Any, pre: Any) -> None:
    """Fill what a fine-tuning or probing config leaves to its pre-training run (``model.img_size``,
    ``data.mean``, ``data.std`` set to null) from that run's config ``pre``."""
    if cfg.model.img_size is None:
        cfg.model.img_size = pre.model.img_size
    if cfg.data.mean is None:
        cfg.data.mean = pre.data.mean
    if cfg.data.std is None:
        cfg.data.std = pre.data.std


class JobTree(Tree):
    """The sections every job's tree ends with, declared once: a job's tree adds its own sections
    before them (``Tree.to_yaml`` keeps these last) and redeclares one only where its job's default
    differs (segmentation's step cadences). ``JOB`` names the run when ``run.name`` is null;
    ``NO_COMPILE`` says why a job refuses ``run.compile`` (None: it compiles)."""

    JOB: ClassVar[str] = "bootmae"
    NO_COMPILE: ClassVar[str | None] = None

    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Saving.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity.")
    debug: DebugConfig = Field(default_factory=DebugConfig, description="Fault injection (tests, drills).")

    @model_validator(mode="after")
    def _job_defaults(self) -> JobTree:
        if self.run.name is None:
            self.run.name = self.JOB
        if self.run.compile and self.NO_COMPILE:  # a silent no-op would mislead
            fail("run.compile", True, f"{self.NO_COMPILE}; set it false")
        return self


class TransferJobTree(JobTree):
    """A job that starts from a pre-trained encoder (fine-tuning, probing, segmentation, detection)."""

    init: InitConfig = Field(default_factory=InitConfig, description="Pre-trained encoder.")


class EpochJobTree(TransferJobTree):
    """A transfer job evaluated on a held-out set every ``eval.every_epochs`` (fine-tuning, probing,
    detection)."""

    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")

