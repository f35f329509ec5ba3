"""Detection: the build and the pieces of a step, evaluation and ``RUN/best``; the loop (resume, log,
checkpoint, keeping the best) is ``runtime.trainer.JobTrainer``'s.

Same engine, checkpoints, signals and logs as the other jobs (``bootmae_ds.runtime``): ZeRO-2 over
a client AdamW whose groups carry the backbone's layer-wise lr scales; the engine holds fp32
weights and the backbone computes under bf16 autocast on GPUs (``detect/model.py`` says why the
heads stay fp32). COCOeval box and mask AP of every validation image (each on one rank, gathered
on rank 0) every ``eval.every_epochs`` epochs and at the end; ``RUN/best/`` holds the detector
with the best box AP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, DetectConfig
from ..data.coco import CocoError, CocoSplit, open_coco_split
from ..data.demo_coco import ensure_demo_coco
from ..data.detection import build_detection_loader
from ..evaluation.coco import evaluate_detector
from ..runtime.dist import broadcast_buffers
from ..runtime.ds_config import build_ds_config, resolve_precision
from ..runtime.metrics import MetricsLogger
from ..runtime.optim import adamw, backbone_layer_decay_groups, set_hyperparameters
from ..runtime.run import RunState, resume_fingerprint, run_and_close
from ..runtime.schedules import step_decay_lr
from ..runtime.trainer import Candidate, JobTrainer
from .best import write_best
from .model import BACKBONE, build_detector

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@dataclass
class DetectState(RunState):
    """The run state plus the best evaluation so far."""

    best_box_ap: float = -1.0
    best_step: int = -1


def data_root(cfg: DetectConfig) -> Path:
    """``data.root``: the demo set (built on first use) or a COCO directory."""
    return ensure_demo_coco(cfg.data.cache_dir) if cfg.data.root == "demo" else Path(cfg.data.root)


def open_splits(cfg: DetectConfig) -> tuple[CocoSplit, CocoSplit, int]:
    """The checked training and evaluation splits and the number of classes (``CocoError`` /
    ``ConfigError`` naming the file or field otherwise)."""
    root, d = data_root(cfg), cfg.data
    train = open_coco_split(root, d.train, train=True)
    val = open_coco_split(root, d.val, train=False, limit=d.val_limit)
    if val.category_ids != train.category_ids:
        raise CocoError(f"{val.json_path}: its categories {val.category_ids[:8]} ... differ from the training "
                        f"json's {train.category_ids[:8]} ...; both splits need the same category table")
    num_classes = cfg.model.num_classes or train.num_classes
    if num_classes != train.num_classes:
        raise ConfigError(f"model.num_classes={num_classes}: {train.json_path} has {train.num_classes} "
                          f"categories; set it to that or to null")
    return train, val, num_classes


class DetectTrainer(JobTrainer):
    """Holds the engine, the loaders, the evaluation split and the run state."""

    best = "best_box_ap"

    def __init__(self, cfg: DetectConfig, run_dir: Path, max_steps: int | None, resume: str,
                 splits: tuple[CocoSplit, CocoSplit, int]) -> None:
        self.start(cfg, run_dir)
        self.train_split, self.val_split, num_classes = splits
        self.precision = resolve_precision(cfg, self.info.accelerator)
        autocast = torch.bfloat16 if self.precision == "bf16" else None
        sync_bn = cfg.model.sync_bn == "on" or (cfg.model.sync_bn == "auto" and self.info.accelerator != "cpu")
        model, pre, self.provenance = build_detector(cfg, num_classes, autocast, sync_bn)
        self.pre = pre
        cfg.data.mean, cfg.data.std = cfg.data.mean or pre.data.mean, cfg.data.std or pre.data.std
        cfg.model.num_classes = num_classes
        # The engine keeps fp32 weights and reduces fp32 gradients; the backbone autocasts to bf16.
        self.save_run(build_ds_config(cfg, self.info.world_size, "fp32"), {"init.json": self.provenance})
        self.export_model = copy.deepcopy(model) if self.info.is_main else None  # for RUN/best
        groups = backbone_layer_decay_groups(model, pre.model.depth, cfg.optim.layer_decay, BACKBONE)
        optimizer = adamw(groups, cfg.optim, self.device.type)
        self.seed_process_rngs()  # drop path, proposal sampling: per rank
        resumed = self.build_engine(model, optimizer, resume)
        resized = self.resume_state(resumed, DetectState)
        self.loader = self.train_loader(self._build_loader, resized)
        self.steps_per_epoch = cfg.schedule.steps_per_epoch or max(len(self.loader) // self.accum, 1)
        total = cfg.schedule.epochs * self.steps_per_epoch
        self.total_steps = min(total, max_steps or total)
        self.evaluation_every = self.steps_per_epoch * cfg.eval.every_epochs
        self.metrics = MetricsLogger(run_dir, cfg, self.total_steps, self.info.is_main)
        self.watch(device_keys=())  # lists of tensors: moved in the step

    # -- build ------------------------------------------------------------------------------
    def _build_loader(self, cfg: DetectConfig, transform: Any = None, **where: Any) -> Any:
        return build_detection_loader(cfg, self.train_split, **where)

    def _fingerprint(self) -> dict[str, Any]:
        """The parts of the config a checkpoint must agree with to be resumed."""
        d = self.cfg.data.model_dump(mode="json")
        data = {k: d[k] for k in ("root", "val", "min_size", "max_size", "size_divisible", "hflip", "group_by_aspect")}
        return resume_fingerprint(self.cfg, ("init", "model", "optim", "schedule")) | {"detect_data": data}

    # -- one step ---------------------------------------------------------------------------
    def hyperparameters(self, step: int) -> dict[str, float]:
        s = self.cfg.schedule
        lr = step_decay_lr(step, self.cfg.optim.lr, self.steps_per_epoch, s.decay_epochs, s.decay_factor,
                           s.warmup_steps, s.warmup_ratio)
        set_hyperparameters(self.engine.optimizer, lr, self.cfg.optim.weight_decay)
        return {"lr": lr}

    def micro_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The summed loss (trained on) and torchvision's five parts."""
        losses = self.engine(*self._to_device(batch))
        return {"loss": sum(losses[k] for k in LOSSES), **{k: losses[k] for k in LOSSES}}

    def _to_device(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Images as float in [0, 1] and targets on the device (NaN images for the drill)."""
        images = [im.to(self.device, non_blocking=True).float().div_(255) for im in batch["images"]]
        if self.poisoned_batch(batch):
            images = [torch.full_like(im, float("nan")) for im in images]  # the debug.nan_steps drill
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        return images, targets

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, row: dict[str, Any]) -> Candidate:
        """COCOeval of every validation image; the tables in ``RUN/eval/``."""
        step, per_epoch, d = self.state.step, self.steps_per_epoch, self.cfg.data
        broadcast_buffers(self.engine.module)  # rank 0's BatchNorm statistics: one model on every rank
        scores = evaluate_detector(self.engine.module, self.val_split, self.info.rank, self.info.world_size,
                                   d.eval_batch_size, min(d.num_workers, 4), self.device,
                                   self.cfg.model.roi.mask_threshold)
        metrics = scores["metrics"]
        row.update({f"eval_{k}": v for k, v in metrics.items()})
        row.update(eval_images=scores["images"], eval_detections=scores["detections"])
        box_ap = metrics["box_ap"] or 0.0
        if self.info.is_main:
            out = self.run_dir / "eval"
            out.mkdir(exist_ok=True)
            (out / f"step_{step:08d}.txt").write_text(scores["summary"])
            print(f"eval after step {step} (epoch {step / per_epoch:.2f}): box AP {box_ap:.2f}  mask AP "
                  f"{metrics['mask_ap'] or 0.0:.2f}  on {scores['images']} images "
                  f"({scores['detections']} detections); COCOeval tables in {out.name}/step_{step:08d}.txt",
                  flush=True)
        return Candidate(box_ap, {"best_step": step}, lambda: self._write_best(scores))

    def _write_best(self, scores: dict[str, Any]) -> None:
        """The detector in ``RUN/best`` (rank 0; the weights are whole on every rank under ZeRO-2)."""
        if not self.info.is_main:
            return
        step, metrics = self.state.step, scores["metrics"]
        provenance = {"source": "detect", "run_dir": str(self.run_dir.resolve()), "step": step,
                      "epoch": -(-step // self.steps_per_epoch), **{f"eval_{k}": v for k, v in metrics.items()},
                      "images": scores["images"],
                      "init": self.provenance.get("run_dir") or self.provenance.get("file") or "random init"}
        write_best(self.run_dir / "best", self.export_model, self.engine.module.state_dict(), self.cfg,
                   self.pre, self.val_split, provenance, scores["results"])


def detect(cfg: DetectConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Train and evaluate Mask R-CNN with ``cfg`` into ``run_dir``; returns the process exit status.
    The data is checked before any process group or model is built (bad input: status 2)."""
    splits = open_splits(cfg)
    return run_and_close(lambda: DetectTrainer(cfg, run_dir, max_steps, resume, splits))
