"""What the training loader's worker start costs a rank: persistent workers from the fork server
(now) vs workers forked from the rank at every epoch start (until 2026-12).

Run as a rank would: torch imported, a thread running, the loader built and iterated at once (the
worst case: nothing overlaps the fork server's start). Prints, for ``--workers`` workers on the
demo data (``--epochs`` epochs of ``--batch`` images):
  server_cpu_s     CPU seconds (user + sys) the fork server spent starting (its imports)
  first_batch_s    build_train_loader -> the first batch (includes waiting for the server)
  epoch_start_s    median wait for the first batch of each later epoch
  epoch_s          median time of a whole later epoch
  forks_after_first_batch  forks the rank took after its first batch (os.register_at_fork)
  server/worker MB RSS, USS (the process's own pages) and PSS (shared pages split) in MiB

    python bench/worker_start.py [--workers 2] [--epochs 4] [--batch 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch
from torch.utils.data import DataLoader

from bootmae_ds.config import load_config
from bootmae_ds.data.loader import build_train_loader

FORKS = [0]
os.register_at_fork(after_in_parent=lambda: FORKS.__setitem__(0, FORKS[0] + 1))


def memory(pids: list[int]) -> dict[str, float]:
    """Mean RSS, USS and PSS (MiB) of ``pids``."""
    info = [psutil.Process(p).memory_full_info() for p in pids]
    return {k: round(statistics.mean(getattr(i, k) for i in info) / 2**20, 1) for k in ("rss", "uss", "pss")}


def persistent(cfg, epochs: int) -> dict[str, object]:
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, rank=0, world_size=1)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    forks = FORKS[0]
    server = next(p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline()))
    cpu = server.cpu_times()
    workers = [w.pid for w in loader._workers._iterator._workers]
    out = {"server_cpu_s": round(cpu.user + cpu.system, 2), "first_batch_s": round(first, 2),
           "server_mb": memory([server.pid]), "worker_mb": memory(workers)}
    for _ in it:
        pass
    starts, whole = [], []
    for _ in range(epochs - 1):
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        starts.append(time.perf_counter() - t0)
        for _ in it:
            pass
        whole.append(time.perf_counter() - t0)
    out |= {"epoch_start_s": round(statistics.median(starts), 3), "epoch_s": round(statistics.median(whole), 3),
            "forks_after_first_batch": FORKS[0] - forks}
    out["old_fork_per_epoch"] = fork_baseline(loader, epochs)
    loader.close()
    return out


def fork_baseline(loader, epochs: int) -> dict[str, object]:
    """The old way: a new DataLoader forked from this process at every epoch start."""
    forks, starts, whole = FORKS[0], [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        it = iter(DataLoader(dataclasses.replace(loader.dataset, epoch=epoch, start=0), batch_size=None,
                             num_workers=loader.num_workers, multiprocessing_context="fork"))
        next(it)
        starts.append(time.perf_counter() - t0)
        mem = memory([w.pid for w in it._workers])
        for _ in it:
            pass
        whole.append(time.perf_counter() - t0)
    return {"first_batch_s": round(starts[0], 2), "epoch_start_s": round(statistics.median(starts[1:]), 3),
            "epoch_s": round(statistics.median(whole[1:]), 3),
            "forks_after_first_batch": FORKS[0] - forks - loader.num_workers, "worker_mb": mem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    cfg = load_config("demo", [f"data.num_workers={args.workers}", f"data.micro_batch_size={args.batch}",
                               f"data.global_batch_size={args.batch}"])
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()  # a rank has threads
    result = {"workers": args.workers, "rank_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
              "torch": torch.__version__, "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]}
    result |= persistent(cfg, args.epochs)
    stop.set()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
