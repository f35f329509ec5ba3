"""What every trainer does around its loop: start-up line, run files, engine and resume, the
run state saved with each checkpoint, preemption, and the decision to stop.

Exit statuses shared by every training launcher: 0 finished, 75 preempted after a checkpoint
(requeue me), 3 stopped on non-finite losses (last good checkpoint left intact), 4 a checkpoint
could not be written (storage full or failing; the previous one intact), 2 bad input.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .dist import DistInfo, init_distributed

EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4
# Fields of the optimizer sections that steer recovery, not the arithmetic: a resume may change them.
GUARD_FIELDS = ("max_skipped_in_row", "on_nonfinite", "max_rewinds", "spike_factor", "spike_window")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class RunState:
    """Everything besides weights that a resume needs (saved in every checkpoint)."""

    step: int = 0
    samples: int = 0
    data: dict[str, Any] | None = None
    skipped_total: int = 0
    skipped_in_row: int = 0
    rewinds: list[dict[str, Any]] = field(default_factory=list)  # one record per rewind
    recent_losses: list[float] = field(default_factory=list)  # the spike detector's window
    source_samples: dict[str, int] = field(default_factory=dict)  # a mixture's samples per source

    # What a rewind keeps from the moment it happens (the rest comes from the checkpoint).
    KEPT_ON_REWIND = ("skipped_total", "rewinds", "recent_losses")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kept_on_rewind(self) -> tuple[str, ...]:
        """``KEPT_ON_REWIND`` and every ``best_*`` field a job's state adds: ``RUN/best`` may already
        hold a later, better model than the checkpoint a rewind goes back to."""
        return (*self.KEPT_ON_REWIND, *(f.name for f in fields(self) if f.name.startswith("best_")))


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


def set_deterministic(on: bool) -> None:
    """``run.deterministic``: deterministic kernels (before the first CUDA kernel runs)."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at handle creation
    # warn_only: an op without a deterministic kernel warns instead of stopping a long run
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():
        deterministic_attention()


def deterministic_attention() -> None:
    """Attention through the math SDPA backend alone. The flash and cuDNN backends' backward
    accumulates with atomics (run to run differences at ViT-B sizes), and the memory-efficient one
    is deterministic only without ``warn_only``; math is matmuls and a softmax, deterministic
    with cuBLAS's fixed workspace. It costs speed and memory (the attention matrix is stored)."""
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)


def announce(name: str, info: DistInfo) -> None:
    """One start-up line per rank: where it runs and whom it rendezvoused with."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[{name}] [rank {info.rank}/{info.world_size}] local rank {info.local_rank} on {node}, "
          f"device {info.device}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)


@contextmanager
def scoring_ranks(name: str) -> Iterator[DistInfo]:
    """The ranks of a launch that only scores a file (``--eval-only``): every rank joins the process
    group and rank 0 prints the start-up line; on a normal exit the ranks wait for rank 0's result
    files, and the group is closed however the block ends."""
    info = init_distributed()
    try:
        announce(name, info)
        yield info
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_fingerprint(cfg: Any, sections: tuple[str, ...]) -> dict[str, Any]:
    """The parts of a job's config a checkpoint must agree with to be resumed: ``sections``
    (without the recovery knobs of ``optim``), the batch sizes, the data and the seed."""
    dump = cfg.model_dump(mode="json")
    out = {k: dump[k] for k in sections}
    if "optim" in out:
        out["optim"] = {k: v for k, v in out["optim"].items() if k not in GUARD_FIELDS}
    return out | {"data": {k: dump["data"][k] for k in ("global_batch_size", "micro_batch_size", "train")},
                  "seed": dump["run"]["seed"]}


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


def stop_status(trainer: Any, preempted: bool | None = None) -> int | None:
    """The exit status when a trainer must stop after this step, else None.

    After more than ``optim.max_skipped_in_row`` non-finite steps in a row: with
    ``optim.on_nonfinite=rewind`` (and rewinds left) the trainer is rewound and goes on, else
    EXIT_NONFINITE. When a rank got a signal: save, EXIT_PREEMPTED. ``preempted`` is that flag
    as every rank agreed on it already (the step's metrics collective); None asks the ranks now.

    ``trainer`` has ``cfg``, ``info``, ``state``, ``ckpt_dir``, ``metrics``, ``preemption``,
    ``device`` and ``_save()``; rewinding also needs ``loader``, ``last_batch`` (the micro-batch
    consumed last), ``_fingerprint()`` and ``_load(tag_dir, manifest)`` (restore weights, EMA and
    RNG; returns the saved run state).
    """
    state, optim = trainer.state, trainer.cfg.optim
    in_row = state.skipped_in_row
    if in_row > optim.max_skipped_in_row:
        rewinds_left = optim.on_nonfinite == "rewind" and len(state.rewinds) < optim.max_rewinds
        if rewinds_left and rewind(trainer):
            return None
        if trainer.info.is_main:
            why = (f"after {len(state.rewinds)} rewind(s), the most optim.max_rewinds allows"
                   if optim.on_nonfinite == "rewind" else "optim.on_nonfinite=stop")
            print(f"stopping: {in_row} optimizer steps in a row had non-finite gradients "
                  f"(step {state.step}; {why}); the last checkpoint in {trainer.ckpt_dir} is intact. "
                  f"Lower the lr, enable optim.clip_grad or check the data.", flush=True)
        trainer.metrics.close()
        return EXIT_NONFINITE
    if preempted is None:
        preempted = any_rank(trainer.preemption.requested, trainer.device)
    if preempted:
        trainer._save()
        if trainer.info.is_main:
            print(f"preempted: checkpoint saved at step {state.step}; resume with --resume auto", flush=True)
        trainer.metrics.close()
        return EXIT_PREEMPTED
    return None


def rewind(trainer: Any) -> bool:
    """Reload the newest complete checkpoint but keep the data stream where it is (past the
    window that failed); record it in the run state. False when there is no checkpoint."""
    state = trainer.state
    tag_dir, manifest = ckpt.choose_resume(trainer.ckpt_dir, "auto", trainer._fingerprint(),
                                           trainer.info.world_size, allow_resize=False)
    if tag_dir is None:
        if trainer.info.is_main:
            print(f"cannot rewind: no complete checkpoint in {trainer.ckpt_dir} yet", flush=True)
        return False
    saved = trainer._load(tag_dir, manifest)
    data = trainer.loader.position_after(trainer.last_batch)
    record = {"at_step": state.step, "to_step": saved["step"], "checkpoint": tag_dir.name,
              "data_epoch": data["epoch"], "data_batches": data["batches"],
              "skipped_in_row": state.skipped_in_row}
    keep = {name: getattr(state, name) for name in state.kept_on_rewind()}
    keep |= {"data": data, "skipped_in_row": 0, "rewinds": [*state.rewinds, record]}
    trainer.state = type(state)(**(saved | keep))
    if trainer.info.is_main:
        print(f"rewound: {record['skipped_in_row']} non-finite steps in a row at step {record['at_step']}; "
              f"reloaded {tag_dir.name} (step {record['to_step']}), data continues at epoch "
              f"{data['epoch']} micro-batch {data['batches']} (rewind {len(trainer.state.rewinds)} of "
              f"{trainer.cfg.optim.max_rewinds})", flush=True)
    return True


def run_and_close(make_trainer: Any) -> int:
    """Build a trainer, train, wait for every rank; always tear the process group down.
    A checkpoint that could not be written ends the run with EXIT_SAVE_FAILED."""
    try:
        try:
            status = make_trainer().train()
        except ckpt.CheckpointSaveError as err:  # raised on every rank, after cleaning up
            if dist.get_rank() == 0:
                print(f"error: {err}", flush=True)
            return EXIT_SAVE_FAILED
        dist.barrier()
        return status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # without it rank 0 may abort at exit on gloo
