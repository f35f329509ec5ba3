"""The learning-rate and weight-decay schedules as pure functions of the global optimizer step
(resume needs only the step).

The formulas are the official ones: lr rises linearly from 0 over the warm-up (``linspace(0,
peak, W)``), then follows a cosine to ``min_lr``; weight decay follows a cosine from
``weight_decay`` to ``weight_decay_end`` (constant when that is unset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedules:
    """The schedules of one run, for a fixed number of optimizer steps per epoch.

    ``cfg`` is any job's tree with ``schedule.{epochs, warmup_epochs}``,
    ``optim.{base_lr, lr_batch_divisor, min_lr, weight_decay}`` and ``data.global_batch_size``.
    """

    cfg: Any
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.cfg.schedule.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return int(round(self.cfg.schedule.warmup_epochs * self.steps_per_epoch))

    @property
    def peak_lr(self) -> float:
        o = self.cfg.optim
        return o.base_lr * self.cfg.data.global_batch_size / o.lr_batch_divisor

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        warm, total, peak = self.warmup_steps, self.total_steps, self.peak_lr
        if step < warm:
            return peak * step / (warm - 1) if warm > 1 else peak
        span = max(total - warm, 1)
        i = min(step - warm, span)
        floor = self.cfg.optim.min_lr
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * i / span))

    def weight_decay(self, step: int) -> float:
        o = self.cfg.optim
        end = getattr(o, "weight_decay_end", None)
        end = o.weight_decay if end is None else end
        t = min(step, self.total_steps) / max(self.total_steps, 1)
        return end + 0.5 * (o.weight_decay - end) * (1 + math.cos(math.pi * t))


def step_decay_lr(step: int, peak: float, steps_per_epoch: int, decay_epochs: list[int], factor: float,
                  warmup_steps: int = 0, warmup_ratio: float = 1.0) -> float:
    """mmdetection's step schedule of optimizer step ``step`` (0-based): ``peak`` times ``factor``
    for each epoch of ``decay_epochs`` already completed (epoch index ``step // steps_per_epoch``
    at or past it), times the linear warm-up factor ``1 - (1 - step / warmup_steps) (1 -
    warmup_ratio)`` during the first ``warmup_steps`` steps ("1x": decay after epochs 8 and 11)."""
    epoch = step // steps_per_epoch
    lr = peak * factor ** sum(epoch >= e for e in decay_epochs)
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr
