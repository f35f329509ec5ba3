"""``launchers/segment.py --eval-only --weights FILE``: score a segmentation checkpoint (a released
mmseg file such as ``BootMAE_Base_800_UperNet.pth``, or a run's ``RUN/best/model.pth``) on
``data.val`` with the config's evaluation (single scale, or ``eval.ratios``/``eval.flip``), on
every rank of the launch, each image scored once; fp32."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config.segment import SegmentConfig
from ..runtime.run import scoring_ranks
from .data import open_eval_source
from .model import build_segmentor, load_weights
from .trainer import evaluate


def evaluate_weights(cfg: SegmentConfig, run_dir: Path, weights: str | Path) -> int:
    """Score ``weights``; rank 0 prints the per-class table and writes ``RUN/eval_only.json`` and
    ``RUN/eval_only.md``. Returns the exit status."""
    with scoring_ranks(cfg.run.name) as info:
        model, _, _ = build_segmentor(cfg)  # the architecture; every weight comes from the file
        meta = load_weights(model, weights)
        model.to(info.device)
        scores, images = evaluate(model, cfg, open_eval_source(cfg), info.rank, info.world_size, info.device,
                                  torch.float32)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            title = f"{weights} on {images} images of {cfg.data.val}"
            scores.write_table(run_dir / "eval_only.md", None, title)
            record = {"weights": str(Path(weights).resolve()), "images": images, "world_size": info.world_size,
                      **scores.row(), "iou": scores.iou, "acc": scores.acc, "meta": meta}
            (run_dir / "eval_only.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
            print(scores.table(), flush=True)
            print(f"eval_miou {scores.miou:.2f}  eval_macc {scores.macc:.2f}  eval_aacc {scores.aacc:.2f}  "
                  f"({images} images, {info.world_size} rank(s))", flush=True)
    return 0
