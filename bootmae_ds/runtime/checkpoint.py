"""Atomic, exactly-resumable checkpoints: DeepSpeed ZeRO state + sharded EMA + run state.

Layout of ``RUN/checkpoints``::

    step_00001000/                       one checkpoint ("tag")
        mp_rank_00_model_states.pt       DeepSpeed: module, global step, client state
        *_zero_pp_rank_{r}_*optim_states.pt   DeepSpeed: fp32 master slices + Adam state
        momentum_rank{r}.pt              fp32 EMA slices (momentum encoder / model EMA), per rank
        rank_state_{r}.pt                RNG states, per rank
        manifest.json                    written last: step, config, world size, file sizes
    latest                               name of the newest complete tag

A checkpoint counts only once its ``manifest.json`` exists; ``latest`` moves only after that,
so a crash mid-save leaves the previous checkpoint untouched and ignorable debris behind.

A save that cannot complete (a full disk, a quota, an I/O error on any rank) raises
``CheckpointSaveError`` on every rank, after removing its partial directory: the previous
checkpoint and ``latest`` stay as they were. A checkpoint damaged later (a truncated or
unreadable file) is found by ``check_integrity`` (recorded sizes, zip CRCs): ``--resume auto``
then takes the newest one that is whole and moves the damaged one aside, never deleting it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import InputError
from ..config.base import dotted

MANIFEST = "manifest.json"
LATEST = "latest"
TAG_PREFIX = "step_"
TAG_PATTERN = re.compile(r"step_\d{8}")
UNIVERSAL_SUFFIX = "_universal"
DAMAGED_SUFFIX = ".damaged"
SPACE_MARGIN = 1.05  # zip headers and the manifest on top of the tensors' bytes


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be resumed; the message names the file and what is wrong."""


class CheckpointSaveError(RuntimeError):
    """A save that could not complete on every rank; nothing of it is left behind."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if accel.device_name() != "cpu":
        state["accelerator"] = accel.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MANIFEST).is_file()


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (damaged ones moved aside are not among them)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.fullmatch(p.name) and is_complete(p)]
    return sorted(tags, key=lambda p: p.name)


def _comm_device() -> torch.device:
    """Where collective tensors must live: the accelerator's device (NCCL takes no CPU tensors)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _sum_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return int(t.item())


def _any_failed(failed: bool) -> bool:
    """True on every rank when any rank failed (a collective)."""
    return _sum_over_ranks(1 if failed else 0) > 0


def estimate_bytes(engine, ema) -> int:
    """Bytes this rank writes into a checkpoint: its fp32 master slices and the two Adam moments,
    its EMA shard, and on rank 0 the module states (every parameter and buffer once)."""
    partitions = getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
    total = sum(3 * p.numel() * 4 for p in partitions)
    if ema is not None and hasattr(ema, "local_bytes"):
        total += ema.local_bytes
    if dist.get_rank() == 0:
        total += sum(t.numel() * t.element_size() for t in engine.module.state_dict().values())
    return total


def _check_space(ckpt_dir: Path, engine, ema) -> None:
    """Refuse a save that cannot fit, before writing anything (every rank gets the error)."""
    # ranks usually share one filesystem: the sum must fit
    needed = int(_sum_over_ranks(estimate_bytes(engine, ema)) * SPACE_MARGIN)
    free = [shutil.disk_usage(ckpt_dir).free] if dist.get_rank() == 0 else [0]
    dist.broadcast_object_list(free, src=0)
    if free[0] < needed:
        raise CheckpointSaveError(
            f"{ckpt_dir}: no room for the next checkpoint ({needed / 2**20:,.1f} MiB needed, "
            f"{free[0] / 2**20:,.1f} MiB free); the previous checkpoint is intact. Free space or set "
            f"checkpoint.dir to a larger filesystem, then rerun the same command to resume")


def save_checkpoint(engine, ema, ckpt_dir: Path, step: int, run_state: dict[str, Any],
                    config: dict[str, Any], keep_last: int, pause_before_seal: float = 0.0) -> Path:
    """Save on every rank; rank 0 seals it with the manifest, moves ``latest``, prunes old ones.
    ``pause_before_seal`` (a fault drill: ``debug.slow_save_s``) pauses between DeepSpeed's files
    and ours, widening the window in which a kill leaves a half-written checkpoint.

    Raises ``CheckpointSaveError`` on every rank when the save cannot complete anywhere; its
    partial directory is then removed and the previous checkpoint and ``latest`` are untouched.
    Failures are agreed on collectively, so no rank is left waiting in a collective.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    error: BaseException | None = None
    if rank == 0:
        try:
            if tag_dir.exists() and not is_complete(tag_dir):
                shutil.rmtree(tag_dir)  # debris of an interrupted save of this very step
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            error = err
    if _any_failed(error is not None):
        _abandon(tag_dir, rank, error)
    _check_space(ckpt_dir, engine, ema)
    if rank == 0:
        try:
            tag_dir.mkdir()
        except OSError as err:
            error = err
    if _any_failed(error is not None):
        _abandon(tag_dir, rank, error)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"run_state": run_state}, save_latest=False)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        error = err
        # Past DeepSpeed's tag check, a failed write leaves the other ranks in its final
        # barrier: meet them there, then agree on the failure below.
        dist.barrier()
    if error is None:
        time.sleep(pause_before_seal)
        try:
            if ema is not None:  # the file name predates fine-tuning's model EMA; kept for old checkpoints
                torch.save(ema.state_dict(), tag_dir / f"momentum_rank{rank}.pt")
            torch.save(rng_state(), tag_dir / f"rank_state_{rank}.pt")
        except (OSError, RuntimeError) as err:
            error = err
    if _any_failed(error is not None):
        _abandon(tag_dir, rank, error)
    if rank == 0:
        try:
            files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
            manifest = {"step": step, "world_size": world, "config": config, "files": files,
                        "run_state": run_state}
            _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1, default=str))
        except OSError as err:
            error = err
    if _any_failed(error is not None):
        _abandon(tag_dir, rank, error)
    if rank == 0:
        try:  # the checkpoint is complete: a failure from here on only leaves `latest` behind
            _write_atomic(ckpt_dir / LATEST, tag + "\n")
        except OSError as err:
            print(f"warning: {ckpt_dir / LATEST} not updated ({err}); --resume auto does not need it", flush=True)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_dir(old), ignore_errors=True)
    dist.barrier()
    return tag_dir


def _abandon(tag_dir: Path, rank: int, error: BaseException | None) -> None:
    """Remove a failed save's partial directory (rank 0) and raise on every rank, naming what
    failed where (the errors of all ranks are gathered, so rank 0's message names them)."""
    mine = f"rank {rank}: {type(error).__name__}: {error}" if error is not None else None
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()
    failures = [e for e in every if e is not None]
    more = f" and {len(failures) - 1} more rank(s)" if len(failures) > 1 else ""
    free = shutil.disk_usage(tag_dir.parent).free if tag_dir.parent.exists() else 0
    raise CheckpointSaveError(
        f"{tag_dir}: the checkpoint could not be written ({failures[0]}{more}; {free / 2**20:,.1f} MiB "
        f"free); its partial files were removed and the previous checkpoint is intact. Fix the storage, "
        f"then rerun the same command to resume")


def check_integrity(tag_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when they are whole: a readable
    manifest, every recorded file present at its recorded size, every zip record's CRC right
    (torch.save writes zip archives; a CRC catches damage that keeps the size)."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{tag_dir / MANIFEST}: unreadable manifest ({err})"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing from checkpoint {tag_dir.name}"
        if path.stat().st_size != size:
            return f"{path}: truncated or modified ({path.stat().st_size} bytes, {size} when saved)"
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
                return f"{path}: unreadable ({err})"
            if bad is not None:
                return f"{path}: damaged (CRC mismatch in {bad})"
        elif path.suffix == ".pt":
            return f"{path}: not a torch checkpoint archive"
    return None


def set_aside(tag_dir: Path, problem: str) -> Path | None:
    """Rename a damaged checkpoint ``step_X`` to ``step_X.damaged`` (kept, never deleted), so that
    the run can write a good ``step_X`` later; the reason goes into ``DAMAGED.txt`` beside it."""
    target = tag_dir.with_name(tag_dir.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        target, n = tag_dir.with_name(f"{tag_dir.name}{DAMAGED_SUFFIX}{n}"), n + 1
    try:
        os.replace(tag_dir, target)
        (target / "DAMAGED.txt").write_text(problem + "\n")
    except OSError as err:
        print(f"warning: could not move the damaged {tag_dir} aside ({err}); it stays in place", flush=True)
        return None
    return target


def find_resume_dir(ckpt_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from for ``--resume auto|never|PATH`` (call on one rank).

    ``auto`` takes the newest complete checkpoint whose files are whole; damaged newer ones are
    named in a warning and moved aside. An explicit PATH that is damaged is refused."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        if not is_complete(path):
            raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no {MANIFEST}); pick another")
        problem = check_integrity(path)
        if problem:
            raise CheckpointError(f"{problem}; resume from another checkpoint with --resume PATH")
        return path
    damaged: list[tuple[Path, str]] = []
    for tag_dir in reversed(complete_tags(ckpt_dir)):
        problem = check_integrity(tag_dir)
        if problem is None:
            for bad, why in damaged:
                moved = set_aside(bad, why)
                print(f"warning: skipping damaged checkpoint {bad.name}: {why}; "
                      f"kept as {moved or bad}, resuming from {tag_dir.name}", flush=True)
            return tag_dir
        damaged.append((tag_dir, problem))
    if damaged:
        names = "; ".join(why for _, why in damaged)
        raise CheckpointError(f"{ckpt_dir}: every checkpoint is damaged ({names}); nothing was deleted. "
                              f"Restore one, or start afresh with --resume never in a new output directory")
    return None


def choose_resume(ckpt_dir: Path, resume: str, config: dict[str, Any], world_size: int,
                  allow_resize: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume and its validated manifest: rank 0 decides, every rank gets it."""
    choice = [str(find_resume_dir(ckpt_dir, resume) or "")] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(choice, src=0)
    if not choice[0]:
        return None, None
    tag_dir = Path(choice[0])
    return tag_dir, validate_checkpoint(tag_dir, config, world_size, allow_resize=allow_resize)


def prepare_universal(tag_dir: Path | None, manifest: dict[str, Any] | None, world_size: int,
                      ds_config: dict[str, Any]) -> bool:
    """When the checkpoint to resume was saved by another world size: convert it to DeepSpeed's
    universal format and tell ``ds_config`` to load that; returns whether it did."""
    if manifest is None or manifest["world_size"] == world_size:
        return False
    if not ds_config.get("zero_optimization", {}).get("stage", 0):
        return True  # no ZeRO (the linear probe's head): every rank's state is whole, loads as it is
    ensure_universal(tag_dir)
    ds_config["checkpoint"] = {"load_universal": True}
    return True


def validate_checkpoint(tag_dir: Path, config: dict[str, Any], world_size: int,
                        allow_resize: bool = False) -> dict[str, Any]:
    """Check a checkpoint before loading: files whole, same model/method, same world size
    (unless ``allow_resize``). Config keys a checkpoint predates are not compared."""
    problem = check_integrity(tag_dir)
    if problem:
        raise CheckpointError(f"{problem}; resume from an older checkpoint with --resume PATH")
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    saved, now = dotted(manifest["config"]), dotted(config)
    differ = sorted(k for k in saved if saved[k] != now.get(k))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:10])
        raise CheckpointError(f"{tag_dir}: saved with a different model/method config ({details}); "
                              f"resume with the run's config.yaml or start a new output directory")
    if manifest["world_size"] != world_size and not allow_resize:
        raise CheckpointError(
            f"{tag_dir}: saved by {manifest['world_size']} ranks, resuming with {world_size}; relaunch "
            f"with {manifest['world_size']} ranks, or add `--set checkpoint.allow_resize=true` to convert "
            f"it to DeepSpeed's universal format (python -m deepspeed.checkpoint.ds_to_universal) and "
            f"continue from the next epoch boundary of the data")
    return manifest


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)


def ensure_universal(tag_dir: Path) -> Path:
    """Convert ``tag_dir`` to DeepSpeed's universal format once (rank 0), atomically."""
    out = universal_dir(tag_dir)
    if dist.get_rank() == 0 and not (out / "mp_rank_00_model_states.pt").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"converting {tag_dir} to the universal format in {out}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
             "--output_folder", str(tmp), "--inject_missing_state"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"{tag_dir}: universal conversion failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    dist.barrier()
    return out


def load_checkpoint(engine, ema, tag_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Restore engine, EMA shards and RNG; returns the saved run state.

    When the world size changed, the engine loads the universal conversion of ``tag_dir``, the
    EMA is re-sliced from the old shards (``ShardedEMA.load_resliced``), and the RNG is left as
    seeded (per-rank streams of another world size do not carry over).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    resized = manifest["world_size"] != world
    source = universal_dir(tag_dir) if resized and engine.zero_optimization() else tag_dir
    try:
        _, client = engine.load_checkpoint(str(source.parent), tag=source.name,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
    except Exception as err:  # DeepSpeed raises many types; the file name is what users need
        raise CheckpointError(f"{source}: DeepSpeed could not load it ({type(err).__name__}: {err})") from err
    if client is None:
        raise CheckpointError(f"{source}: DeepSpeed found no checkpoint to load there")
    if ema is not None:
        if resized:  # each rank reads rank 0's shard (the old layout) and those holding its slices
            ema.load_resliced(lambda r: torch.load(tag_dir / f"momentum_rank{r}.pt", map_location="cpu"))
        else:
            ema.load_state_dict(torch.load(tag_dir / f"momentum_rank{rank}.pt", map_location="cpu"))
    if not resized:
        set_rng_state(torch.load(tag_dir / f"rank_state_{rank}.pt", map_location="cpu", weights_only=False))
    return client["run_state"]
