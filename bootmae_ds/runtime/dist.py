"""One distributed set-up for every launcher: read the environment, initialise, describe.

- ``deepspeed`` and ``torchrun`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
- ``srun`` (one task per device, ``launchers/slurm/pretrain.sbatch``) exports SLURM_PROCID /
  SLURM_NTASKS / SLURM_LOCALID; the master is the first host of the job's node list and the
  port is derived from the job id unless MASTER_ADDR / MASTER_PORT are exported.
- A plain ``python`` start exports none of them and is a world of one.

Anything in between (a partial set, an sbatch script that forgot ``srun``) is an error, never a
silent fallback to world size 1.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import InputError

REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(InputError, RuntimeError):
    """The environment does not describe a usable process group."""


@dataclass(frozen=True)
class DistInfo:
    """Who this process is and where it computes."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    accelerator: str  # "cuda", "cpu", ... as DeepSpeed's accelerator names it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu-[07-09,12],cpu1`` -> ``gpu-07``."""
    first = nodelist.strip()
    depth = 0
    for i, ch in enumerate(first):  # cut at the first top-level comma
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            first = first[:i]
            break
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_port(job_id: str) -> int:
    """A port that differs between concurrent jobs (20000-39999, from the job id)."""
    return 20000 + int(job_id) % 20000


def _from_slurm(env: dict[str, str]) -> dict[str, str]:
    if "SLURM_STEP_ID" not in env:
        raise DistributedSetupError(
            f"inside a SLURM allocation of {env['SLURM_NTASKS']} tasks but not in an srun step; "
            f"start the training with srun, one task per device (launchers/slurm/pretrain.sbatch)")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in env and not nodelist:
        raise DistributedSetupError("srun task without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master")
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" not in env:
        raise DistributedSetupError("srun task without SLURM_JOB_ID or MASTER_PORT: cannot choose a port")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env["SLURM_JOB_ID"])),
    }


def resolve_env(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables for ``env`` (see the module docstring)."""
    present = [k for k in REQUIRED if k in env]
    if len(present) == len(REQUIRED):
        out = {k: env[k] for k in REQUIRED}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in env:
        out = _from_slurm(env)
    elif present:
        missing = [k for k in REQUIRED if k not in env]
        raise DistributedSetupError(
            f"distributed environment is incomplete: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; launch with `deepspeed`, `torchrun` or srun, which set all of them")
    else:
        return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    world, rank, local = int(out["WORLD_SIZE"]), int(out["RANK"]), int(out["LOCAL_RANK"])
    if not 0 <= rank < world or local < 0:
        raise DistributedSetupError(f"RANK={rank} / LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    return out


SHM_DIR = Path("/dev/shm")


def shm_buffer_name(rank: int) -> str:
    """The POSIX shared-memory name DeepSpeed's CPU backend gives ``rank``'s all-reduce buffer."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank}")


def _unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's DeepSpeed shared-memory name once every rank has mapped it.

    DeepSpeed's CPU backend maps a ~69 MB /dev/shm buffer per rank at start-up and never unlinks
    it: every CPU run leaks RAM-backed files, and a later job on the same port can open a stale
    buffer and hang. The peers open the buffers before ``init_distributed`` returns, so after a
    barrier the names can go while the mappings stay valid until the processes exit.
    """
    import torch.distributed as dist

    dist.barrier()
    (SHM_DIR / shm_buffer_name(rank)).unlink(missing_ok=True)


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed with the accelerator's backend."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.update(resolve_env(dict(os.environ)))
    accel = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    name = accel.device_name()
    if name != "cpu":
        accel.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    if name == "cpu":
        _unlink_shm_buffer(int(os.environ["RANK"]))
    device = torch.device(accel.device_name(local_rank) if name != "cpu" else "cpu")
    return DistInfo(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device, name)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` on rank 0, in rank order (None on the other ranks; a
    collective). Without a process group of more than one rank: ``[obj]``. Detections and other
    results of uneven size per rank go this way; tensors of one shape are better all-gathered."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s persistent buffers of ``module`` (BatchNorm running statistics):
    DDP's ``broadcast_buffers``, before an evaluation that must score the same model on every rank
    (a collective; nothing to do in a world of one)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    saved = module.state_dict(keep_vars=True).keys()  # persistent buffers and parameters
    for name, buffer in module.named_buffers():
        if name in saved:
            dist.broadcast(buffer, src=src)
