"""The pre-training loop: build, resume, loop, log, checkpoint.

One process per device; the same code runs on CPU ranks (gloo) and GPUs (NCCL), chosen by
DeepSpeed's accelerator. Exit statuses (``bootmae_ds.runtime.run``): 0 finished, 75 preempted
after a checkpoint (requeue me), 3 stopped on non-finite losses (last good checkpoint intact).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from ..config import BootMAEConfig
from ..data import build_train_loader
from ..interop.pretrain_init import initial_weights
from ..models import BootMAE, build_model, mask_to_ids
from ..runtime import checkpoint as ckpt
from ..runtime.dist import DistInfo, init_distributed
from ..runtime.ds_config import build_ds_config, resolve_precision
from ..runtime.metrics import MetricsLogger, device_peak_tflops
from ..runtime.optim import build_optimizer, set_hyperparameters
from ..runtime.prefetch import DevicePrefetcher
from ..runtime.recovery import DataFaults, SpikeDetector, poisoned_batches, watch
from ..runtime.run import (
    DTYPES,
    Preemption,
    RunState,
    announce,
    checkpoint_dir,
    resume_fingerprint,
    set_deterministic,
    run_and_close,
    save_run_files,
    start_engine,
    stop_status,
)
from .flops import flops_per_image, training_flops_per_image
from .losses import feature_loss, pixel_loss
from .preview import reconstruction_grid
from .schedules import PretrainSchedules
from .teacher import build_teacher, teacher_copy


@dataclass
class StepStats:
    """Sums over the micro-batches of one optimizer step. The losses stay on the device until
    the step is logged: reading them per micro-batch would stall the device every time."""

    losses: torch.Tensor | None = None  # [loss, pixel, feature] summed over micro-batches
    faults: DataFaults = field(default_factory=DataFaults)
    data_wait: float = 0.0
    ema: float = 0.0
    micro: int = 0
    last: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, losses: torch.Tensor) -> None:
        self.losses = losses if self.losses is None else self.losses + losses
        self.micro += 1


class Trainer:
    """Holds the engine, the teacher, the loader and the run state."""

    def __init__(self, cfg: BootMAEConfig, run_dir: Path, max_steps: int | None, resume: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        set_deterministic(cfg.run.deterministic)
        self.info: DistInfo = init_distributed()
        self.device = self.info.device
        announce(cfg.run.name, self.info)
        self.precision = resolve_precision(cfg, self.info.accelerator)
        self.dtype = DTYPES[self.precision]
        torch.manual_seed(cfg.run.seed)
        self.ds_config = build_ds_config(cfg, self.info.world_size, self.precision)
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.ckpt_dir = checkpoint_dir(cfg, run_dir)
        save_run_files(self.info, run_dir, cfg, self.ds_config)
        self.model: BootMAE = build_model(cfg)
        self.init = initial_weights(cfg, self.model, run_dir, self.ckpt_dir, resume, self.info.is_main)
        self.model.encoder.grad_checkpointing = cfg.run.activation_checkpointing
        if cfg.run.compile:
            self.model.compile()  # in place: parameter names, hence checkpoints, stay the same
        teacher = teacher_copy(cfg, self.model)
        optimizer = build_optimizer(self.model, cfg, self.device.type)
        self.engine, resumed = start_engine(self.model, optimizer, self.ds_config, self.ckpt_dir, resume,
                                            self._fingerprint(), self.info.world_size,
                                            cfg.checkpoint.allow_resize)
        self.momentum = build_teacher(cfg, self.engine, teacher, self.precision, self.device)
        if self.init is not None:  # fp32 masters and momentum encoder from init.source (not on resume)
            self.init.start(self.engine, self.momentum, resumed)
        self.state = RunState()
        if resumed is not None:
            self.state = RunState(**resumed.load(self.engine, self.momentum))
            if self.info.is_main:
                print(f"resumed from {resumed.describe()}", flush=True)
        resized = resumed is not None and resumed.resized
        self.loader = build_train_loader(cfg, rank=self.info.rank, world_size=self.info.world_size,
                                         state=None if resized else self.state.data)
        if resized and self.state.data:  # the sample layout changed: continue at an epoch boundary
            self.loader.start_at_next_epoch(self.state.data)
        steps_per_epoch = cfg.schedule.steps_per_epoch or max(len(self.loader) // self.accum, 1)
        self.schedules = PretrainSchedules(cfg, steps_per_epoch)
        self.total_steps = min(self.schedules.total_steps, max_steps or self.schedules.total_steps)
        self.metrics = MetricsLogger(run_dir, cfg, self.total_steps, self.info.is_main)
        self.flops = training_flops_per_image(flops_per_image(self.model, cfg))
        self.peak = device_peak_tflops(cfg, self.device)
        mean = torch.tensor(cfg.data.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std, device=self.device).view(1, 3, 1, 1)
        self.norm = (mean * 255, std * 255)
        self.knn = None
        if cfg.logging.knn_every_steps and self.info.is_main:
            from ..evaluation.knn import KnnMonitor

            lg = cfg.logging
            self.knn = KnnMonitor(cfg, lg.knn_bank, lg.knn_queries, lg.knn_bank_limit, lg.knn_query_limit)
        self.batches = DevicePrefetcher(self.loader, self.device, keys=("images", "masks"))
        self.last_batch: dict[str, Any] = {}
        self.poisoned = poisoned_batches(cfg.debug.nan_steps, self.accum, len(self.loader))
        self.spikes = SpikeDetector(cfg.optim.spike_factor, cfg.optim.spike_window)
        self.spikes.load_state_dict(self.state.recent_losses)
        self.preemption = Preemption()

    # -- build ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """The parts of the config a checkpoint must agree with to be resumed."""
        return resume_fingerprint(self.cfg, ("model", "mask", "loss", "momentum", "optim", "schedule"))

    def _load(self, tag_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Restore weights, teacher and RNG from a checkpoint (a rewind); the saved run state."""
        return ckpt.load_checkpoint(self.engine, self.momentum, tag_dir, manifest)

    # -- one micro-batch ----------------------------------------------------------------------
    def _micro_step(self, batch: dict[str, Any], stats: StepStats, feature_weight: float) -> None:
        cfg = self.cfg
        images, mask = batch["images"], batch["masks"]  # on the device already (DevicePrefetcher)
        mean, std = self.norm
        x = (images.float() - mean) / std  # normalisation on the device, uint8 over the wire
        if (batch["epoch"], batch["index"]) in self.poisoned:
            x = torch.full_like(x, float("nan"))  # the debug.nan_steps drill
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
        stats.add(torch.stack([loss.detach(), loss_pix.detach(), loss_feat.detach()]).float())
        stats.faults.add(batch)
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
        stats = StepStats()
        step_start = time.perf_counter()
        while self.state.step < self.total_steps:
            for batch in self.batches:
                self.last_batch = batch
                step = self.state.step
                lr, wd = self.schedules.lr(step), self.schedules.weight_decay(step)
                set_hyperparameters(self.engine.optimizer, lr, wd)
                self._micro_step(batch, stats, self.schedules.feature_weight(step))
                self.batches.prefetch()  # the next batch travels while the backward pass runs
                before = self.engine.global_steps
                self.engine.step()
                if self.engine.global_steps == before:
                    continue  # inside gradient accumulation
                applied = self.engine.was_step_applied()
                ema_start = time.perf_counter()
                if applied and self.momentum is not None:
                    self.momentum.update(self.schedules.momentum(step))
                    self.momentum.gather()
                stats.ema = time.perf_counter() - ema_start
                stats.data_wait, self.batches.wait_s = self.batches.wait_s, 0.0
                self.state.step += 1
                self.state.samples += self.cfg.data.global_batch_size
                self.state.data = self.loader.position_after(batch)
                self.state.skipped_in_row = 0 if applied else self.state.skipped_in_row + 1
                self.state.skipped_total += 0 if applied else 1
                elapsed = time.perf_counter() - step_start
                self._log(stats, lr, wd, step, elapsed)
                stats, step_start = StepStats(), time.perf_counter()
                status = self._after_step()
                if status is not None:
                    return status
                if self.state.step >= self.total_steps:
                    break
        self._save()
        self.metrics.close()
        return 0

    def _after_step(self) -> int | None:
        status = stop_status(self)
        if status is None and self.state.step % self.cfg.checkpoint.every_steps == 0 \
                and self.state.step < self.total_steps:
            self._save()
        return status

    def _save(self) -> None:
        if ckpt.is_complete(self.ckpt_dir / ckpt.tag_for(self.state.step)):
            return
        self.state.recent_losses = self.spikes.state_dict()
        ckpt.save_checkpoint(self.engine, self.momentum, self.ckpt_dir, self.state.step, self.state.as_dict(),
                             self._fingerprint(), self.cfg.checkpoint.keep_last, self.cfg.debug.slow_save_s)

    def _log(self, stats: StepStats, lr: float, wd: float, step: int, elapsed: float) -> None:
        n = max(stats.micro, 1)
        sums = torch.cat([stats.losses / n, torch.tensor(stats.faults.counts(), device=self.device)])
        dist.all_reduce(sums)
        world = self.info.world_size
        loss, pixel, feature, *faults = sums.tolist()  # the one read of the step's numbers
        rate = self.cfg.data.global_batch_size / max(elapsed, 1e-9)
        row = {
            "epoch": self.schedules.epoch(step), "loss": loss / world,
            "loss_pixel": pixel / world, "loss_feature": feature / world,
            "lr": lr, "weight_decay": wd, "momentum": self.schedules.momentum(step),
            "feature_weight": self.schedules.feature_weight(step),
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "skipped_steps": self.state.skipped_total, "samples": self.state.samples,
            "samples_per_s": rate, "samples_per_s_per_device": rate / world,
            "step_time_s": elapsed, "data_wait_s": stats.data_wait, "ema_update_s": stats.ema,
        }
        stats.faults.report(row, faults, self.info.is_main)
        watch(row, self.spikes, self.state.step, len(self.state.rewinds), self.info.is_main)
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



def pretrain(cfg: BootMAEConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Pre-train with ``cfg`` into ``run_dir``; returns the process exit status."""
    return run_and_close(lambda: Trainer(cfg, run_dir, max_steps, resume))
