"""One distributed set-up for every launcher: read the environment, initialise, describe.

``deepspeed`` and ``torchrun`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; a plain ``python`` start exports none of them and is a world of one. A partial
set is an error, never a silent fallback to world size 1.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(RuntimeError):
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


def resolve_env(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables for ``env``: as given, or a single local process."""
    present = [k for k in REQUIRED if k in env]
    if not present:
        ntasks = int(env.get("SLURM_NTASKS", "1"))
        if ntasks > 1:
            raise DistributedSetupError(
                f"SLURM started {ntasks} tasks but none has RANK/WORLD_SIZE set; start one "
                f"`deepspeed` node launcher per node (launchers/slurm/) or use torchrun"
            )
        return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    missing = [k for k in REQUIRED if k not in env]
    if missing:
        raise DistributedSetupError(
            f"distributed environment is incomplete: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; launch with `deepspeed` or `torchrun`, which set all of them"
        )
    world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    if not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} is outside WORLD_SIZE={world}")
    out = {k: env[k] for k in REQUIRED}
    out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
    return out


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
    device = torch.device(accel.device_name(local_rank) if name != "cpu" else "cpu")
    return DistInfo(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device, name)
