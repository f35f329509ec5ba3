"""Linear probing of a frozen encoder: mean-pooled tokens of one block, BatchNorm without affine
parameters, a linear head, SGD with momentum (lr = base_lr x batch / 256, cosine), top-1.

The encoder is frozen and the probe sees each image once per epoch without augmentation, so the
features are extracted once and the head trains on them: seconds instead of a pass through the
encoder every epoch. (The official probe re-augments every epoch; this is the cheap yardstick.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.labelled import LabelledImages
from .knn import extract_features


@dataclass(frozen=True)
class ProbeSettings:
    """The probe's recipe; defaults follow the official linear probing (blr 0.1, no decay)."""

    block: int | None = None  # 1-based block whose output is pooled; None = last (+ final norm)
    epochs: int = 90
    batch_size: int = 1024
    base_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


def train_probe(train: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                settings: ProbeSettings) -> nn.Module:
    """BatchNorm1d(affine=False) + Linear trained with SGD on fixed features."""
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    head = nn.Sequential(nn.BatchNorm1d(train.shape[1], affine=False, eps=1e-6), nn.Linear(train.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    batch = min(settings.batch_size, len(train))
    lr = settings.base_lr * batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(train) // batch)
    total = settings.epochs * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train), generator=g)
        idx = order[(step % steps_per_epoch) * batch: (step % steps_per_epoch + 1) * batch]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = loss_fn(head(train[idx]), train_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def probe_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    logits = head(features)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(dim=1).float().mean().item()}


def linear_probe(encoder: torch.nn.Module, train: LabelledImages, val: LabelledImages, mean: tuple[float, ...],
                 std: tuple[float, ...], settings: ProbeSettings = ProbeSettings()) -> dict[str, float]:
    """Train the probe on ``train`` and return its top-1/top-5 (%) on ``val``."""
    f_train = extract_features(encoder, train.images, mean, std, block=settings.block)
    f_val = extract_features(encoder, val.images, mean, std, block=settings.block)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    head = train_probe(f_train, train.labels, num_classes, settings)
    return {**probe_accuracy(head, f_val, val.labels),
            "train_top1": probe_accuracy(head, f_train, train.labels)["top1"]}
