"""Pre-training: the build and the pieces of a step; the loop is ``runtime.trainer.JobTrainer``'s.

One process per device; the same code runs on CPU ranks (gloo) and GPUs (NCCL), chosen by
DeepSpeed's accelerator. Exit statuses (``bootmae_ds.runtime.run``): 0 finished, 75 preempted
after a checkpoint (requeue me), 3 stopped on non-finite losses (last good checkpoint intact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig
from ..data import build_train_loader
from ..interop.pretrain_init import initial_weights
from ..models import BootMAE, build_model, mask_to_ids
from ..runtime.ds_config import build_ds_config, resolve_precision
from ..runtime.metrics import MetricsLogger, device_peak_tflops
from ..runtime.optim import build_optimizer, set_hyperparameters
from ..runtime.run import DTYPES, resume_fingerprint, run_and_close
from ..runtime.trainer import JobTrainer
from .flops import flops_per_image, training_flops_per_image
from .losses import feature_loss, pixel_loss
from .preview import reconstruction_grid
from .schedules import PretrainSchedules
from .teacher import build_teacher, teacher_copy


class Trainer(JobTrainer):
    """Holds the engine, the teacher (``ema``: the sharded momentum encoder, or a frozen one),
    the loader and the run state."""

    update_time_key = "ema_update_s"

    def __init__(self, cfg: BootMAEConfig, run_dir: Path, max_steps: int | None, resume: str) -> None:
        self.start(cfg, run_dir)
        self.precision = resolve_precision(cfg, self.info.accelerator)
        self.dtype = DTYPES[self.precision]
        torch.manual_seed(cfg.run.seed)
        self.save_run(build_ds_config(cfg, self.info.world_size, self.precision))
        self.model: BootMAE = build_model(cfg)
        self.init = initial_weights(cfg, self.model, run_dir, self.ckpt_dir, resume, self.info.is_main)
        self.model.encoder.grad_checkpointing = cfg.run.activation_checkpointing
        if cfg.run.compile:
            self.model.compile()  # in place: parameter names, hence checkpoints, stay the same
        teacher = teacher_copy(cfg, self.model)
        optimizer = build_optimizer(self.model, cfg, self.device.type)
        resumed = self.build_engine(self.model, optimizer, resume)
        self.ema = build_teacher(cfg, self.engine, teacher, self.precision, self.device)
        if self.init is not None:  # fp32 masters and momentum encoder from init.source (not on resume)
            self.init.start(self.engine, self.ema, resumed)
        resized = self.resume_state(resumed)
        self.loader = self.train_loader(build_train_loader, resized)
        steps_per_epoch = cfg.schedule.steps_per_epoch or max(len(self.loader) // self.accum, 1)
        self.schedules = PretrainSchedules(cfg, steps_per_epoch)
        self.steps_per_epoch = self.schedules.steps_per_epoch
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
        self.last_micro: dict[str, torch.Tensor] = {}  # the preview's images, mask and prediction
        if self.ema is not None:
            self.step_update = self._update_teacher
        self.watch(device_keys=("images", "masks"))

    # -- build ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """The parts of the config a checkpoint must agree with to be resumed."""
        return resume_fingerprint(self.cfg, ("model", "mask", "loss", "momentum", "optim", "schedule"))


    # -- one step ---------------------------------------------------------------------------
    def hyperparameters(self, step: int) -> dict[str, float]:
        lr, wd = self.schedules.lr(step), self.schedules.weight_decay(step)
        set_hyperparameters(self.engine.optimizer, lr, wd)
        return {"lr": lr, "weight_decay": wd, "momentum": self.schedules.momentum(step),
                "feature_weight": self.schedules.feature_weight(step)}

    def micro_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images, mask = batch["images"], batch["masks"]  # on the device already (DevicePrefetcher)
        mean, std = self.norm
        x = (images.float() - mean) / std  # normalisation on the device, uint8 over the wire
        if self.poisoned_batch(batch):
            x = torch.full_like(x, float("nan"))  # the debug.nan_steps drill
        out = self.engine(x.to(self.dtype), mask)
        loss_pix = pixel_loss(out.pixels, x, mask, patch_size=cfg.model.patch_size,
                              weighted=cfg.loss.weighted_mask, norm=cfg.loss.pixel_norm, eps=cfg.loss.pixel_norm_eps)
        loss = loss_pix
        loss_feat = torch.zeros((), device=self.device)
        if self.ema is not None:
            subset = self._teacher_subset(mask, batch["index"]) if cfg.momentum.input_fraction < 1 else None
            with torch.no_grad():
                targets = self.ema.target.target_features(x.to(self.ema.dtype), subset)
            loss_feat = feature_loss(out.features, targets, mask, weighted=cfg.loss.weighted_mask,
                                     eps=cfg.loss.feature_norm_eps, subset=subset)
            loss = loss + self.schedules.feature_weight(self.state.step) * loss_feat
        self.last_micro = {"images": images, "mask": mask, "pixels": out.pixels.detach()}
        return {"loss": loss, "loss_pixel": loss_pix, "loss_feature": loss_feat}

    def _teacher_subset(self, mask: torch.Tensor, index: int) -> torch.Tensor:
        """Masked patch ids fed to the momentum encoder (paper Table 5), seeded per micro-batch."""
        _, masked = mask_to_ids(mask, self.cfg.mask.num_masked)
        k = max(1, round(self.cfg.momentum.input_fraction * masked.shape[1]))
        # drawn where the mask is: a host-drawn tensor copied over would stall the device
        g = torch.Generator(mask.device).manual_seed(self.cfg.run.seed * 1_000_003 + self.state.step * 4099 + index)
        keys = torch.rand(masked.shape, generator=g, device=mask.device)
        pick = keys.argsort(dim=1)[:, :k]
        return torch.gather(masked, 1, pick).sort(dim=1).values

    def _update_teacher(self, step: int) -> None:
        """The momentum encoder after an applied step, and its gather."""
        self.ema.update(self.schedules.momentum(step))
        self.ema.gather()

    def finish_row(self, row: dict[str, Any]) -> None:
        """MFU, the k-NN monitor at its cadence, the teacher's memory, the reconstruction preview."""
        if self.peak:
            row["mfu"] = row["samples_per_s_per_device"] * self.flops / (self.peak * 1e12)
        every = self.cfg.logging.knn_every_steps
        if self.knn is not None and (self.state.step % every == 0 or self.state.step == self.total_steps):
            # rank 0 only; the other ranks wait for it in the next collective
            scores = self.knn(self.engine.module.encoder)
            row["knn_top1"], row["knn_top5"] = scores["top1"], scores["top5"]
        if self.ema is not None and hasattr(self.ema, "local_bytes"):
            row["ema_bytes_per_rank"] = self.ema.local_bytes
        if self.info.is_main and self.last_micro and self.state.step % self.cfg.logging.preview_every_steps == 0:
            last = self.last_micro
            grid = reconstruction_grid(last["images"], last["mask"], last["pixels"], self.cfg.model.patch_size)
            self.metrics.image("reconstruction", grid, self.state.step)


def pretrain(cfg: BootMAEConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Pre-train with ``cfg`` into ``run_dir``; returns the process exit status."""
    return run_and_close(lambda: Trainer(cfg, run_dir, max_steps, resume))
