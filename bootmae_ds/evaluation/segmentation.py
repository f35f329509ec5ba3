"""Semantic segmentation scores from a confusion matrix: mIoU, mAcc, aAcc and per-class IoU/Acc.

The numbers of mmseg 0.x's ``mean_iou`` (what the official ``tools/test.py --eval mIoU`` prints):
pixels labelled ``ignore_index`` are left out; per class, IoU = intersection / union and Acc =
intersection / labelled pixels over the whole set (not averaged per image); mIoU and mAcc are the
means over the classes that have a defined value (NaN-mean: a class absent from both the labels
and the predictions has no IoU), aAcc = correct pixels / labelled pixels. A confusion matrix
(rows: label, columns: prediction) holds all of it, and matrices of disjoint image sets add up,
so every rank counts its share and one all-reduce gives the whole set's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``[K, K]`` int64 counts of (label row, predicted column) over the pixels whose label is not
    ``ignore_index``; ``pred`` and ``label`` are integer tensors of one shape."""
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def all_reduce_confusion(matrix: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's matrix (int64; exact at any set size), on every rank."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(matrix)
    return matrix


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix; per-class values are NaN where undefined."""

    iou: list[float]  # per class, %
    acc: list[float]  # per class, %
    miou: float
    macc: float
    aacc: float
    pixels: int  # labelled pixels scored

    def row(self, prefix: str = "eval_") -> dict[str, float]:
        return {f"{prefix}miou": self.miou, f"{prefix}macc": self.macc, f"{prefix}aacc": self.aacc}

    def table(self, class_names: list[str] | None = None) -> str:
        """mmseg's per-class table as markdown (Class | IoU | Acc), then the summary line."""
        names = class_names or [str(i) for i in range(len(self.iou))]
        lines = ["| Class | IoU | Acc |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(i)} | {_fmt(a)} |" for n, i, a in zip(names, self.iou, self.acc)]
        lines += ["", "| Scope | mIoU | mAcc | aAcc |", "|---|---|---|---|",
                  f"| global | {_fmt(self.miou)} | {_fmt(self.macc)} | {_fmt(self.aacc)} |", ""]
        return "\n".join(lines)

    def write_table(self, path: Path, class_names: list[str] | None = None, title: str = "") -> None:
        """The table, written atomically."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text((f"# {title}\n\n" if title else "") + self.table(class_names))
        tmp.replace(path)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}"


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if len(kept) else float("nan")


def segmentation_scores(matrix: torch.Tensor) -> SegmentationScores:
    """mIoU, mAcc, aAcc (%) and the per-class IoU and Acc of a confusion matrix."""
    m = matrix.double().cpu()
    hits = m.diag()  # [K]
    labelled, predicted = m.sum(1), m.sum(0)
    union = labelled + predicted - hits
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, hits / union.clamp(min=1), nan) * 100
    acc = torch.where(labelled > 0, hits / labelled.clamp(min=1), nan) * 100
    total = float(labelled.sum())
    return SegmentationScores(iou.tolist(), acc.tolist(), _nanmean(iou), _nanmean(acc),
                              100 * float(hits.sum()) / total if total else float("nan"), int(total))
