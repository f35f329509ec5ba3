"""Run under ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2``: each rank streams two epochs of the
loader, checks a mid-epoch rebuild in place, and rank 0 writes every rank's keys (and the processes
each rank started: its fork server and loader workers, which must not outlive it) to
OUT/result.json.

    python tests/dist_scripts/data_ranks.py MANIFEST OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil
import torch
import torch.distributed as dist

from bootmae_ds.config import load_config
from bootmae_ds.data import build_train_loader
from bootmae_ds.runtime.dist import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out", type=Path)
    parser.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = parser.parse_args()
    manifest, out = args.manifest, args.out
    info = init_distributed()  # as the trainers do (gloo on CPU ranks)
    rank, world = info.rank, info.world_size
    cfg = load_config("demo", [f"data.train={manifest}", "data.num_workers=2",
                               "data.micro_batch_size=4", "data.global_batch_size=8",
                               "data.shuffle_buffer=16"])
    loader = build_train_loader(cfg, rank=rank, world_size=world)
    epochs = [list(loader), list(loader)]
    resumed = build_train_loader(cfg, rank=rank, world_size=world,
                                 state=loader.state_dict() | {"epoch": 0, "batches": 3})
    rest = list(resumed)
    same = len(rest) == len(epochs[0]) - 3 and all(
        a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
        and torch.equal(a["masks"], b["masks"]) for a, b in zip(rest, epochs[0][3:]))
    # Every rank must have the same number of micro-batches, or a collective would hang here.
    counts = torch.tensor([len(e) for e in epochs])
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    started = [p.pid for p in psutil.Process().children(recursive=True)]
    mine = {"rank": rank, "counts": counts.tolist(), "resume_ok": same, "started": started,
            "keys": [[k for b in e for k in b["keys"]] for e in epochs]}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        result = {
            "world_size": world,
            "gathered_counts": [g.tolist() for g in gathered],
            "ranks": everyone,
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
