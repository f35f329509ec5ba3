"""The pre-training loop: build, resume, loop, log, checkpoint.

One process per device; the same code runs on CPU ranks (gloo) and GPUs (NCCL), chosen by
DeepSpeed's accelerator. Exit statuses: 0 finished, 75 preempted after a checkpoint
(requeue me), 3 stopped on non-finite losses (last good checkpoint left intact).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import psutil
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import BootMAEConfig
from .data import build_train_loader
from .dist import DistInfo, init_distributed
from .ds_config import build_ds_config, resolve_precision
from .losses import feature_loss, pixel_loss
from .metrics import MetricsLogger, device_peak_tflops, flops_per_image, training_flops_per_image
from .models import BootMAE, build_model, mask_to_ids
from .momentum import ShardedMomentumEncoder
from .optim import build_optimizer, set_hyperparameters
from .preview import reconstruction_grid
from .schedules import Schedules

EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class RunState:
    """Everything besides weights that a resume needs (saved in every checkpoint)."""

    step: int = 0
    samples: int = 0
    data: dict[str, Any] | None = None
    skipped_total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepStats:
    """Sums over the micro-batches of one optimizer step."""

    loss: float = 0.0
    pixel: float = 0.0
    feature: float = 0.0
    corrupt: int = 0
    data_wait: float = 0.0
    ema: float = 0.0
    micro: int = 0
    last: dict[str, torch.Tensor] = field(default_factory=dict)


class Preemption:
    """Turns SIGTERM / SIGUSR1 into a flag the loop checks at the end of each step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        print(f"received signal {signum}: saving a checkpoint after this step", flush=True)
        self.requested = True


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def stop_status(trainer: Any, skipped_in_row: int) -> int | None:
    """The exit status when a trainer must stop after this step, else None: EXIT_NONFINITE after
    too many non-finite steps in a row, EXIT_PREEMPTED (after saving) when a rank got a signal.

    ``trainer`` has ``cfg``, ``info``, ``state``, ``ckpt_dir``, ``metrics``, ``preemption``,
    ``device`` and ``_save()``: both the pre-training and the fine-tuning trainer."""
    step = trainer.state.step
    if skipped_in_row > trainer.cfg.optim.max_skipped_in_row:
        if trainer.info.is_main:
            print(f"stopping: {skipped_in_row} optimizer steps in a row had non-finite gradients "
                  f"(step {step}); the last checkpoint in {trainer.ckpt_dir} is intact. Lower the lr, "
                  f"enable optim.clip_grad or check the data.", flush=True)
        trainer.metrics.close()
        return EXIT_NONFINITE
    if _any_rank(trainer.preemption.requested, trainer.device):
        trainer._save()
        if trainer.info.is_main:
            print(f"preempted: checkpoint saved at step {step}; resume with --resume auto", flush=True)
        trainer.metrics.close()
        return EXIT_PREEMPTED
    return None


def announce(name: str, info: DistInfo) -> None:
    """One start-up line per rank: where it runs and whom it rendezvoused with."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[{name}] [rank {info.rank}/{info.world_size}] local rank {info.local_rank} on {node}, "
          f"device {info.device}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)


def _load_frozen_teacher(encoder: torch.nn.Module, path: str) -> None:
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


class Trainer:
    """Holds the engine, the momentum encoder, the loader and the run state."""

    def __init__(self, cfg: BootMAEConfig, run_dir: Path, max_steps: int | None, resume: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.info: DistInfo = init_distributed()
        self.device = self.info.device
        announce(cfg.run.name, self.info)
        self.precision = resolve_precision(cfg, self.info.accelerator)
        self.dtype = DTYPES[self.precision]
        torch.manual_seed(cfg.run.seed)
        self.ds_config = build_ds_config(cfg, self.info.world_size, self.precision)
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        self._save_run_files()
        self.model: BootMAE = build_model(cfg)
        self.model.encoder.grad_checkpointing = cfg.run.activation_checkpointing
        if cfg.run.compile:
            self.model.compile()  # in place: parameter names, hence checkpoints, stay the same
        teacher = copy.deepcopy(self.model.encoder) if cfg.uses_teacher else None
        optimizer = build_optimizer(self.model, cfg, self.device.type)
        resume_dir, manifest = ckpt.choose_resume(self.ckpt_dir, resume, self._fingerprint_config(),
                                                  self.info.world_size, cfg.checkpoint.allow_resize)
        resized = ckpt.prepare_universal(resume_dir, manifest, self.info.world_size, self.ds_config)
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=self.ds_config)
        self.momentum = self._build_teacher(teacher)
        self.state = RunState()
        if resume_dir is not None:
            self.state = RunState(**ckpt.load_checkpoint(self.engine, self.momentum, resume_dir, manifest))
            if self.info.is_main:
                how = f" (resized from {manifest['world_size']} ranks)" if resized else ""
                print(f"resumed from {resume_dir} at step {self.state.step}{how}", flush=True)
        self.loader = build_train_loader(cfg, rank=self.info.rank, world_size=self.info.world_size,
                                         state=None if resized else self.state.data)
        if resized and self.state.data:  # the sample layout changed: continue at an epoch boundary
            self.loader.start_at_next_epoch(self.state.data)
        steps_per_epoch = cfg.schedule.steps_per_epoch or max(len(self.loader) // self.accum, 1)
        self.schedules = Schedules(cfg, steps_per_epoch)
        self.total_steps = min(self.schedules.total_steps, max_steps or self.schedules.total_steps)
        self.metrics = MetricsLogger(run_dir, cfg, self.total_steps, self.info.is_main)
        self.flops = training_flops_per_image(flops_per_image(self.model, cfg))
        self.peak = device_peak_tflops(cfg, self.device)
        mean = torch.tensor(cfg.data.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std, device=self.device).view(1, 3, 1, 1)
        self.norm = (mean * 255, std * 255)
        self.knn = None
        if cfg.logging.knn_every_steps and self.info.is_main:
            from .knn import KnnMonitor

            lg = cfg.logging
            self.knn = KnnMonitor(cfg, lg.knn_bank, lg.knn_queries, lg.knn_bank_limit, lg.knn_query_limit)
        self.preemption = Preemption()

    # -- build ------------------------------------------------------------------------------
    def _save_run_files(self) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))

    def _build_teacher(self, teacher: torch.nn.Module | None):
        if teacher is None:
            return None
        m = self.cfg.momentum
        dtype = self.dtype if self.precision == "fp32" else DTYPES[m.target_dtype]
        if m.policy == "frozen":
            _load_frozen_teacher(teacher, m.teacher_path)
            return _FrozenTeacher(teacher.to(self.device, dtype))
        return ShardedMomentumEncoder(self.engine, teacher, dtype)

    def _fingerprint_config(self) -> dict[str, Any]:
        """The parts of the config a checkpoint must agree with to be resumed."""
        dump = self.cfg.model_dump(mode="json")
        return {k: dump[k] for k in ("model", "mask", "loss", "momentum", "optim", "schedule")} | {
            "data": {k: dump["data"][k] for k in ("global_batch_size", "micro_batch_size", "train")},
            "seed": dump["run"]["seed"]}

    # -- one micro-batch ----------------------------------------------------------------------
    def _micro_step(self, batch: dict[str, Any], stats: StepStats, feature_weight: float) -> None:
        cfg = self.cfg
        images = batch["images"].to(self.device, non_blocking=True)
        mask = batch["masks"].to(self.device, non_blocking=True)
        mean, std = self.norm
        x = (images.float() - mean) / std  # normalisation on the device, uint8 over the wire
        out = self.engine(x.to(self.dtype), mask)
        loss_pix = pixel_loss(out.pixels, x, mask, patch_size=cfg.model.patch_size,
                              weighted=cfg.loss.weighted_mask, norm=cfg.loss.pixel_norm, eps=cfg.loss.pixel_norm_eps)
        loss = loss_pix
        loss_feat = torch.zeros((), device=self.device)
        if self.momentum is not None:
            subset = self._teacher_subset(mask, batch["index"]) if cfg.momentum.input_fraction < 1 else None
            with torch.no_grad():
                targets = self.momentum.target.target_features(x.to(self.momentum.dtype), subset)
            loss_feat = feature_loss(out.features, targets, mask, weighted=cfg.loss.weighted_mask,
                                     eps=cfg.loss.feature_norm_eps, subset=subset)
            loss = loss + feature_weight * loss_feat
        self.engine.backward(loss)
        stats.loss += loss.item()
        stats.pixel += loss_pix.item()
        stats.feature += loss_feat.item()
        stats.corrupt += int(batch.get("corrupt", 0))
        stats.micro += 1
        stats.last = {"images": images, "mask": mask, "pixels": out.pixels.detach()}

    def _teacher_subset(self, mask: torch.Tensor, index: int) -> torch.Tensor:
        """Masked patch ids fed to the momentum encoder (paper Table 5), seeded per micro-batch."""
        _, masked = mask_to_ids(mask)
        k = max(1, round(self.cfg.momentum.input_fraction * masked.shape[1]))
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + self.state.step * 4099 + index)
        keys = torch.rand(masked.shape, generator=g).to(mask.device)
        pick = keys.argsort(dim=1)[:, :k]
        return torch.gather(masked, 1, pick).sort(dim=1).values

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> int:
        """Run until the schedule ends, ``max_steps``, preemption or repeated non-finite losses."""
        if self.state.step >= self.total_steps and self.info.is_main:
            print(f"nothing to do: the run is at step {self.state.step} of {self.total_steps}", flush=True)
        skipped_in_row = 0
        stats = StepStats()
        step_start = time.perf_counter()
        while self.state.step < self.total_steps:
            wait_start = time.perf_counter()
            for batch in self.loader:
                stats.data_wait += time.perf_counter() - wait_start
                step = self.state.step
                lr, wd = self.schedules.lr(step), self.schedules.weight_decay(step)
                set_hyperparameters(self.engine.optimizer, lr, wd)
                self._micro_step(batch, stats, self.schedules.feature_weight(step))
                before = self.engine.global_steps
                self.engine.step()
                if self.engine.global_steps == before:
                    wait_start = time.perf_counter()
                    continue  # inside gradient accumulation
                applied = self.engine.was_step_applied()
                ema_start = time.perf_counter()
                if applied and self.momentum is not None:
                    self.momentum.update(self.schedules.momentum(step))
                    self.momentum.gather()
                stats.ema = time.perf_counter() - ema_start
                self.state.step += 1
                self.state.samples += self.cfg.data.global_batch_size
                self.state.data = self.loader.state_dict()
                skipped_in_row = 0 if applied else skipped_in_row + 1
                self.state.skipped_total += 0 if applied else 1
                elapsed = time.perf_counter() - step_start
                self._log(stats, lr, wd, step, elapsed)
                stats, step_start = StepStats(), time.perf_counter()
                status = self._after_step(skipped_in_row)
                if status is not None:
                    return status
                if self.state.step >= self.total_steps:
                    break
                wait_start = time.perf_counter()
        self._save()
        self.metrics.close()
        return 0

    def _after_step(self, skipped_in_row: int) -> int | None:
        status = stop_status(self, skipped_in_row)
        if status is None and self.state.step % self.cfg.checkpoint.every_steps == 0 \
                and self.state.step < self.total_steps:
            self._save()
        return status

    def _save(self) -> None:
        if ckpt.is_complete(self.ckpt_dir / ckpt.tag_for(self.state.step)):
            return
        ckpt.save_checkpoint(self.engine, self.momentum, self.ckpt_dir, self.state.step, self.state.as_dict(),
                             self._fingerprint_config(), self.cfg.checkpoint.keep_last)

    def _log(self, stats: StepStats, lr: float, wd: float, step: int, elapsed: float) -> None:
        n = max(stats.micro, 1)
        sums = torch.tensor([stats.loss / n, stats.pixel / n, stats.feature / n, float(stats.corrupt)],
                            device=self.device)
        dist.all_reduce(sums)
        world = self.info.world_size
        rate = self.cfg.data.global_batch_size / max(elapsed, 1e-9)
        row = {
            "epoch": self.schedules.epoch(step), "loss": sums[0].item() / world,
            "loss_pixel": sums[1].item() / world, "loss_feature": sums[2].item() / world,
            "lr": lr, "weight_decay": wd, "momentum": self.schedules.momentum(step),
            "feature_weight": self.schedules.feature_weight(step),
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "skipped_steps": self.state.skipped_total, "samples": self.state.samples,
            "samples_per_s": rate, "samples_per_s_per_device": rate / world,
            "step_time_s": elapsed, "data_wait_s": stats.data_wait, "ema_update_s": stats.ema,
            "corrupt_samples": int(sums[3].item()),
        }
        if self.peak:
            row["mfu"] = rate / world * self.flops / (self.peak * 1e12)
        every = self.cfg.logging.knn_every_steps
        if self.knn is not None and (self.state.step % every == 0 or self.state.step == self.total_steps):
            # rank 0 only; the other ranks wait for it in the next collective
            scores = self.knn(self.engine.module.encoder)
            row["knn_top1"], row["knn_top5"] = scores["top1"], scores["top5"]
        if self.device.type == "cuda":
            row["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            row["memory_gb"] = psutil.Process().memory_info().rss / 2**30
        if self.momentum is not None and hasattr(self.momentum, "local_bytes"):
            row["ema_bytes_per_rank"] = self.momentum.local_bytes
        self.metrics.log(self.state.step, row)
        if self.info.is_main and stats.last and self.state.step % self.cfg.logging.preview_every_steps == 0:
            last = stats.last
            grid = reconstruction_grid(last["images"], last["mask"], last["pixels"], self.cfg.model.patch_size)
            self.metrics.image("reconstruction", grid, self.state.step)


class _FrozenTeacher:
    """A fixed teacher loaded from a file (paper Appendix B): same interface, no updates."""

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


def pretrain(cfg: BootMAEConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Pre-train with ``cfg`` into ``run_dir``; returns the process exit status."""
    try:
        status = Trainer(cfg, run_dir, max_steps, resume).train()
        dist.barrier()
        return status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # without it rank 0 may abort at exit on gloo
