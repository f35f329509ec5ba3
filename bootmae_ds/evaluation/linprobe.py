"""The linear probe's recipe as functions: the official lr schedule, scores, and the head trained
on cached features (the fast small-data option of ``launchers/linprobe.py``).

The official protocol (MAE's ``main_linprobe.py`` as BootMAE's ``scripts/linear/*.sh`` run it)
re-augments every image at every step through the frozen encoder; ``bootmae_ds.linprobe`` does
that. ``train_on_features`` instead trains the same head (:class:`bootmae_ds.models.ProbeHead`)
with the same LARS, batch, epochs and schedule on features extracted once from centre crops:
seconds instead of an encoder pass per step, no augmentation, features of the whole training set
in memory. Its numbers are a yardstick, not the protocol's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.classifier import ProbeHead
from .lars import LARS


def probe_lr(step: int, steps_per_epoch: int, peak: float, min_lr: float, warmup_epochs: float,
             epochs: int) -> float:
    """The lr of optimizer step ``step`` (0-based): MAE's per-iteration schedule
    (``lr_sched.adjust_learning_rate`` at epoch ``step / steps_per_epoch``): linear from 0 to
    ``peak`` over ``warmup_epochs``, then a half cosine to ``min_lr`` at ``epochs``."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-5 hits, cross-entropy sum, count]`` (float64) of a batch of logits."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), F.cross_entropy(logits.float(), labels, reduction="sum"),
                        torch.tensor(len(labels), device=logits.device)]).double()


def scores(sums: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 (%), mean loss and image count from summed :func:`hits`."""
    n = max(sums[3].item(), 1.0)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "images": int(sums[3].item())}


@torch.no_grad()
def evaluate_head(head: ProbeHead, features: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Scores of ``head`` (eval mode: BatchNorm running statistics) on fixed features."""
    was_training = head.training
    head.eval()
    sums = sum(hits(head(features[i: i + chunk]), labels[i: i + chunk]) for i in range(0, len(labels), chunk))
    head.train(was_training)
    return scores(sums)


def train_on_features(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int,
                      warmup_epochs: float, global_batch: int, micro_batch: int, base_lr: float,
                      lr_batch_divisor: int = 256, min_lr: float = 0.0, weight_decay: float = 0.0,
                      momentum: float = 0.9, trust_coefficient: float = 0.001, init_std: float = 0.01,
                      seed: int = 0, on_epoch: Callable[[int, ProbeHead, float, float], None] | None = None
                      ) -> ProbeHead:
    """A :class:`ProbeHead` trained on fixed ``features`` ``[N, D]`` as the official probe trains
    its head: LARS, ``lr = base_lr x batch / lr_batch_divisor``, warm-up + cosine per step, batches
    of ``global_batch`` (capped at N; the last partial one dropped) split into ``micro_batch``
    chunks whose BatchNorm statistics are their own (the official per-GPU batches), gradients
    accumulated. ``on_epoch(epoch, head, mean loss, lr)`` runs after every epoch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = features.device
    head = ProbeHead(features.shape[1], num_classes, init_std).to(device)
    batch = min(global_batch, len(features))
    micro = min(micro_batch, batch)
    steps_per_epoch = max(len(features) // batch, 1)
    peak = base_lr * batch / lr_batch_divisor
    opt = LARS(head.parameters(), lr=0.0, weight_decay=weight_decay, momentum=momentum,
               trust_coefficient=trust_coefficient)
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=g).to(device)
        loss_sum, lr = 0.0, 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            lr = probe_lr(step, steps_per_epoch, peak, min_lr, warmup_epochs, epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i * batch: (i + 1) * batch]
            chunks = idx.tensor_split(-(-batch // micro))  # near-equal chunks: none of a single image
            opt.zero_grad(set_to_none=True)
            for c in chunks:
                loss = F.cross_entropy(head(features[c]), labels[c]) / len(chunks)
                loss.backward()
                loss_sum += loss.item()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch, head, loss_sum / steps_per_epoch, lr)
    return head.eval()
