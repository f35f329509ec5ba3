"""Fine-tuning: the build and the pieces of a step, evaluation and ``RUN/best``; the loop (resume,
log, checkpoint, keeping the best) is ``runtime.trainer.JobTrainer``'s.

Same engine, checkpoints, signals and logs as pre-training (``bootmae_ds.runtime``): ZeRO-2 with
a client AdamW whose groups carry layer-wise lr scales, an optional model EMA kept as sharded
fp32 (the momentum encoder's machinery, over the whole classifier), top-1/top-5 on the held-out
set every ``eval.every_epochs`` epochs and at the end, and ``RUN/best/`` holding the best
classifier (online or EMA) in timm's layout.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import FinetuneConfig
from ..config.common import inherit_from_pretraining
from ..data import build_train_loader
from ..data.labelled import LabelledTransform, check_labels, eval_batches, open_eval_source
from ..interop.encoders import EncoderExport
from ..interop.export import write_export
from ..models.classifier import ViTClassifier
from ..runtime.ds_config import build_ds_config, resolve_precision
from ..runtime.metrics import MetricsLogger, device_peak_tflops
from ..runtime.optim import adamw, layer_decay_groups, set_hyperparameters
from ..runtime.run import DTYPES, RunState, resume_fingerprint, run_and_close
from ..runtime.schedules import Schedules
from ..runtime.sharded_ema import ShardedEMA, online_full_state
from ..runtime.trainer import Candidate, JobTrainer
from .augment import DeviceAugment, soft_cross_entropy
from .model import build_classifier

BEST = "best"


@dataclass
class FinetuneState(RunState):
    """Pre-training's run state plus the best evaluation so far."""

    best_top1: float = -1.0
    best_epoch: int = -1
    best_which: str = ""


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, augment: DeviceAugment, device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy over every rank's share of the held-out set."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1 hits, top5 hits, loss sum, count
    for batch in batches:
        labels = batch["labels"].to(device)
        logits = model(augment.normalise(batch["images"].to(device)).to(dtype)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
                             torch.tensor(len(labels), device=device)]).double()
    dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "images": int(sums[3].item())}


class FinetuneTrainer(JobTrainer):
    """Holds the engine, the model EMA, the loaders and the run state."""

    best = "best_top1"

    def __init__(self, cfg: FinetuneConfig, run_dir: Path, max_steps: int | None, resume: str) -> None:
        self.start(cfg, run_dir)
        model, pre, self.provenance = build_classifier(cfg)
        inherit_from_pretraining(cfg, pre)
        self.pre = pre
        self.precision = resolve_precision(cfg, self.info.accelerator)
        self.dtype = DTYPES[self.precision]
        self.save_run(build_ds_config(cfg, self.info.world_size, self.precision), {"init.json": self.provenance})
        model.encoder.grad_checkpointing = cfg.run.activation_checkpointing
        if cfg.run.compile:
            model.compile()
        self.export_model = copy.deepcopy(model) if self.info.is_main else None  # fp32 CPU, for RUN/best
        ema_copy = copy.deepcopy(model) if cfg.ema.enabled else None
        optimizer = adamw(layer_decay_groups(model, cfg.optim.layer_decay), cfg.optim, self.device.type)
        self.seed_process_rngs()  # drop path, erasing, mixup: per rank
        resumed = self.build_engine(model, optimizer, resume)
        self.ema = ShardedEMA(self.engine, ema_copy, "", self.dtype) if ema_copy else None
        resized = self.resume_state(resumed, FinetuneState)
        mean, std = cfg.data.mean, cfg.data.std
        transform = LabelledTransform(cfg.model.img_size, cfg.run.seed, cfg.augment, mean)
        self.loader = self.train_loader(build_train_loader, resized, transform)
        self.schedules = Schedules(cfg, cfg.schedule.steps_per_epoch or max(len(self.loader) // self.accum, 1))
        self.steps_per_epoch = self.schedules.steps_per_epoch
        self.total_steps = min(self.schedules.total_steps, max_steps or self.schedules.total_steps)
        self.evaluation_every = self.steps_per_epoch * cfg.eval.every_epochs
        if self.ema is not None:
            self.step_update = lambda step: self.ema.update(cfg.ema.decay)
        self.augment = DeviceAugment(cfg, mean, std, self.device)
        self.val_source = open_eval_source(cfg.data.val, cfg)  # type: ignore[arg-type]
        self.metrics = MetricsLogger(run_dir, cfg, self.total_steps, self.info.is_main)
        self.peak = device_peak_tflops(cfg, self.device)
        self.watch(device_keys=("images", "labels"),
                   check=lambda b: check_labels(b["labels"], cfg.model.num_classes, b["keys"]))

    # -- build ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """The parts of the config a checkpoint must agree with to be resumed."""
        return resume_fingerprint(self.cfg, ("init", "model", "augment", "optim", "schedule", "ema"))

    # -- one step ---------------------------------------------------------------------------
    def hyperparameters(self, step: int) -> dict[str, float]:
        lr = self.schedules.lr(step)
        set_hyperparameters(self.engine.optimizer, lr, self.cfg.optim.weight_decay)
        return {"lr": lr}

    def micro_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, targets = self.augment(batch["images"], batch["labels"], batch["keys"])
        if self.poisoned_batch(batch):
            images = torch.full_like(images, float("nan"))  # the debug.nan_steps drill
        return {"loss": soft_cross_entropy(self.engine(images.to(self.dtype)), targets)}

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, row: dict[str, Any]) -> Candidate:
        """The online model and the EMA on the held-out set; the better one is the candidate."""
        step, per_epoch = self.state.step, self.steps_per_epoch
        scores = {"online": self._evaluate(self.engine.module)}
        if self.ema is not None:
            self.ema.gather()
            scores["ema"] = self._evaluate(self.ema.target)
        for which, s in scores.items():
            tag = "eval_" if which == "online" else "eval_ema_"
            row.update({f"{tag}top1": s["top1"], f"{tag}top5": s["top5"], f"{tag}loss": s["loss"]})
        which = max(scores, key=lambda k: scores[k]["top1"])
        if self.info.is_main:
            print(f"eval after step {step} (epoch {step / per_epoch:.2f}): " + "  ".join(
                f"{k} top-1 {s['top1']:.2f}% top-5 {s['top5']:.2f}% on {s['images']} images"
                for k, s in scores.items()), flush=True)
        return Candidate(scores[which]["top1"], {"best_which": which, "best_epoch": -(-step // per_epoch)},
                         lambda: self._write_best(which, scores[which]))

    def _evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        d = self.cfg.data
        batches = eval_batches(self.val_source, self.cfg.model.img_size, self.cfg.augment.eval_crop_pct,
                               self.info.rank, self.info.world_size, d.eval_batch_size, d.val_limit,
                               min(d.num_workers, 4))
        return evaluate(model, batches, self.augment, self.device, self.dtype)

    def _write_best(self, which: str, scores: dict[str, float]) -> None:
        """Export the best classifier (fp32, timm layout) to ``RUN/best`` atomically (collective)."""
        state = self.ema.full_state() if which == "ema" else online_full_state(self.engine)
        if not self.info.is_main:
            return
        model: ViTClassifier = self.export_model
        result = model.load_state_dict(state, strict=False)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if result.unexpected_keys or set(result.missing_keys) - frozen:  # only frozen ones may be absent
            raise RuntimeError(f"best-model export: gathered state does not fit the classifier ({result})")
        c = self.cfg
        pre = self.pre.model_copy(update={
            "model": self.pre.model.model_copy(update={"img_size": c.model.img_size}),
            "data": self.pre.data.model_copy(update={"mean": c.data.mean, "std": c.data.std})})
        provenance = {"source": "finetune", "run_dir": str(self.run_dir.resolve()), "step": self.state.step,
                      "epoch": self.state.best_epoch, "top1": scores["top1"], "top5": scores["top5"],
                      "val": c.data.val, "which": which, "num_classes": c.model.num_classes,
                      "init": self.provenance.get("run_dir") or self.provenance.get("file") or "random init",
                      "fingerprint": self.pre.fingerprint()}
        out = self.run_dir / BEST
        write_export(EncoderExport(model.encoder, pre, provenance, head=model.head, fc_norm=model.fc_norm),
                     out, force=True)
        (out / "metrics.json").write_text(json.dumps(provenance, indent=1) + "\n")



def finetune(cfg: FinetuneConfig, run_dir: Path, max_steps: int | None = None, resume: str = "auto") -> int:
    """Fine-tune with ``cfg`` into ``run_dir``; returns the process exit status."""
    return run_and_close(lambda: FinetuneTrainer(cfg, run_dir, max_steps, resume))
