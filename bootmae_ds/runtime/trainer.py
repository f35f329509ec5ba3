"""The part of a trainer that every job shares: start-up, resume, the training loop (written once,
here), the bookkeeping of an applied step, the evaluation cadence, keeping the best, stopping and
saving. Each job's trainer reads as its own story (build, then the pieces the loop asks for).

A job's trainer subclasses :class:`JobTrainer`, calls :meth:`start` first and the other builders
as its ``__init__`` reaches them, and defines ``_fingerprint()``. The attributes it builds and
this class uses: ``cfg``, ``run_dir``, ``info``, ``device``, ``engine``, ``ema`` (what is saved
beside the engine: pre-training's teacher, fine-tuning's model EMA, or None), ``ckpt_dir``,
``accum``, ``state``, ``loader``, ``metrics``, ``steps_per_epoch``, ``total_steps``.

What a job hands the loop (:meth:`train`):

- ``hyperparameters(step)``: set this step's hyperparameters on the optimizer; returns them for the
  row (``lr`` first; the others are appended after the step's own fields);
- ``micro_step(batch)``: what one micro-batch computes, as a dict of device tensors (the losses);
  the first is back-propagated, all are averaged over the micro-batches of the step;
- ``step_update`` (optional): what happens after an applied step (a momentum encoder's or a model
  EMA's update), timed on the device into the row's ``update_time_key`` when that is set;
- ``finish_row(row)`` (optional): fields of its own, added before the row is logged;
- ``evaluation_every`` and ``evaluate(row)`` (optional): the cadence in steps (the last step always
  evaluates) and what an evaluation scores into the row; ``best`` names the run-state field that
  keeps the best score (``Candidate.write`` then refreshes ``RUN/best``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .dist import DistInfo, init_distributed
from .prefetch import DevicePrefetcher
from .recovery import DataFaults, SpikeDetector, poisoned_batches, watch
from .run import (
    Preemption,
    Resume,
    RunState,
    announce,
    checkpoint_dir,
    save_run_files,
    set_deterministic,
    start_engine,
    stop_status,
)
from .timing import DeviceTimer, StepClock, host_values_on


@dataclass
class Candidate:
    """What an evaluation offers for ``RUN/best``: its ``score`` (the metric ``best`` keeps), the
    run-state fields recorded with a new best besides the score, and how to write ``RUN/best``
    (called on every rank: a gather of the weights is a collective)."""

    score: float
    record: dict[str, Any]
    write: Callable[[], None]


@dataclass
class StepSums:
    """What one optimizer step gathers over its micro-batches: the losses, summed on the device
    (a read per micro-batch would stall it every time), and the data layer's accounting."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    micro: int = 0
    faults: DataFaults = field(default_factory=DataFaults)

    def add(self, losses: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        for key, value in losses.items():
            value = value.detach().float()
            self.losses[key] = self.losses[key] + value if key in self.losses else value
        self.micro += 1
        self.faults.add(batch)

    def means(self) -> dict[str, torch.Tensor]:
        return {key: value / self.micro for key, value in self.losses.items()}


class JobTrainer:
    """Start-up, resume, the training loop, the bookkeeping of an applied step, evaluation
    cadence and the best so far, stopping and saving."""

    ema: Any = None
    state: RunState
    # -- the pieces a job hands in besides hyperparameters() and micro_step() (module docstring)
    step_update: Callable[[int], None] | None = None  # after an applied step, with its step number
    update_time_key: str | None = None  # the row field of step_update's device time
    evaluation_every: int | None = None  # steps between evaluations (None: the job does not evaluate)
    best: str | None = None  # the run-state field (and row field) keeping the best evaluation score
    best_is_max: bool = True  # False: lower is better (the state field's default must lose: inf)

    def start(self, cfg: Any, run_dir: Path) -> None:
        """Determinism, the distributed set-up and the start-up line, before anything else."""
        self.cfg, self.run_dir = cfg, run_dir
        set_deterministic(cfg.run.deterministic)
        self.info: DistInfo = init_distributed()
        self.device = self.info.device
        announce(cfg.run.name, self.info)

    def save_run(self, ds_config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Keep DeepSpeed's JSON, its accumulation steps and the checkpoint directory; rank 0
        writes the run files (``config.yaml``, ``ds_config.json`` and ``extra``'s JSON files)."""
        self.ds_config, self.accum = ds_config, ds_config["gradient_accumulation_steps"]
        self.ckpt_dir = checkpoint_dir(self.cfg, self.run_dir)
        save_run_files(self.info, self.run_dir, self.cfg, ds_config, extra)

    def build_engine(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, resume: str) -> Resume | None:
        """``self.engine`` (DeepSpeed's) and the checkpoint to resume, chosen against ``_fingerprint()``."""
        self.engine, resumed = start_engine(model, optimizer, self.ds_config, self.ckpt_dir, resume,
                                            self._fingerprint(), self.info.world_size,
                                            self.cfg.checkpoint.allow_resize)
        return resumed

    def seed_process_rngs(self) -> None:
        """Seed Python's, NumPy's and torch's global generators with ``run.seed`` and the rank: what
        drop path, dropout, proposal sampling and device-side augmentation draw from. Their states
        go into every checkpoint, so a resume continues each stream exactly."""
        seed = self.cfg.run.seed * 1000 + self.info.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def resume_state(self, resumed: Resume | None, state_class: type[RunState] = RunState) -> bool:
        """``self.state`` from the checkpoint ``resumed`` (a fresh one without); whether the
        checkpoint came from another world size (the data then restarts at an epoch boundary)."""
        self.state = state_class()
        if resumed is None:
            return False
        self.state = state_class(**resumed.load(self.engine, self.ema))
        if self.info.is_main:
            print(f"resumed from {resumed.describe()}", flush=True)
        return resumed.resized

    def train_loader(self, build: Callable[..., Any], resized: bool, transform: Callable | None = None) -> Any:
        """This rank's training loader (``bootmae_ds.data.build_train_loader``, handed in: the run
        machinery does not know the data layer) at the run state's data position."""
        loader = build(self.cfg, rank=self.info.rank, world_size=self.info.world_size,
                       state=None if resized else self.state.data, transform=transform)
        if resized and self.state.data:  # the sample layout changed: continue at an epoch boundary
            loader.start_at_next_epoch(self.state.data)
        return loader

    def watch(self, device_keys: tuple[str, ...], check: Callable[[dict[str, Any]], None] | None = None) -> None:
        """The device prefetcher (``check`` validates each batch on the host, before its copy),
        the NaN drill, the spike detector and the signal handlers."""
        self.batches = DevicePrefetcher(self.loader, self.device, keys=device_keys, check=check)
        self.last_batch: dict[str, Any] = {}
        self.poisoned = poisoned_batches(self.cfg.debug.nan_steps, self.accum, len(self.loader))
        self.spikes = SpikeDetector(self.cfg.optim.spike_factor, self.cfg.optim.spike_window)
        self.spikes.load_state_dict(self.state.recent_losses)
        self.preemption = Preemption()
        self.step_clock = StepClock()
        self.stop_agreed: bool | None = None  # the preemption flag of every rank, from step_row

    def poisoned_batch(self, batch: dict[str, Any]) -> bool:
        """Whether the ``debug.nan_steps`` drill poisons this micro-batch's inputs."""
        return (batch["epoch"], batch["index"]) in self.poisoned

    def count_step(self, batch: dict[str, Any], applied: bool) -> None:
        """The run state after an optimizer step that consumed up to ``batch``."""
        s = self.state
        s.step += 1
        s.samples += self.cfg.data.global_batch_size
        s.data = self.loader.position_after(batch)
        s.skipped_in_row = 0 if applied else s.skipped_in_row + 1
        s.skipped_total += 0 if applied else 1

    def step_row(self, losses: dict[str, torch.Tensor], faults: DataFaults, epoch: int, lr: float,
                 wait: float) -> dict[str, Any]:
        """The metrics row of an optimizer step, from its one collective and its one device read.

        One all-reduce carries this rank's ``losses`` (means, on the device; averaged over ranks),
        the damaged-data counts (summed), the engine's gradient norm (rank 0's: the same on every
        rank) and the preemption flag (any rank's, for ``_after_step``). Reading it back waits for
        every kernel of the step (optimizer and momentum update included), so the step time and
        img/s are measured to there (``step_clock``), not to when the host had queued them."""
        world = self.info.world_size
        host = [*faults.counts(), float(self.preemption.requested)]
        sums = torch.cat([torch.stack([v.float().reshape(()) for v in losses.values()]),
                          host_values_on(host, self.device), self._grad_norm()])
        dist.all_reduce(sums)
        values = sums.tolist()  # the step's one device read
        elapsed = self.step_clock.lap()
        n = len(losses)
        counts, (stop, norm) = values[n:-2], values[-2:]
        self.stop_agreed = stop > 0
        rate = self.cfg.data.global_batch_size / max(elapsed, 1e-9)
        row = {"epoch": epoch, **{k: v / world for k, v in zip(losses, values)}, "lr": lr,
               "skipped_steps": self.state.skipped_total, "samples": self.state.samples,
               "samples_per_s": rate, "samples_per_s_per_device": rate / world,
               "step_time_s": elapsed, "data_wait_s": wait, "grad_norm": norm}
        if self.device.type == "cuda":
            row["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            row["memory_gb"] = psutil.Process().memory_info().rss / 2**30
        faults.report(row, counts, self.info.is_main, self.state.source_samples)
        watch(row, self.spikes, self.state.step, len(self.state.rewinds), self.info.is_main)
        return row

    def _grad_norm(self) -> torch.Tensor:
        """The engine's gradient norm as ``[1]`` on the device, on rank 0 only (zero elsewhere): it
        is the same on every rank, and the row's all-reduce sums. DeepSpeed keeps it as a device
        tensor, or a float (inf after an overflow, None before the first step)."""
        norm = self.engine.get_global_grad_norm()
        if not self.info.is_main:
            return torch.zeros(1, device=self.device)
        if torch.is_tensor(norm):
            return norm.detach().float().reshape(1)
        return host_values_on([float(norm or 0.0)], self.device)

    # -- what a job hands in ------------------------------------------------------------------
    def hyperparameters(self, step: int) -> dict[str, float]:
        """Set optimizer step ``step``'s hyperparameters; returns them for its row, ``lr`` first."""
        raise NotImplementedError

    def micro_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch (on the device); the first one is back-propagated."""
        raise NotImplementedError

    def finish_row(self, row: dict[str, Any]) -> None:
        """Add the job's own fields to an optimizer step's row before it is logged."""

    def evaluate(self, row: dict[str, Any]) -> Candidate:
        """Evaluate (a collective), put the scores into ``row``; the candidate for ``RUN/best``."""
        raise NotImplementedError

    def step_applied(self) -> bool:
        """Whether the optimizer step just taken changed the weights (False: non-finite, skipped)."""
        return self.engine.was_step_applied()

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> int:
        """Run until the schedule ends, ``max_steps``, preemption or repeated non-finite losses."""
        if self.state.step >= self.total_steps and self.info.is_main:
            print(f"nothing to do: the run is at step {self.state.step} of {self.total_steps}", flush=True)
        sums, hyper = StepSums(), None
        self.step_clock.restart()
        while self.state.step < self.total_steps:
            for batch in self.batches:
                self.last_batch = batch
                step = self.state.step
                if hyper is None:
                    hyper = self.hyperparameters(step)
                self._micro_batch(batch, sums)
                self.batches.prefetch()  # the next batch travels while the backward pass runs
                before = self.engine.global_steps
                self.engine.step()
                if self.engine.global_steps == before:
                    continue  # inside gradient accumulation
                applied = self.step_applied()
                timer = self._update(step) if applied and self.step_update is not None else None
                self.count_step(batch, applied)
                evaluated = self._log_step(sums, hyper, step, timer)
                sums, hyper = StepSums(), None
                self.step_clock.restart()
                status = self._after_step(evaluated)
                if status is not None:
                    return status
                if self.state.step >= self.total_steps:
                    break
        self._save()
        self.metrics.close()
        return 0

    def _micro_batch(self, batch: dict[str, Any], sums: StepSums) -> None:
        """Forward and loss (the job's), the backward pass, the step's sums and data accounting."""
        losses = self.micro_step(batch)
        self.engine.backward(next(iter(losses.values())))
        sums.add(losses, batch)

    def _update(self, step: int) -> DeviceTimer:
        """``step_update`` after an applied step, timed on the device (read after step_row's sync)."""
        timer = DeviceTimer(self.device)
        timer.start()
        self.step_update(step)  # type: ignore[misc]
        timer.stop()
        return timer

    def _log_step(self, sums: StepSums, hyper: dict[str, float], step: int, timer: DeviceTimer | None) -> bool:
        """The step's row (its one collective and read), evaluation when due, the log line;
        whether it evaluated."""
        wait, self.batches.wait_s = self.batches.wait_s, 0.0
        row = self.step_row(sums.means(), sums.faults, step // self.steps_per_epoch, hyper["lr"], wait)
        row |= {key: value for key, value in hyper.items() if key != "lr"}
        if self.update_time_key is not None:
            row[self.update_time_key] = timer.seconds() if timer is not None else 0.0  # after step_row's sync
        self.finish_row(row)
        evaluated = self._maybe_evaluate(row)
        self.metrics.log(self.state.step, row)
        return evaluated

    def _maybe_evaluate(self, row: dict[str, Any]) -> bool:
        """Every ``evaluation_every`` steps and at the last: evaluate, keep the best; whether it ran."""
        step = self.state.step
        if self.evaluation_every is None or (step % self.evaluation_every and step != self.total_steps):
            return False
        found = self.evaluate(row)
        kept = getattr(self.state, self.best)
        if found.score > kept if self.best_is_max else found.score < kept:
            setattr(self.state, self.best, found.score)
            for name, value in found.record.items():
                setattr(self.state, name, value)
            found.write()
        row[self.best] = getattr(self.state, self.best)
        return True

    def _load(self, tag_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Restore weights, EMA and RNG from a checkpoint (a rewind); the saved run state."""
        return ckpt.load_checkpoint(self.engine, self.ema, tag_dir, manifest)

    def _fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def _save(self) -> None:
        if ckpt.is_complete(self.ckpt_dir / ckpt.tag_for(self.state.step)):
            return
        self.state.recent_losses = self.spikes.state_dict()
        ckpt.save_checkpoint(self.engine, self.ema, self.ckpt_dir, self.state.step, self.state.as_dict(),
                             self._fingerprint(), self.cfg.checkpoint.keep_last, self.cfg.debug.slow_save_s)

    def _after_step(self, evaluated: bool = False) -> int | None:
        """Stop (non-finite, preempted), rewind, or save when it is time; the exit status or None.
        The preemption flag comes from this step's ``step_row`` collective when it ran."""
        status = stop_status(self, self.stop_agreed)
        self.stop_agreed = None
        step = self.state.step
        due = evaluated or step % self.cfg.checkpoint.every_steps == 0
        if status is None and due and step < self.total_steps:
            self._save()
        return status
