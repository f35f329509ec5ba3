"""The part of a trainer that every job shares, so that each job's trainer reads as its own story
(build, resume, loop, log, checkpoint) and does the common steps the same way.

A job's trainer subclasses :class:`JobTrainer`, calls :meth:`start` first and the other builders
as its ``__init__`` reaches them, and defines ``_fingerprint()``. The attributes it builds and
this class uses: ``cfg``, ``run_dir``, ``info``, ``device``, ``engine``, ``ema`` (what is saved
beside the engine: pre-training's teacher, fine-tuning's model EMA, or None), ``ckpt_dir``,
``accum``, ``state``, ``loader``, ``metrics``.
"""

from __future__ import annotations

import random
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
from .run import Preemption, Resume, RunState, announce, set_deterministic, stop_status
from .timing import StepClock, host_values_on


class JobTrainer:
    """Start-up, resume, the bookkeeping of an applied step, stopping and saving."""

    ema: Any = None
    state: RunState

    def start(self, cfg: Any, run_dir: Path) -> None:
        """Determinism, the distributed set-up and the start-up line, before anything else."""
        self.cfg, self.run_dir = cfg, run_dir
        set_deterministic(cfg.run.deterministic)
        self.info: DistInfo = init_distributed()
        self.device = self.info.device
        announce(cfg.run.name, self.info)

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
