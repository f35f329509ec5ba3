"""``mode: cached_features``: the fast yardstick for small data, not the official protocol.

Every rank extracts the probe features (the frozen encoder's first ``model.depth`` blocks, mean
pooling, affine-free LayerNorm) of its share of the centre-cropped training and held-out images;
the shares are gathered in sample order, then every rank trains the same :class:`ProbeHead` with
the same LARS, batch, epochs and schedule on the fixed features (identical work, no
communication; rank 0 writes). No augmentation, no checkpoints (it takes seconds to minutes), and
the training set's features (N x D fp32) are held in memory on every rank.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ..config import LinprobeConfig
from ..data.labelled import check_labels, open_eval_source
from ..evaluation.features import Normalise, extract_set_features
from ..evaluation.linprobe import evaluate_head, train_on_features
from ..models.classifier import ProbeHead
from ..runtime.dist import init_distributed
from ..runtime.ds_config import resolve_precision
from ..runtime.metrics import MetricsLogger
from ..runtime.run import DTYPES, announce, run_and_close
from .model import BEST, build_probe, write_best


class CachedProbe:
    """Extract once, train the head on the features, evaluate every ``eval.every_epochs`` epochs."""

    def __init__(self, cfg: LinprobeConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.info = init_distributed()
        announce(cfg.run.name, self.info)
        self.probe, self.pre, self.provenance = build_probe(cfg)
        c = cfg
        c.model.img_size = c.model.img_size or self.pre.model.img_size
        c.data.mean = c.data.mean or self.pre.data.mean
        c.data.std = c.data.std or self.pre.data.std
        self.export_probe = None
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
            (run_dir / "init.json").write_text(json.dumps(self.provenance, indent=1, default=str) + "\n")
            self.export_probe = copy.deepcopy(self.probe)
        self.dtype = DTYPES[resolve_precision(cfg, self.info.accelerator)]
        self.probe.encoder.to(self.info.device, self.dtype).eval()
        self.probe.fc_norm.to(self.info.device).eval()  # fp32: the features the head sees

    def _features(self, spec: str, limit: int | None):
        d, device = self.cfg.data, self.info.device
        normalise = Normalise(d.mean, d.std, device, self.dtype)  # type: ignore[arg-type]
        out = extract_set_features(lambda x: self.probe.forward_pooled(x).float(), open_eval_source(spec, self.cfg),  # type: ignore[arg-type]
                               normalise, self.cfg.model.img_size, d.eval_crop_pct, d.eval_batch_size, limit,  # type: ignore[arg-type]
                               min(d.num_workers, 4))
        check_labels(out.labels, self.cfg.model.num_classes, None)
        return out

    def train(self) -> int:
        c, start = self.cfg, time.perf_counter()
        train = self._features(c.data.train, c.data.num_samples)
        val = self._features(c.data.val, c.data.val_limit)
        if self.info.is_main:
            print(f"features: {tuple(train.features.shape)} train, {tuple(val.features.shape)} val "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        metrics = MetricsLogger(self.run_dir, c, c.schedule.epochs, self.info.is_main)
        best = {"top1": -1.0}
        epoch_start = [time.perf_counter()]

        def on_epoch(epoch: int, head: ProbeHead, loss: float, lr: float) -> None:
            done = epoch + 1
            elapsed = time.perf_counter() - epoch_start[0]
            row = {"epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": len(train.labels) / max(elapsed, 1e-9)}
            if done % c.eval.every_epochs == 0 or done == c.schedule.epochs:
                s = evaluate_head(head, val.features, val.labels)
                row.update({"eval_top1": s["top1"], "eval_top5": s["top5"], "eval_loss": s["loss"],
                            "eval_images": s["images"]})
                if s["top1"] > best["top1"]:
                    best.update(s, epoch=done)
                    if self.info.is_main:
                        provenance = {"source": "linprobe", "run_dir": str(self.run_dir.resolve()), "step": done,
                                      "epoch": done, "top1": s["top1"], "top5": s["top5"], "val": c.data.val,
                                      "which": c.init.which, "num_classes": c.model.num_classes, "mode": c.mode,
                                      "init": self.provenance.get("run_dir") or self.provenance.get("file")
                                      or "random init", "fingerprint": self.pre.fingerprint()}
                        write_best(self.run_dir / BEST, self.export_probe, head, self.pre, c, provenance)
                row["best_top1"] = best["top1"]
            metrics.log(done, row)
            epoch_start[0] = time.perf_counter()

        o = c.optim
        head = train_on_features(train.features, train.labels, c.model.num_classes, epochs=c.schedule.epochs,
                                 warmup_epochs=c.schedule.warmup_epochs, global_batch=c.data.global_batch_size,
                                 micro_batch=c.data.micro_batch_size, base_lr=o.base_lr,
                                 lr_batch_divisor=o.lr_batch_divisor, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 momentum=o.momentum, trust_coefficient=o.trust_coefficient,
                                 init_std=c.model.head_init_std, seed=c.run.seed, on_epoch=on_epoch)
        metrics.close()
        if self.info.is_main:
            final = evaluate_head(head, val.features, val.labels)
            print(json.dumps({"mode": c.mode, "init": self.provenance, "train": c.data.train, "val": c.data.val,
                              "depth": len(self.probe.encoder.blocks), "top1": final["top1"], "top5": final["top5"],
                              "best_top1": best["top1"], "best_epoch": best.get("epoch"),
                              "train_top1": evaluate_head(head, train.features, train.labels)["top1"]},
                             default=str), flush=True)
        return 0


def cached_probe(cfg: LinprobeConfig, run_dir: Path) -> int:
    """Run the cached-feature probe; returns the process exit status."""
    return run_and_close(lambda: CachedProbe(cfg, run_dir))
