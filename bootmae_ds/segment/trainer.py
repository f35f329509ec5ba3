"""Segmentation: the build and the pieces of a step, evaluation and ``RUN/best``; the loop (resume,
log, checkpoint, keeping the best) is ``runtime.trainer.JobTrainer``'s.

Same engine, checkpoints, signals and logs as the other jobs (``bootmae_ds.runtime``): ZeRO-2 with
a client AdamW whose groups carry the official constructor's layer-wise lr scales, mmcv's poly
schedule with a linear warm-up, mIoU / mAcc / aAcc on the held-out set every ``eval.every_steps``
and at the end (a confusion matrix summed over ranks, each image scored once), the per-class
table in ``RUN/eval/``, and ``RUN/best/model.pth`` holding the best segmentor in the released
mmseg layout (``launchers/segment.py --eval-only --weights`` re-scores it).

BatchNorm: SyncBatchNorm on GPUs (the official ``norm_cfg``); torch's SyncBatchNorm does not run on
CPU tensors, so CPU ranks normalise with their own micro-batch statistics. Either way rank 0's
running statistics are broadcast to every rank before an evaluation (mmseg's DistEvalHook does the
same), and checkpoints hold rank 0's, so every rank scores with the same model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config.segment import SegmentConfig
from ..evaluation.segmentation import (
    SegmentationScores,
    all_reduce_confusion,
    confusion_matrix,
    segmentation_scores,
)
from ..runtime.ds_config import build_ds_config, resolve_precision
from ..runtime.metrics import MetricsLogger
from ..runtime.optim import adamw, backbone_layer_decay_groups, set_hyperparameters
from ..runtime.run import DTYPES, RunState, resume_fingerprint, run_and_close
from ..runtime.sharded_ema import online_full_state
from ..runtime.trainer import Candidate, JobTrainer
from .data import (
    SegTrainTransform,
    build_segment_loader,
    check_labels,
    device_batch,
    eval_samples,
    open_eval_source,
    open_train_source,
)
from .model import Segmentor, build_segmentor, predict, segmentation_loss

BEST = "best"


@dataclass
class SegmentState(RunState):
    """The run state plus the best evaluation so far."""

    best_miou: float = -1.0
    best_step: int = -1


def poly_lr(step: int, cfg: SegmentConfig) -> float:
    """mmcv's ``poly`` policy with ``warmup='linear'`` at iteration ``step`` (0-based): the regular lr
    ``(lr - min_lr) (1 - step / iters) ** power + min_lr``, times ``1 - (1 - step / W)(1 - ratio)``
    during the first W = ``warmup_iters`` steps."""
    s, o = cfg.schedule, cfg.optim
    lr = (o.lr - o.min_lr) * (1 - min(step, s.iters) / s.iters) ** s.power + o.min_lr
    if step < s.warmup_iters:
        lr *= 1 - (1 - step / s.warmup_iters) * (1 - s.warmup_ratio)
    return lr


def use_sync_bn(cfg: SegmentConfig, device: torch.device) -> bool:
    """``model.sync_bn``: auto = on GPUs; CPU ranks cannot run torch's SyncBatchNorm."""
    if cfg.model.sync_bn == "auto":
        return device.type == "cuda"
    return cfg.model.sync_bn == "on"


def broadcast_bn_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics (before an evaluation)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for buffer in (module.running_mean, module.running_var):
                    dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(model: Segmentor, cfg: SegmentConfig, source: Any, rank: int, world: int, device: torch.device,
             dtype: torch.dtype) -> tuple[SegmentationScores, int]:
    """Scores of ``model`` on this rank's share of ``source`` summed over every rank, and the
    number of images scored (a collective)."""
    was_training = model.training
    model.eval()
    broadcast_bn_buffers(model)
    d, K = cfg.data, cfg.model.num_classes
    mean = torch.tensor(d.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(d.std, device=device).view(1, 3, 1, 1)

    def normalise(view: torch.Tensor) -> torch.Tensor:
        return ((view.to(device).float()[None] / 255 - mean) / std).to(dtype)

    matrix = torch.zeros(K, K, dtype=torch.int64, device=device)
    images = torch.zeros((), dtype=torch.int64, device=device)
    for sample in eval_samples(source, cfg, rank, world, min(d.num_workers, 4)):
        label = sample["label"].to(device)
        pred = predict(model, sample["views"], tuple(label.shape), cfg, normalise)
        matrix += confusion_matrix(pred, label, K, d.ignore_index)
        images += 1
    all_reduce_confusion(matrix)
    if dist.is_initialized():
        dist.all_reduce(images)
    model.train(was_training)
    return segmentation_scores(matrix), int(images)


class SegmentTrainer(JobTrainer):
    """Holds the engine, the loaders and the run state."""

    best = "best_miou"

    def __init__(self, cfg: SegmentConfig, run_dir: Path, max_steps: int | None, resume: str) -> None:
        self.start(cfg, run_dir)
        self.train_source, self.val_source = open_train_source(cfg), open_eval_source(cfg)  # checked: fail fast
        model, self.pre, self.provenance = build_segmentor(cfg)
        self.precision = resolve_precision(cfg, self.info.accelerator)
        self.dtype = DTYPES[self.precision]
        self.save_run(build_ds_config(cfg, self.info.world_size, self.precision), {"init.json": self.provenance})
        if use_sync_bn(cfg, self.device):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.backbone.grad_checkpointing = cfg.run.activation_checkpointing
        if cfg.run.compile:
            model.compile()
        num_layers = cfg.optim.layer_decay_num_layers or model.backbone.depth
        groups = backbone_layer_decay_groups(model, num_layers, cfg.optim.layer_decay)
        optimizer = adamw(groups, cfg.optim, self.device.type)
        self.seed_process_rngs()  # drop path and dropout: per rank
        resumed = self.build_engine(model, optimizer, resume)
        resized = self.resume_state(resumed, SegmentState)
        self.loader = self.train_loader(partial(build_segment_loader, source=self.train_source), resized,
                                        SegTrainTransform.from_config(cfg))
        self.steps_per_epoch = max(len(self.loader) // self.accum, 1)
        self.total_steps = min(cfg.schedule.iters, max_steps or cfg.schedule.iters)
        self.evaluation_every = cfg.eval.every_steps
        d = cfg.data
        self.mean = torch.tensor(d.mean, device=self.device)
        self.std = torch.tensor(d.std, device=self.device)
        self.metrics = MetricsLogger(run_dir, cfg, self.total_steps, self.info.is_main)
        # the label maps are checked on the host, before they go to the device
        self.watch(device_keys=("images", "masks"),
                   check=lambda b: check_labels(b, cfg.model.num_classes, d.ignore_index))

    def _fingerprint(self) -> dict[str, Any]:
        """The parts of the config a checkpoint must agree with to be resumed."""
        d = self.cfg.data.model_dump(mode="json")
        augment = {k: d[k] for k in ("img_scale", "ratio_range", "cat_max_ratio", "hflip", "photometric",
                                     "reduce_zero_label", "ignore_index", "mean", "std")}
        return resume_fingerprint(self.cfg, ("init", "model", "optim", "schedule")) | {"augment": augment}

    # -- one step ---------------------------------------------------------------------------
    def hyperparameters(self, step: int) -> dict[str, float]:
        lr = poly_lr(step, self.cfg)
        set_hyperparameters(self.engine.optimizer, lr, self.cfg.optim.weight_decay)
        return {"lr": lr}

    def micro_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = device_batch(batch["images"], batch["masks"], self.mean, self.std, self.cfg.data.ignore_index)
        if self.poisoned_batch(batch):
            images = torch.full_like(images, float("nan"))  # the debug.nan_steps drill
        return segmentation_loss(self.engine(images.to(self.dtype)), labels, self.cfg)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, row: dict[str, Any]) -> Candidate:
        """Score the held-out set and write its per-class table."""
        step = self.state.step
        start = time.perf_counter()
        scores, images = evaluate(self.engine.module, self.cfg, self.val_source, self.info.rank,
                                  self.info.world_size, self.device, self.dtype)
        row.update(scores.row() | {"eval_images": images})
        if self.info.is_main:
            print(f"eval after step {step}: mIoU {scores.miou:.2f}  mAcc {scores.macc:.2f}  aAcc {scores.aacc:.2f} "
                  f"on {images} images ({time.perf_counter() - start:.0f} s)", flush=True)
            (self.run_dir / "eval").mkdir(exist_ok=True)
            scores.write_table(self.run_dir / "eval" / f"step_{step:08d}.md", self.class_names(),
                               f"step {step}, {images} images of {self.cfg.data.val}")
        return Candidate(scores.miou, {"best_step": step}, lambda: self._write_best(scores, images))

    def class_names(self) -> list[str] | None:
        """Class names for the tables: ``data.classes``, else ``classes.txt`` beside an ADE20K-style
        root (the demo has one) when it lists ``num_classes`` names."""
        if self.cfg.data.classes and len(self.cfg.data.classes) == self.cfg.model.num_classes:
            return list(self.cfg.data.classes)
        for root in (Path(self.cfg.data.val), getattr(self.val_source, "root", Path("."))):
            path = Path(root) / "classes.txt"
            if path.is_file():
                names = [n for n in path.read_text().splitlines() if n.strip()]
                if len(names) == self.cfg.model.num_classes:
                    return names
        return None

    def _write_best(self, scores: SegmentationScores, images: int) -> None:
        """``RUN/best``: the segmentor's fp32 weights in mmseg's layout (``model.pth``), its per-class
        table, ``metrics.json`` and ``config.yaml`` (collective: the weights come from every rank)."""
        state = online_full_state(self.engine)
        if not self.info.is_main:
            return
        module = self.engine.module
        buffers = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                   for k, v in module.state_dict().items() if k not in state}
        state = {k: v.float().cpu() for k, v in state.items()} | buffers
        meta = {"source": "bootmae-ds segment", "run_dir": str(self.run_dir.resolve()), "step": self.state.step,
                "miou": scores.miou, "macc": scores.macc, "aacc": scores.aacc, "images": images,
                "val": self.cfg.data.val, "num_classes": self.cfg.model.num_classes, "img_size": self.cfg.model.img_size,
                "init": self.provenance.get("run_dir") or self.provenance.get("file") or "random init",
                "which": self.cfg.init.which}
        out = self.run_dir / BEST
        tmp = self.run_dir / f".{BEST}.tmp"
        tmp.mkdir(exist_ok=True)
        torch.save({"state_dict": state, "meta": meta}, tmp / "model.pth")
        scores.write_table(tmp / "classes.md", self.class_names(), f"best: step {self.state.step}")
        (tmp / "metrics.json").write_text(json.dumps(meta, indent=1) + "\n")
        self.cfg.save(tmp / "config.yaml")
        if out.exists():
            old = self.run_dir / f".{BEST}.old"
            out.rename(old)
            tmp.rename(out)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.rename(out)



def segment(cfg: SegmentConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Train a segmentor with ``cfg`` into ``run_dir``; returns the process exit status."""
    return run_and_close(lambda: SegmentTrainer(cfg, run_dir, max_steps, resume))
