"""The official linear probe as a distributed run: the build and the pieces of a step, evaluation
and ``RUN/best``, on the loop every job shares (``runtime.trainer.JobTrainer``).

- The frozen part (the encoder's first ``model.depth`` blocks, mean pooling, the affine-free
  LayerNorm) runs on every rank under ``no_grad``, in bf16 on GPUs (``run.precision``), outside
  the optimizer. Only :class:`ProbeHead` (BatchNorm without affine + linear) is in the DeepSpeed
  engine, data-parallel without ZeRO (stage 0, fp32): LARS needs each whole weight's norm, which
  ZeRO's flat partitions would split. Gradients are averaged over ranks and the accumulation
  window, as DDP + ``accum_iter`` average them in the official run.
- BatchNorm normalises each micro-batch with its own statistics (per GPU, as DDP without
  SyncBN). The running statistics follow rank 0's micro-batches only, which is what DDP's
  ``broadcast_buffers`` gives the official run: rank 0's buffers are broadcast before every
  forward. Evaluation uses them on every rank.
- Every step re-augments its images (``ProbeTransform``) in the streaming loader: memory does not
  depend on the training set's size. The lr follows MAE's per-step schedule (``probe_lr``).
- Each held-out image is scored on exactly one rank (``eval_batches``); ``RUN/best`` holds the
  best probe as a timm classifier (the encoder's first ``depth`` blocks, ``fc_norm`` with weight 1
  and bias 0, and the head with the BatchNorm statistics folded in).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import LinprobeConfig
from ..config.common import inherit_from_pretraining
from ..data import build_train_loader
from ..data.labelled import check_labels, eval_batches, open_eval_source
from ..evaluation.features import Normalise
from ..evaluation.lars import LARS
from ..evaluation.linprobe import hits, probe_lr, scores
from ..models.classifier import ProbeHead, ViTClassifier
from ..runtime.ds_config import build_ds_config, resolve_precision
from ..runtime.metrics import MetricsLogger
from ..runtime.run import DTYPES, RunState, resume_fingerprint, run_and_close
from ..runtime.trainer import Candidate, JobTrainer
from .data import ProbeTransform
from .model import BEST, build_probe, write_best


@dataclass
class ProbeState(RunState):
    """The run state plus the best evaluation so far."""

    best_top1: float = -1.0
    best_epoch: int = -1


def head_ds_config(cfg: LinprobeConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON for the head: the run's batch sizes, fp32, plain data parallelism."""
    ds = build_ds_config(cfg, world_size, "fp32")
    ds["zero_optimization"] = {"stage": 0}  # LARS needs whole tensors; the head is small anyway
    return ds


class LinprobeTrainer(JobTrainer):
    """Holds the frozen probe, the head's engine, the loaders and the run state."""

    best = "best_top1"

    def __init__(self, cfg: LinprobeConfig, run_dir: Path, max_steps: int | None, resume: str) -> None:
        self.start(cfg, run_dir)
        probe, pre, self.provenance = build_probe(cfg)
        self.pre, self.depth = pre, len(probe.encoder.blocks)
        inherit_from_pretraining(cfg, pre)
        self.dtype = DTYPES[resolve_precision(cfg, self.info.accelerator)]  # of the frozen encoder
        self.save_run(head_ds_config(cfg, self.info.world_size), {"init.json": self.provenance})
        # fp32 CPU copy of the frozen part for RUN/best (the device copy may be bf16)
        self.export_probe = copy.deepcopy(probe) if self.info.is_main else None
        probe.encoder.to(self.device, self.dtype).eval()
        probe.fc_norm.to(self.device).eval()  # fp32: the features the head sees
        self.probe: ViTClassifier = probe
        head: ProbeHead = probe.head  # type: ignore[assignment]
        optimizer = LARS(head.parameters(), lr=0.0, weight_decay=cfg.optim.weight_decay,
                         momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient)
        resumed = self.build_engine(head, optimizer, resume)
        resized = self.resume_state(resumed, ProbeState)
        d = cfg.data
        transform = ProbeTransform(cfg.model.img_size, cfg.run.seed, d.crop_scale, d.crop_ratio,  # type: ignore[arg-type]
                                   d.interpolation, d.hflip)
        self.loader = self.train_loader(build_train_loader, resized, transform)
        self.steps_per_epoch = cfg.schedule.steps_per_epoch or max(len(self.loader) // self.accum, 1)
        total = cfg.schedule.epochs * self.steps_per_epoch
        self.total_steps = min(total, max_steps or total)
        self.evaluation_every = self.steps_per_epoch * cfg.eval.every_epochs
        self.peak_lr = cfg.optim.base_lr * d.global_batch_size / cfg.optim.lr_batch_divisor
        self.normalise = Normalise(d.mean, d.std, self.device, self.dtype)  # type: ignore[arg-type]
        self.val_source = open_eval_source(d.val, cfg)  # type: ignore[arg-type]
        self.metrics = MetricsLogger(run_dir, cfg, self.total_steps, self.info.is_main)
        self.watch(device_keys=("images", "labels"),
                   check=lambda b: check_labels(b["labels"], cfg.model.num_classes, b["keys"]))

    # -- build ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """The parts of the config a checkpoint must agree with to be resumed."""
        d = self.cfg.data.model_dump(mode="json")
        augment = {k: d[k] for k in ("crop_scale", "crop_ratio", "interpolation", "hflip", "mean", "std")}
        return resume_fingerprint(self.cfg, ("mode", "init", "model", "optim", "schedule")) | {"augment": augment}

    # -- one step ---------------------------------------------------------------------------
    def hyperparameters(self, step: int) -> dict[str, float]:
        """MAE's per-step lr; LARS keeps its own weight decay (no ``apply_decay`` groups)."""
        lr = probe_lr(step, self.steps_per_epoch, self.peak_lr, self.cfg.optim.min_lr,
                      self.cfg.schedule.warmup_epochs, self.cfg.schedule.epochs)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return {"lr": lr}

    def micro_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        head: ProbeHead = self.engine.module
        with torch.no_grad():
            features = self.probe.forward_pooled(self.normalise(batch["images"])).float()  # [B, D]
        if self.poisoned_batch(batch):
            features = torch.full_like(features, float("nan"))  # the debug.nan_steps drill
        sync_running_stats(head)
        # the labels were checked on the host before they came over (watch)
        return {"loss": F.cross_entropy(self.engine(features), batch["labels"])}

    def step_applied(self) -> bool:
        optimizer: LARS = self.engine.optimizer
        return not optimizer.last_step_skipped

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, row: dict[str, Any]) -> Candidate:
        """The probe on the held-out set."""
        step, per_epoch = self.state.step, self.steps_per_epoch
        s = self.score()
        row.update({"eval_top1": s["top1"], "eval_top5": s["top5"], "eval_loss": s["loss"], "eval_images": s["images"]})
        if self.info.is_main:
            print(f"eval after step {step} (epoch {step / per_epoch:.2f}): top-1 {s['top1']:.2f}% "
                  f"top-5 {s['top5']:.2f}% on {s['images']} images", flush=True)
        return Candidate(s["top1"], {"best_epoch": -(-step // per_epoch)}, lambda: self._write_best(s))

    @torch.no_grad()
    def score(self) -> dict[str, float]:
        """Top-1 / top-5 (%), mean loss and count over the held-out set, each image on one rank."""
        head: ProbeHead = self.engine.module
        head.eval()
        sync_running_stats(head)
        d = self.cfg.data
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for batch in eval_batches(self.val_source, self.cfg.model.img_size, d.eval_crop_pct, self.info.rank,  # type: ignore[arg-type]
                                  self.info.world_size, d.eval_batch_size, d.val_limit, min(d.num_workers, 4)):
            labels = batch["labels"].to(self.device)
            check_labels(labels, self.cfg.model.num_classes, None)
            features = self.probe.forward_pooled(self.normalise(batch["images"])).float()
            sums += hits(head(features), labels)
        dist.all_reduce(sums)
        head.train()
        return scores(sums)

    def _write_best(self, s: dict[str, float]) -> None:
        """The probe as a timm classifier in ``RUN/best`` (rank 0; the head is the same on every rank)."""
        if self.info.is_main:
            c = self.cfg
            provenance = {"source": "linprobe", "run_dir": str(self.run_dir.resolve()), "step": self.state.step,
                          "epoch": self.state.best_epoch, "top1": s["top1"], "top5": s["top5"], "val": c.data.val,
                          "which": c.init.which, "num_classes": c.model.num_classes, "mode": c.mode,
                          "init": self.provenance.get("run_dir") or self.provenance.get("file") or "random init",
                          "fingerprint": self.pre.fingerprint()}
            write_best(self.run_dir / BEST, self.export_probe, self.engine.module, self.pre, c, provenance)


def sync_running_stats(head: ProbeHead) -> None:
    """Give every rank rank 0's BatchNorm running statistics (DDP's ``broadcast_buffers``)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in head.bn.buffers():
            dist.broadcast(buffer, src=0)


def linprobe(cfg: LinprobeConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Probe with ``cfg`` into ``run_dir``; returns the process exit status."""
    if cfg.mode == "cached_features":
        from .cached import cached_probe

        return cached_probe(cfg, run_dir)
    return run_and_close(lambda: LinprobeTrainer(cfg, run_dir, max_steps, resume))
