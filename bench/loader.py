"""Loader throughput: our shard pipeline vs torchvision ImageFolder + PIL RandomResizedCrop.

Generates ImageNet-sized JPEGs (default 500x375, quality 90), builds shards from them (timing the
builder in copy mode), then measures images/s of one worker process (one thread) for:
  ours     shards -> torchvision.io decode -> RandomResizedCrop(224, bicubic) on uint8 -> flip
           -> BootMAE block mask -> uint8 batch (normalisation left to the accelerator)
  ours/if  the same pipeline reading the ImageFolder files instead of shards
  tv       torchvision ImageFolder -> PIL RandomResizedCrop(224, bicubic) -> flip -> ToTensor
           -> Normalize -> batch (the usual MAE/BEiT pipeline)
and the same with DataLoader(num_workers=W) to show multi-process scaling. Then a mixture:
  one      the shards of all the images (one source)
  two      the same images as two shard sets (classes 0-3, 4-7) mixed 1:1 (data.train a list)
measured in alternating rounds in this process, and their images/s ratio (target: within 5%).

    python bench/loader.py [--images 512] [--seconds 8] [--workers 2] [--only-mixture]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader

from bootmae_ds.config import load_config
from bootmae_ds.data.builder import BuildOptions, build_shards
from bootmae_ds.data.loader import build_train_loader
from bootmae_ds.data.sources import write_synthetic_folder


def timed(make_iter, seconds: float, batch: int) -> float:
    """Images/s of iterating fresh ``make_iter()`` epochs for at least ``seconds``."""
    return timed_both(make_iter, seconds, batch)[0]


def timed_both(make_iter, seconds: float, batch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of ``timed``."""
    next(iter(make_iter()))  # warm-up (imports, caches)
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for _ in make_iter():
            images += batch
    return images / (time.perf_counter() - start), images / max(time.process_time() - cpu, 1e-9)


def torchvision_loader(root: Path, batch: int, workers: int) -> DataLoader:
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True,
                      num_workers=workers, drop_last=True)


def mixture_part(a, src: Path, tmp: Path, shards: str, ours, results: dict[str, float]) -> None:
    """Two shard sets of the same images mixed 1:1 against one shard set of them all, one worker
    (this process), in alternating rounds so that both see the same machine load."""
    halves = []
    for half, classes in (("a", range(4)), ("b", range(4, 8))):
        folder = tmp / f"half_{half}"
        folder.mkdir()
        for c in classes:
            (folder / f"class_{c}").symlink_to(src / f"class_{c}")
        build_shards(folder, tmp / f"shards_{half}", BuildOptions(shard_samples=128, workers=1),
                     progress=False, log=lambda m: None)
        halves.append(tmp / f"shards_{half}")
    mix = f"[{{source: {halves[0]}, weight: 1}}, {{source: {halves[1]}, weight: 1}}]"
    one, two = ours(shards, 0), ours(mix, 0)
    # wall-clock images/s, and images per CPU-second of this process (the loader runs in it):
    # the second does not move when other processes load the machine
    rates: dict[str, list[tuple[float, float]]] = {"one source": [], "two sources": []}
    for _ in range(a.rounds):
        for name, make in (("one source", one), ("two sources", two)):
            rates[name].append(timed_both(make, a.seconds, a.batch))
    for k, v in rates.items():
        results[f"mixture: {k} img/s/worker"] = statistics.median(w for w, _ in v)
        results[f"mixture: {k} img/CPU-s"] = statistics.median(c for _, c in v)
        print(f"  {k}: rounds {', '.join(f'{w:.0f}' for w, _ in v)} img/s, "
              f"{', '.join(f'{c:.0f}' for _, c in v)} img/CPU-s", flush=True)
    for unit in ("img/s/worker", "img/CPU-s"):
        results[f"mixture: ratio two/one ({unit})"] = (
            results[f"mixture: two sources {unit}"] / results[f"mixture: one source {unit}"])


def report(a, h: int, w: int, kb: float, results: dict[str, float]) -> None:
    print(
        f"{a.images} JPEGs {w}x{h} q90, {kb:.0f} kB average, crop 224, batch {a.batch}, torch "
        f"{torch.__version__}"
    )
    for k, v in results.items():
        print(f"  {k:40s} {v:8.3f}" if "ratio" in k else f"  {k:40s} {v:8.0f}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", default="375x500", help="HxW of the generated JPEGs")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the scaling run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--only-mixture", action="store_true", help="only the two-sources-vs-one part")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the mixture part")
    a = p.parse_args()
    h, w = (int(x) for x in a.size.split("x"))
    torch.set_num_threads(1)  # one worker process = one core
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "shards"
        write_synthetic_folder(src, 8, a.images // 8, size=(h, w))
        kb = sum(f.stat().st_size for f in src.rglob("*.jpg")) / a.images / 1e3
        for procs in (1,) if a.only_mixture else (1, a.workers):
            t = time.perf_counter()
            build_shards(
                src,
                Path(f"{out}{procs}"),
                BuildOptions(shard_samples=128, workers=procs),
                progress=False,
                log=lambda m: None,
            )
            results[f"build img/s per process ({procs} proc)"] = (
                a.images / (time.perf_counter() - t) / procs
            )
        shards = f"{out}1"

        def ours(train: str, workers: int):
            cfg = load_config(
                "vit_base_800ep",
                [
                    f"data.train={train}",
                    f"data.num_workers={workers}",
                    f"data.micro_batch_size={a.batch}",
                    f"data.global_batch_size={a.batch}",
                ],
            )
            loader = build_train_loader(cfg, rank=0, world_size=1)
            return lambda: iter(loader)

        mixture_part(a, src, Path(tmp), shards, ours, results)
        if a.only_mixture:
            report(a, h, w, kb, results)
            return
        # One worker process: the dataset iterated in this process (num_workers=0, one thread).
        results["ours img/s/worker"] = timed(ours(shards, 0), a.seconds, a.batch)
        results["ours/if img/s/worker"] = timed(ours(str(src), 0), a.seconds, a.batch)
        results["tv img/s/worker"] = timed(
            lambda: iter(torchvision_loader(src, a.batch, 0)), a.seconds, a.batch
        )
        W = a.workers
        results[f"ours img/s/worker ({W} workers)"] = timed(ours(shards, W), a.seconds, a.batch) / W
        results[f"tv img/s/worker ({W} workers)"] = (
            timed(lambda: iter(torchvision_loader(src, a.batch, W)), a.seconds, a.batch) / W
        )
    report(a, h, w, kb, results)
    one = results["ours img/s/worker"] / results["tv img/s/worker"]
    many = results[f"ours img/s/worker ({W} workers)"] / results[f"tv img/s/worker ({W} workers)"]
    print(f"  {'ratio ours/tv, 1 worker':40s} {one:8.2f}")
    print(f"  {f'ratio ours/tv, {W} workers':40s} {many:8.2f}")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
