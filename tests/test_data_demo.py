"""Demo digits: the shard build, its cache (safe under concurrent ranks) and the demo loader."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bootmae_ds.config import load_config
from bootmae_ds.data import build_train_loader
from bootmae_ds.data.demo import (
    DEMO_NAME,
    build_demo_shards,
    demo_split,
    digit_png,
    ensure_demo_shards,
)
from bootmae_ds.data.shards import Manifest, ShardError, verify_manifest
from bootmae_ds.data.transforms import decode_rgb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "digits"
    run = subprocess.run([sys.executable, "data_prep/make_demo_shards.py", str(out)], cwd=ROOT,
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    assert [(x["split"], x["samples"]) for x in lines] == [("train", 1500), ("test", 297)]
    return out


def test_demo_shards_hold_the_digits(demo_root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    split = demo_split()
    assert len(set(split["train"]) | set(split["test"])) == 1797
    assert not set(split["train"]) & set(split["test"])
    for name in ("train", "test"):
        m = Manifest.read(demo_root / name)
        assert m.classes == [str(c) for c in range(10)]
        assert all(not problems for problems in verify_manifest(m.path).values())
        seen = []
        for shard in m.shards:
            with tarfile.open(demo_root / name / shard.name) as tar:
                for member in tar.getnames():
                    if member.endswith(".png"):
                        meta = json.loads(tar.extractfile(member[:-3] + "json").read())
                        index = int(Path(meta["path"]).stem)
                        assert (
                            int(tar.extractfile(member[:-3] + "cls").read()) == digits.target[index]
                        )
                        png = tar.extractfile(member).read()
                        assert png == digit_png(digits.images[index])
                        seen.append(index)
        assert sorted(seen) == sorted(split[name].tolist())
    image = decode_rgb(digit_png(digits.images[0]))
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[1])
    assert image.float().std() > 20  # real strokes, not a blank image


def test_demo_build_is_deterministic_and_kept(demo_root: Path, tmp_path: Path) -> None:
    other = build_demo_shards(tmp_path / "again")
    for name in ("train", "test"):
        a, b = Manifest.read(demo_root / name), Manifest.read(other / name)
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    stamp = (other / "train" / "train-000000.tar").stat().st_mtime_ns
    assert build_demo_shards(other) == other  # complete: kept, not rebuilt
    assert (other / "train" / "train-000000.tar").stat().st_mtime_ns == stamp
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(ShardError, match="no complete demo build"):
        build_demo_shards(tmp_path / "junk")


def _ensure(cache: str, queue) -> None:
    queue.put(str(ensure_demo_shards(cache)))


@pytest.mark.slow
def test_concurrent_first_use_builds_one_cache(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")  # fork: no import delay, so the three builds really overlap
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert {queue.get() for _ in procs} == {str(tmp_path / DEMO_NAME)}
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_NAME]  # no temporary leftovers
    assert Manifest.read(tmp_path / DEMO_NAME / "train").total_samples == 1500


def test_demo_preset_streams_the_cached_digits(demo_root: Path) -> None:
    cfg = load_config("demo", [f"data.cache_dir={demo_root.parent}", "data.num_workers=0"])
    (demo_root.parent / DEMO_NAME).symlink_to(demo_root)  # the cache layout: <cache>/digits-v1
    loader = build_train_loader(cfg, rank=0, world_size=1)
    assert len(loader) == 1500 // 32
    batch = next(iter(loader))
    assert batch["images"].shape == (32, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["masks"].shape == (32, 64) and batch["masks"].sum(1).eq(48).all()
    assert batch["labels"].min() >= 0 and batch["labels"].max() <= 9
    assert len(set(batch["keys"])) == 32
    assert np.unique(batch["labels"].numpy()).size > 3  # shuffled across classes
    assert loader.state_dict()["batches"] == 1
