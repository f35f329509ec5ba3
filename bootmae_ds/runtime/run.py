"""What every trainer does around its loop: start-up line, run files, engine and resume, the
run state saved with each checkpoint, preemption, and the decision to stop.

Exit statuses shared by every training launcher: 0 finished, 75 preempted after a checkpoint
(requeue me), 3 stopped on non-finite losses (last good checkpoint left intact), 2 bad input.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .dist import DistInfo

EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class RunState:
    """Everything besides weights that a resume needs (saved in every checkpoint)."""

    step: int = 0
    samples: int = 0
    data: dict[str, Any] | None = None
    skipped_total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Preemption:
    """Turns SIGTERM / SIGUSR1 into a flag the loop checks at the end of each step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        print(f"received signal {signum}: saving a checkpoint after this step", flush=True)
        self.requested = True


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def announce(name: str, info: DistInfo) -> None:
    """One start-up line per rank: where it runs and whom it rendezvoused with."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[{name}] [rank {info.rank}/{info.world_size}] local rank {info.local_rank} on {node}, "
          f"device {info.device}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)


def checkpoint_dir(cfg: Any, run_dir: Path) -> Path:
    """``checkpoint.dir`` if set, else ``RUN/checkpoints``."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def save_run_files(info: DistInfo, run_dir: Path, cfg: Any, ds_config: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> None:
    """Rank 0 writes ``config.yaml``, ``ds_config.json`` and any ``extra`` JSON files."""
    if not info.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    for name, content in (extra or {}).items():
        (run_dir / name).write_text(json.dumps(content, indent=1, default=str) + "\n")


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, validated; ``load`` restores it into the engine."""

    tag_dir: Path
    manifest: dict[str, Any]
    resized: bool  # saved by another world size: loaded through DeepSpeed's universal format

    def load(self, engine: Any, ema: Any) -> dict[str, Any]:
        """Restore engine, EMA shards and RNG; returns the saved run state (a collective)."""
        return ckpt.load_checkpoint(engine, ema, self.tag_dir, self.manifest)

    def describe(self) -> str:
        how = f" (resized from {self.manifest['world_size']} ranks)" if self.resized else ""
        return f"{self.tag_dir} at step {self.manifest['step']}{how}"


def start_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                 ckpt_dir: Path, resume: str, fingerprint: dict[str, Any], world_size: int,
                 allow_resize: bool) -> tuple[Any, Resume | None]:
    """Choose the checkpoint to resume (rank 0 decides), prepare a resized one, then build the
    DeepSpeed engine. Loading happens in ``Resume.load`` once the trainer built its EMA."""
    import deepspeed

    tag_dir, manifest = ckpt.choose_resume(ckpt_dir, resume, fingerprint, world_size, allow_resize)
    resized = ckpt.prepare_universal(tag_dir, manifest, world_size, ds_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, (Resume(tag_dir, manifest, resized) if tag_dir is not None else None)


def stop_status(trainer: Any, skipped_in_row: int) -> int | None:
    """The exit status when a trainer must stop after this step, else None: EXIT_NONFINITE after
    too many non-finite steps in a row, EXIT_PREEMPTED (after saving) when a rank got a signal.

    ``trainer`` has ``cfg``, ``info``, ``state``, ``ckpt_dir``, ``metrics``, ``preemption``,
    ``device`` and ``_save()``: every trainer does."""
    step = trainer.state.step
    if skipped_in_row > trainer.cfg.optim.max_skipped_in_row:
        if trainer.info.is_main:
            print(f"stopping: {skipped_in_row} optimizer steps in a row had non-finite gradients "
                  f"(step {step}); the last checkpoint in {trainer.ckpt_dir} is intact. Lower the lr, "
                  f"enable optim.clip_grad or check the data.", flush=True)
        trainer.metrics.close()
        return EXIT_NONFINITE
    if any_rank(trainer.preemption.requested, trainer.device):
        trainer._save()
        if trainer.info.is_main:
            print(f"preempted: checkpoint saved at step {step}; resume with --resume auto", flush=True)
        trainer.metrics.close()
        return EXIT_PREEMPTED
    return None


def run_and_close(make_trainer: Any) -> int:
    """Build a trainer, train, wait for every rank; always tear the process group down."""
    try:
        status = make_trainer().train()
        dist.barrier()
        return status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # without it rank 0 may abort at exit on gloo
