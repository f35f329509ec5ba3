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
from ..models import BootMAE, build_model, mask_to_ids
from ..runtime import checkpoint as ckpt
from ..runtime.dist import DistInfo, init_distributed
from ..runtime.ds_config import build_ds_config, resolve_precision
from ..runtime.metrics import MetricsLogger, device_peak_tflops
from ..runtime.optim import build_optimizer, set_hyperparameters
from ..runtime.run import (
    DTYPES,
    Preemption,
    RunState,
    announce,
    checkpoint_dir,
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
    """Sums over the micro-batches of one optimizer step."""

    loss: float = 0.0
    pixel: float = 0.0
    feature: float = 0.0
    corrupt: int = 0
    data_wait: float = 0.0
    ema: float = 0.0
    micro: int = 0
    last: dict[str, torch.Tensor] = field(default_factory=dict)


class Trainer:
    """Holds the engine, the teacher, the loader and the run state."""

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
        self.ckpt_dir = checkpoint_dir(cfg, run_dir)
        save_run_files(self.info, run_dir, cfg, self.ds_config)
        self.model: BootMAE = build_model(cfg)
        self.model.encoder.grad_checkpointing = cfg.run.activation_checkpointing
        if cfg.run.compile:
            self.model.compile()  # in place: parameter names, hence checkpoints, stay the same
        teacher = teacher_copy(cfg, self.model)
        optimizer = build_optimizer(self.model, cfg, self.device.type)
        self.engine, resumed = start_engine(self.model, optimizer, self.ds_config, self.ckpt_dir, resume,
                                            self._fingerprint_config(), self.info.world_size,
                                            cfg.checkpoint.allow_resize)
        self.momentum = build_teacher(cfg, self.engine, teacher, self.precision, self.device)
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
        self.preemption = Preemption()

    # -- build ------------------------------------------------------------------------------
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



def pretrain(cfg: BootMAEConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Pre-train with ``cfg`` into ``run_dir``; returns the process exit status."""
    return run_and_close(lambda: Trainer(cfg, run_dir, max_steps, resume))
