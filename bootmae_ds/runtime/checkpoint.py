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
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import InputError

MANIFEST = "manifest.json"
LATEST = "latest"
TAG_PREFIX = "step_"
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be resumed; the message names the file and what is wrong."""


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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MANIFEST).is_file()


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and is_complete(p)]
    return sorted(tags, key=lambda p: p.name)


def save_checkpoint(engine, ema, ckpt_dir: Path, step: int, run_state: dict[str, Any],
                    config: dict[str, Any], keep_last: int) -> Path:
    """Save on every rank; rank 0 seals it with the manifest, moves ``latest``, prunes old ones."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists() and not is_complete(tag_dir):
        shutil.rmtree(tag_dir)  # debris of an interrupted save of this very step
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"run_state": run_state}, save_latest=False)
    if ema is not None:  # the file name predates fine-tuning's model EMA; kept for old checkpoints
        torch.save(ema.state_dict(), tag_dir / f"momentum_rank{rank}.pt")
    torch.save(rng_state(), tag_dir / f"rank_state_{rank}.pt")
    dist.barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
        manifest = {"step": step, "world_size": world, "config": config, "files": files,
                    "run_state": run_state}
        _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1, default=str))
        _write_atomic(ckpt_dir / LATEST, tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_dir(old), ignore_errors=True)
    dist.barrier()
    return tag_dir


def find_resume_dir(ckpt_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from for ``--resume auto|never|PATH`` (call on one rank)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        if not is_complete(path):
            raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no {MANIFEST}); pick another")
        return path
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


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
    ensure_universal(tag_dir)
    ds_config["checkpoint"] = {"load_universal": True}
    return True


def validate_checkpoint(tag_dir: Path, config: dict[str, Any], world_size: int,
                        allow_resize: bool = False) -> dict[str, Any]:
    """Check a checkpoint before loading: files whole, same model/method, same world size
    (unless ``allow_resize``)."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{tag_dir / MANIFEST}: unreadable manifest ({err})") from None
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint {tag_dir.name}; resume from an older one")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path}: truncated or modified ({path.stat().st_size} bytes, {size} when saved); "
                f"resume from an older checkpoint with --resume PATH")
    saved, now = _flatten(manifest["config"]), _flatten(config)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
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
    EMA is consolidated from all old shards and re-sliced, and the RNG is left as
    seeded (per-rank streams of another world size do not carry over).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    resized = manifest["world_size"] != world
    source = universal_dir(tag_dir) if resized else tag_dir
    try:
        _, client = engine.load_checkpoint(str(source.parent), tag=source.name,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
    except Exception as err:  # DeepSpeed raises many types; the file name is what users need
        raise CheckpointError(f"{source}: DeepSpeed could not load it ({type(err).__name__}: {err})") from err
    if client is None:
        raise CheckpointError(f"{source}: DeepSpeed found no checkpoint to load there")
    if ema is not None:
        if resized:
            from .sharded_ema import consolidate_shards

            shards = [torch.load(tag_dir / f"momentum_rank{r}.pt", map_location="cpu")
                      for r in range(manifest["world_size"])]
            ema.load_full(consolidate_shards(shards))
        else:
            ema.load_state_dict(torch.load(tag_dir / f"momentum_rank{rank}.pt", map_location="cpu"))
    if not resized:
        set_rng_state(torch.load(tag_dir / f"rank_state_{rank}.pt", map_location="cpu", weights_only=False))
    return client["run_state"]
