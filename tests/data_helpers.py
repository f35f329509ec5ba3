"""Shared helpers of the data tests: small JPEG trees, shard builds, loader configs and process checks."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import psutil

from bootmae_ds.config import BootMAEConfig, load_config
from bootmae_ds.data.builder import BuildOptions, build_shards
from bootmae_ds.data.shards import Manifest
from bootmae_ds.data.sources import write_synthetic_folder


def make_shards(root: Path, num_classes: int = 3, per_class: int = 20, shard_samples: int = 9,
                size: tuple[int, int] = (40, 48)) -> Manifest:
    """An ImageFolder of synthetic JPEGs under ``root/src`` built into shards in ``root/shards``."""
    write_synthetic_folder(root / "src", num_classes, per_class, size=size)
    opts = BuildOptions(shard_samples=shard_samples, workers=1)
    return build_shards(root / "src", root / "shards", opts, progress=False, log=lambda m: None)


def loader_config(
    train: str | Path, *overrides: str, workers: int = 2, batch: int = 4
) -> BootMAEConfig:
    """The demo preset (32 px, 8x8 patch grid) reading ``train`` with small batches."""
    return load_config(
        "demo",
        [
            f"data.train={train}",
            f"data.num_workers={workers}",
            f"data.micro_batch_size={batch}",
            f"data.global_batch_size={batch}",
            "data.shuffle_buffer=16",
            *overrides,
        ],
    )


def member_offsets(path: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of every member of a tar."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def still_running(pids: set[int], wait: float = 15.0) -> set[int]:
    """Those of ``pids`` still running (zombies count as ended) after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        alive = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
