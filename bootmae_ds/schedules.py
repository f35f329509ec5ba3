"""Every schedule as a pure function of the global optimizer step (resume needs only the step).

The formulas are the official ones: lr rises linearly from 0 over the warm-up (``linspace(0,
peak, W)``), then follows a cosine to ``min_lr``; weight decay follows a cosine from
``weight_decay`` to ``weight_decay_end``; EMA momentum and the feature-loss weight change once
per epoch (piecewise linear in the integer epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import BootMAEConfig


@dataclass(frozen=True)
class Schedules:
    """The schedules of one run, for a fixed number of optimizer steps per epoch."""

    cfg: BootMAEConfig
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
        end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        t = min(step, self.total_steps) / max(self.total_steps, 1)
        return end + 0.5 * (o.weight_decay - end) * (1 + math.cos(math.pi * t))

    def ema_momentum(self, epoch: int) -> float:
        """The official per-epoch EMA momentum (before any teacher policy is applied)."""
        m = self.cfg.momentum
        if epoch < m.mid_epoch:
            return m.start + epoch / m.mid_epoch * (m.mid - m.start)
        if not m.dynamic:
            return m.mid
        span = m.end_epoch - m.mid_epoch
        if span == 0:
            return m.end
        return m.mid + min(span, epoch - m.mid_epoch) / span * (m.end - m.mid)

    def momentum(self, step: int) -> float:
        """Momentum of the teacher update that follows optimizer step ``step`` (0-based).

        1.0 leaves the teacher unchanged, 0.0 copies the online encoder into it.
        """
        m = self.cfg.momentum
        epoch = self.epoch(step)
        if m.policy == "frozen":
            return 1.0
        if m.policy == "hard_copy":
            period = m.copy_every_epochs * self.steps_per_epoch
            return 0.0 if (step + 1) % period == 0 else 1.0
        if m.policy == "ema_after_warmup" and epoch < m.warmup_epochs:
            return 0.0  # track the online encoder so the EMA starts from it
        return self.ema_momentum(epoch)

    def feature_weight(self, step: int) -> float:
        """lambda(t): ramps from 0 to ``loss.feature_weight`` over ``feature_ramp_fraction``."""
        loss, m = self.cfg.loss, self.cfg.momentum
        epoch = self.epoch(step)
        if not self.cfg.model.feature_decoder.enabled:
            return 0.0
        if m.policy == "ema_after_warmup" and epoch < m.warmup_epochs:
            return 0.0
        if loss.feature_ramp_fraction == 0:
            return loss.feature_weight
        ramp = self.cfg.schedule.epochs * loss.feature_ramp_fraction
        return loss.feature_weight * min(1.0, (epoch + 1) / ramp)
