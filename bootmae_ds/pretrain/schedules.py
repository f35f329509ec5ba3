"""BootMAE's own schedules on top of lr and weight decay: the teacher's EMA momentum and the
feature-loss weight, both changing once per epoch (piecewise linear in the integer epoch), as
the official code does."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BootMAEConfig
from ..runtime.schedules import Schedules


@dataclass(frozen=True)
class PretrainSchedules(Schedules):
    """lr, weight decay, teacher momentum and feature weight of one pre-training run."""

    cfg: BootMAEConfig

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
