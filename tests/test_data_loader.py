"""Streaming loader: equal disjoint rank shares, per-epoch order, exact resume, bad data."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from data_helpers import loader_config, make_shards, member_offsets

from bootmae_ds.data import build_train_loader, plan
from bootmae_ds.data.shards import ShardError


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    """60 images in 7 shards of 9 (the last holds 6): shards do not divide over 2 x 2 readers."""
    manifest = make_shards(tmp_path_factory.mktemp("loader"))
    assert [s.count for s in manifest.shards] == [9] * 6 + [6]
    return manifest


def _epoch(loader) -> list[dict]:
    return list(loader)


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 4), (3, 4, 5), (8, 10, 3), (1, 1, 7)])
def test_plan_gives_equal_disjoint_shares(world: int, workers: int, batch: int) -> None:
    rng = random.Random(world * 100 + workers)
    counts = [rng.randint(0, 40) for _ in range(rng.randint(1, 13))]
    total = sum(counts)
    n = plan.batches_per_rank(total, world, batch)
    seen, layouts = [], []
    for epoch in range(2):
        order = plan.shard_order(7, epoch, len(counts))
        offsets = {s: sum(counts[t] for t in order[:order.index(s)]) for s in order}
        flat = []
        for rank in range(world):
            rank_positions = []
            for w in range(workers):
                segs = plan.worker_segments(counts, 7, epoch, rank, world, w, workers, batch)
                pos = [offsets[s] + p for s, lo, hi in segs for p in range(lo, hi)]
                assert len(pos) == plan.worker_batches(n, workers, w) * batch
                rank_positions += pos
            assert len(rank_positions) == n * batch  # every rank: exactly N micro-batches
            flat += rank_positions
        assert sorted(flat) == list(range(world * n * batch))  # disjoint, covers all but < world*B
        assert total - len(flat) < world * batch
        layouts.append([(s, p) for s in order for p in range(counts[s])])
        seen.append(flat)
    if len([c for c in counts if c]) > 1:
        assert layouts[0] != layouts[1]  # the shard order changes with the epoch


def test_shuffle_order_is_a_bounded_permutation() -> None:
    order = plan.shuffle_order(500, 32, random.Random(3))
    assert sorted(order) == list(range(500))
    assert all(q < i + 32 for i, q in enumerate(order))  # a reader holds at most 32 samples
    assert plan.shuffle_order(500, 32, random.Random(3)) == order
    assert plan.shuffle_order(500, 32, random.Random(4)) != order


@pytest.mark.slow
def test_two_ranks_two_workers_equal_disjoint_and_reshuffled(shards, monkeypatch) -> None:
    # The environment claims rank 0 of 1: the loader must follow its explicit arguments instead.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = loader_config(shards.path)
    keys = {}
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2)
        epochs = [_epoch(loader), _epoch(loader)]
        assert [len(e) for e in epochs] == [len(loader)] * 2 == [7, 7]  # 60 // (2*4) = 7
        for batches in epochs:
            for i, b in enumerate(batches):
                assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.uint8
                assert b["masks"].shape == (4, 64) and b["masks"].dtype == torch.bool
                assert b["masks"].sum(1).tolist() == [48] * 4
                assert b["labels"].dtype == torch.int64 and b["index"] == i and b["corrupt"] == 0
        keys[rank] = [[k for b in e for k in b["keys"]] for e in epochs]
        assert loader.state_dict()["epoch"] == 2
    for epoch in range(2):
        a, b = keys[0][epoch], keys[1][epoch]
        assert len(set(a)) == len(a) == len(set(b)) == len(b) == 28
        assert not set(a) & set(b)  # disjoint ranks
    assert keys[0][0] != keys[0][1]  # a different sample order in the next epoch ...
    assert set(keys[0][0]) != set(keys[0][1])  # ... and a different share for the rank


def _same(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
            and torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"]))


@pytest.mark.slow
def test_rebuild_from_mid_epoch_state_yields_the_same_batches(shards) -> None:
    cfg = loader_config(shards.path)
    loader = build_train_loader(cfg, rank=1, world_size=2)
    loader.epoch = 1
    full = _epoch(loader) + _epoch(loader)  # epochs 1 and 2
    state = loader.state_dict()
    for k in (1, 2, 3, 5, 7):  # odd k: physical workers play shifted logical workers
        resumed = build_train_loader(
            cfg, rank=1, world_size=2, state=state | {"epoch": 1, "batches": k}
        )
        rest = _epoch(resumed)  # k = 7: epoch 1 is complete, so this is all of epoch 2
        assert len(rest) == (7 - k or 7)
        if k < 7:
            rest += _epoch(resumed)[:2]  # the next epoch goes on as uninterrupted
        assert all(_same(x, y) for x, y in zip(rest, full[k : k + len(rest)], strict=True))


def test_resume_decodes_only_unconsumed_samples(shards, monkeypatch) -> None:
    from bootmae_ds.data.transforms import SampleTransform

    calls = []
    original = SampleTransform.__call__
    monkeypatch.setattr(
        SampleTransform,
        "__call__",
        lambda self, data, epoch, key: calls.append(key) or original(self, data, epoch, key),
    )
    cfg = loader_config(shards.path, workers=0)
    full = _epoch(build_train_loader(cfg, rank=0, world_size=2))
    calls.clear()
    state = {
        "epoch": 0,
        "batches": 5,
        "world_size": 2,
        "num_workers": 0,
        "micro_batch_size": 4,
        "num_samples": 60,
        "seed": 0,
    }
    rest = _epoch(build_train_loader(cfg, rank=0, world_size=2, state=state))
    assert len(calls) == 2 * 4  # only the two remaining micro-batches were decoded
    assert all(_same(x, y) for x, y in zip(rest, full[5:]))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_leaves_the_global_torch_rng_alone(shards, workers: int) -> None:
    cfg = loader_config(shards.path, workers=workers)
    before = torch.get_rng_state()
    loader = build_train_loader(cfg, rank=0, world_size=2)
    next(iter(loader))
    _epoch(loader)
    assert torch.equal(torch.get_rng_state(), before)  # resumed runs keep the same RNG stream


def test_resume_with_another_world_size_is_refused(shards) -> None:
    cfg = loader_config(shards.path, workers=0)
    state = build_train_loader(cfg, rank=0, world_size=2).state_dict() | {"batches": 3}
    with pytest.raises(ValueError, match=r"world_size 2 -> 3"):
        build_train_loader(cfg, rank=0, world_size=3, state=state)
    with pytest.raises(ValueError, match=r"num_workers 0 -> 2"):
        build_train_loader(loader_config(shards.path, workers=2), rank=0, world_size=2, state=state)


def _copy_build(manifest, dest: Path) -> Path:
    shutil.copytree(manifest.path.parent, dest)
    return dest


@pytest.mark.slow
def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path: Path, caplog) -> None:
    root = _copy_build(shards, tmp_path / "bad")
    # A bad JPEG: overwrite the first image's bytes in shard 2 (the tar stays valid).
    name, _, data_at = member_offsets(root / "train-000002.tar")[0]
    bad_key = name.split(".")[0]
    with open(root / "train-000002.tar", "r+b") as f:
        f.seek(data_at)
        f.write(b"\x00" * 64)
    # A truncated member: cut shard 4 in the middle of its 6th sample's image data.
    members = member_offsets(root / "train-000004.tar")
    with open(root / "train-000004.tar", "r+b") as f:
        f.truncate(members[15][2] + 100)
    cfg = loader_config(root / "manifest.json", workers=2)
    counts, keys = 0, []
    for rank in range(2):
        with caplog.at_level("WARNING", logger="bootmae_ds.data"):
            loader = build_train_loader(cfg, rank=rank, world_size=2)
        assert "train-000004.tar" in caplog.text and "the manifest says" in caplog.text
        batches = _epoch(loader)
        assert len(batches) == 7 and all(b["images"].shape[0] == 4 for b in batches)
        counts += loader.stats["corrupt"]
        keys += [k for b in batches for k in b["keys"]]
    # Bad: sample 0 of shard 2 (JPEG) and samples 5..8 of shard 4 (lost to the truncation),
    # less those among the 4 samples this epoch drops (the sequence's last 4 positions).
    order = plan.shard_order(0, 0, 7)
    sequence = [(s, p) for s in order for p in range(shards.shards[s].count)]
    bad = {(2, 0)} | {(4, p) for p in range(5, 9)}
    expected = len(bad - set(sequence[-4:]))
    assert counts == expected >= 1
    assert bad_key not in keys
    assert len(keys) == 56 and len(set(keys)) == 56 - counts  # replaced by same-batch copies


def test_corrupt_log_is_rate_limited(caplog) -> None:
    from bootmae_ds.data.loader import _RateLimitedLog

    report = _RateLimitedLog(burst=3, interval=3600)
    with caplog.at_level("WARNING", logger="bootmae_ds.data"):
        for i in range(50):
            report(f"sample {i}")
    assert [r.getMessage() for r in caplog.records] == [
        f"corrupt sample skipped: sample {i}" for i in range(3)
    ]
    assert report.suppressed == 47


def test_missing_shard_is_named(shards, tmp_path: Path) -> None:
    root = _copy_build(shards, tmp_path / "missing")
    (root / "train-000003.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000003\.tar.*does not exist.*build_shards"):
        build_train_loader(loader_config(root / "manifest.json"), rank=0, world_size=1)


def test_url_list_pipe_folder_and_synthetic_sources(shards) -> None:
    root = shards.path.parent
    by_manifest = _epoch(
        build_train_loader(loader_config(shards.path, workers=0), rank=0, world_size=1)
    )
    urls = str(root / "train-{000000..000006}.tar")
    by_urls = _epoch(build_train_loader(loader_config(urls, workers=0), rank=0, world_size=1))
    assert all(_same(a, b) for a, b in zip(by_manifest, by_urls)) and len(by_urls) == 15
    template = f"data.shard_url_template=pipe:cat {root}/{{name}}"  # a manifest, remote shards
    by_template = _epoch(build_train_loader(loader_config(shards.path, template, workers=0),
                                            rank=0, world_size=1))
    assert all(_same(a, b) for a, b in zip(by_manifest, by_template, strict=True))
    piped = f"pipe:cat {root}/train-{{000000..000006}}.tar"
    cfg = loader_config(piped, "data.num_samples=63", workers=0)  # no manifest: equal shares
    with pytest.raises(ShardError, match="per-shard sample counts are unknown"):
        build_train_loader(loader_config(piped, workers=0), rank=0, world_size=1)
    first = next(iter(build_train_loader(cfg, rank=0, world_size=1)))
    assert first["images"].shape == (4, 3, 32, 32)
    folder = _epoch(
        build_train_loader(loader_config(root.parent / "src", workers=0), rank=0, world_size=1)
    )
    assert len(folder) == 15 and folder[0]["labels"].max() < 3
    synthetic = build_train_loader(
        loader_config("synthetic", "data.num_samples=40", workers=0), rank=1, world_size=2
    )
    batches = _epoch(synthetic)
    assert len(batches) == 5 and batches[0]["images"].shape == (4, 3, 32, 32)


def test_finished_loaders_leave_no_exiting_thread_behind() -> None:
    """A DataLoader's queue feeder threads exit on their own after its iterator stops; a fork
    during that exit deadlocks the child on CPython 3.11 (a fine-tuning rank hung so at its
    second evaluation). ``iterate_and_join`` waits for them, so the next loader forks safely."""
    import threading

    from torch.utils.data import DataLoader, IterableDataset

    from bootmae_ds.data.loader import iterate_and_join

    class Four(IterableDataset):
        def __iter__(self):
            yield from (torch.zeros(2) for _ in range(4))

    def feeders() -> int:
        return sum(t.name == "QueueFeederThread" and t.is_alive() for t in threading.enumerate())

    plain = joined = 0
    for _ in range(20):
        for _ in DataLoader(Four(), batch_size=None, num_workers=1):
            pass
        plain += feeders()
        for t in [t for t in threading.enumerate() if t.name == "QueueFeederThread"]:
            t.join(timeout=30)  # leave the next round a clean start
        assert len(list(iterate_and_join(DataLoader(Four(), batch_size=None, num_workers=1)))) == 4
        joined += feeders()
    assert joined == 0
    assert plain > 0  # the window is real: without the join, threads are still exiting


def test_imagefolder_batches_mix_classes_and_resume_exactly(tmp_path: Path) -> None:
    """An ImageFolder lists its files in class order; the loader must still give every micro-batch
    about as many classes as i.i.d. draws would (it read a few classes per batch before the
    seeded file shuffle), resume exactly, and name a damaged file once."""
    from bootmae_ds.data.sources import write_synthetic_folder

    write_synthetic_folder(tmp_path, 8, 24, size=(16, 16))
    broken = tmp_path / "class_3" / "img_00005.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg any more")
    cfg = loader_config(tmp_path, workers=1, batch=8)
    epochs = [_epoch(build_train_loader(cfg, rank=r, world_size=2)) for r in range(2)]
    assert [len(e) for e in epochs] == [12, 12]  # 192 files / (2 ranks x 8): none dropped
    distinct = [len(set(b["labels"].tolist())) for e in epochs for b in e]
    expected = 8 * (1 - (7 / 8) ** 8)  # distinct classes among 8 draws from 8 equal classes: 5.25
    assert abs(sum(distinct) / len(distinct) - expected) < 0.8, distinct
    keys = [{k for b in e for k in b["keys"]} for e in epochs]
    assert not keys[0] & keys[1]  # still disjoint ranks
    reports = [name for e in epochs for b in e for name in b["damaged_shards"]]
    assert reports == [str(broken)] and sum(b["corrupt"] for e in epochs for b in e) == 1
    state = {"epoch": 0, "batches": 5, "world_size": 2, "num_workers": 1, "micro_batch_size": 8,
             "num_samples": 192, "seed": 0}
    rest = _epoch(build_train_loader(cfg, rank=1, world_size=2, state=state))
    assert len(rest) == 7 and all(_same(x, y) for x, y in zip(rest, epochs[1][5:], strict=True))
