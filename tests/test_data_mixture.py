"""Weighted mixtures of sources (``data.train`` as a list): realised shares, repeats of a small
source, the layout as a pure function, exact mid-epoch resume, a resize at the epoch boundary, the
per-source counts of the step row, and the one-line errors of bad entries."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import loader_config, make_shards
from distributed import ROOT, cpu_env, deepspeed_cmd, run

from bootmae_ds.config import ConfigError, load_config, load_finetune_config, load_segment_config
from bootmae_ds.data import build_train_loader
from bootmae_ds.data.mixture import check_entries_exist, interleave, quotas
from bootmae_ds.data.shards import ShardError
from bootmae_ds.runtime.recovery import DataFaults


def _mixed(shards: Path, *extra: str, epoch_samples: int = 203, workers: int = 2):
    """60 JPEGs in tar shards (weight 0.75) and 12 synthetic images (weight 0.25): an epoch of
    ``epoch_samples`` asks ~51 draws of the small source, more than four passes over it."""
    mix = (f"data.train=[{{source: {shards}, name: tars, weight: 0.75}}, "
           f"{{source: synthetic, name: small, num_samples: 12, weight: 0.25}}]")
    return loader_config("unused", mix, f"data.epoch_samples={epoch_samples}", *extra, workers=workers)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    make_shards(root, num_classes=3, per_class=20, shard_samples=9)
    return root / "shards"


def _epochs(cfg, world: int, epochs: int) -> tuple[list[list[dict]], Counter]:
    """Every rank's batches of ``epochs`` epochs (a rank's loader is built in this process: the
    layout is a function of the rank, so the ranks need not run together)."""
    per_rank, keys = [], Counter()
    for rank in range(world):
        loader = build_train_loader(cfg, rank=rank, world_size=world)
        batches = [b for _ in range(epochs) for b in loader]
        per_rank.append(batches)
        for b in batches:
            keys.update(b["keys"])
    return per_rank, keys


def _within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p)) + 1


def test_shares_repeats_and_equal_batches_on_two_ranks_of_two_workers(shards) -> None:
    cfg = _mixed(shards)
    ranks, keys = _epochs(cfg, world=2, epochs=3)
    assert len(ranks[0]) == len(ranks[1]) == 3 * (203 // 8)  # equal micro-batch counts, tail dropped
    one_epoch = len(ranks[0]) // 3
    for batches in (
        [b for r in ranks for b in r[:one_epoch]],  # epoch 0 of both ranks
        [b for r in ranks for b in r],  # 3 epochs
    ):
        n = 4 * len(batches)
        counted = Counter()
        for b in batches:
            counted.update(b["source_samples"])
        # counted from the keys the batches hold, not from the loader's own bookkeeping
        from_keys = Counter("small" if k.startswith("small_") else "tars" for b in batches for k in b["keys"])
        assert counted == from_keys
        assert _within_binomial(counted["tars"], n, 0.75) and _within_binomial(counted["small"], n, 0.25)
    small = [c for k, c in keys.items() if k.startswith("small_")]
    tars = [c for k, c in keys.items() if not k.startswith("small_")]
    assert len(small) == 12 and max(small) - min(small) <= 1 and min(small) >= 4 * 3  # it repeats, evenly
    assert max(tars) - min(tars) <= 1  # 456 draws of 60 images: without replacement, pass after pass
    # a pure function of (seed, epoch, rank, worker, sources): rank 1 rebuilt reads the same again
    again = [b["keys"] for b in _epochs(cfg, world=2, epochs=1)[0][1]]
    assert again == [b["keys"] for b in ranks[1][:one_epoch]]


def test_quotas_and_interleave() -> None:
    assert quotas([0.7, 0.3], 10) == [7, 3] and sum(quotas([1, 1, 1], 100)) == 100
    dealt = interleave([3, 9])
    assert sorted(dealt.tolist()) == [0] * 3 + [1] * 9
    for length in range(1, 13):  # any stretch holds its share to within one
        for start in range(12 - length + 1):
            assert abs(int((dealt[start:start + length] == 0).sum()) - length * 3 / 12) <= 1


def test_mid_epoch_resume_is_exact_and_a_resize_continues_at_the_next_epoch(shards) -> None:
    cfg = _mixed(shards)
    full = list(build_train_loader(cfg, rank=1, world_size=2))
    first = build_train_loader(cfg, rank=1, world_size=2)
    head = []
    for b in first:
        head.append(b)
        if len(head) == 7:
            break
    state = first.position_after(head[-1])
    assert state["epoch"] == 0 and state["batches"] == 7
    rest = list(build_train_loader(cfg, rank=1, world_size=2, state=state))
    got = head + rest
    assert [b["keys"] for b in got] == [b["keys"] for b in full]
    assert [b["source_samples"] for b in got] == [b["source_samples"] for b in full]
    assert all((a["images"] == b["images"]).all() for a, b in zip(got, full))
    # 2 -> 1 rank: the layout changed, so the stream continues at epoch 1 from its first batch
    with pytest.raises(ValueError, match="world_size 2 -> 1"):
        build_train_loader(cfg, rank=0, world_size=1, state=state)
    one = build_train_loader(cfg, rank=0, world_size=1)
    one.start_at_next_epoch(state)
    resized = next(iter(one))
    fresh = build_train_loader(cfg, rank=0, world_size=1)
    fresh.epoch = 1
    assert (resized["epoch"], resized["index"]) == (1, 0) and resized["keys"] == next(iter(fresh))["keys"]


def test_damaged_data_is_counted_against_its_source(shards, tmp_path) -> None:
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    first = sorted(damaged.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 3])  # a truncated tar
    corrupt, per_source = 0, Counter()
    for b in build_train_loader(_mixed(damaged, workers=1), rank=0, world_size=1):
        corrupt += b["corrupt"]
        per_source.update(b["source_corrupt"])
    assert corrupt > 0 and per_source == {"tars": corrupt, "small": 0}


def test_step_row_names_each_source_and_run_totals_add_up() -> None:
    faults, totals = DataFaults(), {"tars": 100}
    for b in ({"corrupt": 1, "source_samples": {"tars": 3, "small": 1}, "source_corrupt": {"tars": 1, "small": 0}},
              {"corrupt": 0, "source_samples": {"tars": 2, "small": 2}, "source_corrupt": {"tars": 0, "small": 0}}):
        faults.add(b)
    counts = faults.counts()
    summed = [2 * c for c in counts]  # what the all-reduce of two such ranks gives
    row: dict = {}
    faults.report(row, summed, is_main=True, totals=totals)
    assert row["samples_tars"] == 10 and row["samples_small"] == 6 and row["corrupt_tars"] == 2
    assert row["corrupt_small"] == 0 and row["corrupt_samples"] == 2
    assert row["samples_tars_total"] == 110 and totals == {"tars": 110, "small": 6}


@pytest.mark.parametrize(("entries", "message"), [
    ("[{source: demo, weight: 0}]", "data.train[0] ('demo').weight=0: must be a positive number"),
    ("[{source: demo, weight: lots}]", "data.train[0] ('demo').weight='lots': must be a positive number"),
    ("[{source: demo, weight: .nan}]", "weight=nan: must be a positive number"),
    ("[{source: '', weight: 1}]", "data.train[0] (''"),
    ("[]", "data.train=[]: an empty list"),
    ("[{source: demo, weight: 1}, {source: demo, weight: 2}]", "data.train[1] ('demo')='demo': the same source as data.train[0]"),
    ("[{source: demo, weight: 1, mean: [0.485, 0.456, 0.406]}]", "mean=(0.485, 0.456, 0.406): differs from data.mean"),
])
def test_bad_entries_fail_in_one_line_naming_the_entry(entries: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo", [f"data.train={entries}"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and message in lines[1]


def test_missing_or_empty_sources_and_one_source_jobs(tmp_path) -> None:
    cfg = load_config("demo", [f"data.train=[{{source: demo, weight: 1}}, {{source: {tmp_path}/nope, weight: 1}}]"])
    with pytest.raises(ConfigError, match=r"data.train\[1\] \('.*/nope'\): no such file or directory"):
        check_entries_exist(cfg)
    (tmp_path / "empty").mkdir()
    cfg = load_config("demo", [f"data.train=[{{source: demo, weight: 1}}, {{source: {tmp_path}/empty, weight: 1}}]"])
    with pytest.raises(ShardError, match=r"data.train\[1\] \('.*/empty'\): ImageFolder .* holds no files"):
        build_train_loader(cfg, rank=0, world_size=1)
    for load, preset in ((load_finetune_config, "vit_base"), (load_segment_config, "ade20k_base")):
        with pytest.raises(ConfigError, match="this job takes one source"):
            load(preset, ["data.train=[{source: demo, weight: 1}]"])


# -- real runs ------------------------------------------------------------------------------------
MIX = ["--set", "model.depth=2", "model.feature_decoder.context_block=1", "data.micro_batch_size=8",
       "data.global_batch_size=16", "data.num_workers=1", "logging.every_steps=1", "logging.knn_every_steps=null",
       "checkpoint.every_steps=3",
       "data.train=[{source: demo, weight: 0.7}, {source: synthetic, name: syn, num_samples: 64, weight: 0.3}]"]
COMPARED = ("loss", "loss_pixel", "loss_feature", "grad_norm", "samples_demo", "samples_syn",
            "samples_demo_total", "samples_syn_total", "corrupt_demo", "corrupt_syn")


def _rows(run_dir: Path) -> dict[int, dict]:
    """The metrics rows by step; a step run twice (after a resume) counts with its last row."""
    if not (run_dir / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _one_rank(out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "launchers/pretrain.py", "--config", "demo", "--output-dir", str(out),
            "--max-steps", str(steps), *MIX, *extra]


@pytest.mark.slow
def test_mixed_run_killed_mid_epoch_resumes_to_the_same_losses_and_counts(tmp_path) -> None:
    """A world of one killed after step 5 (its newest checkpoint: step 3, mid-epoch) and resumed:
    steps 4 and 5 run again from the checkpoint and must give the rows they gave uninterrupted,
    losses and per-source counts (of the step, and over the run: restored from the checkpoint)."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(_one_rank(out, 40), cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and max(_rows(out), default=0) < 5:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    uninterrupted = _rows(out)
    saved = json.loads((out / "checkpoints" / "step_00000003" / "manifest.json").read_text())["run_state"]
    assert saved["data"]["epoch"] == 0 and 0 < saved["data"]["batches"] < 150  # mid-epoch
    assert not (out / "checkpoints" / "step_00000006").exists()
    resumed = run(_one_rank(out, 5))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "samples per source over the run: demo" in resumed.stdout
    again = _rows(out)
    for step in (4, 5):
        for key in COMPARED:
            assert again[step][key] == uninterrupted[step][key], (step, key)  # bitwise
    assert again[5]["samples_demo_total"] + again[5]["samples_syn_total"] == 5 * 16
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines][-2:] == [4, 5] and len(lines) >= 7  # really re-run


# Extended (about 1.5 minutes on 2 cores): the resize itself is tests/test_pretrain.py's
# test_world_size_change_is_refused_or_resized, the mixture's layout after it the in-process test above.
@pytest.mark.slow
@pytest.mark.extended
def test_mixed_run_resized_from_two_ranks_to_one_continues_at_the_next_epoch(tmp_path) -> None:
    out = tmp_path / "run"
    two = run(deepspeed_cmd("launchers/pretrain.py", "--config", "demo", "--output-dir", str(out),
                            "--max-steps", "2", *MIX))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = run(_one_rank(out, 3, "checkpoint.allow_resize=true"))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "(resized from 2 ranks)" in one.stdout
    state = json.loads((out / "checkpoints" / "step_00000003" / "manifest.json").read_text())["run_state"]
    assert state["data"]["epoch"] == 1 and state["data"]["batches"] == 2  # epoch 1, its first step
    # what step 3 read is what a fresh one-rank loader reads first in epoch 1
    loader = build_train_loader(load_config("demo", MIX[1:]), rank=0, world_size=1)
    loader.epoch = 1
    first = [b for _, b in zip(range(2), loader)]
    row = _rows(out)[3]
    for name in ("demo", "syn"):
        assert row[f"samples_{name}"] == sum(b["source_samples"][name] for b in first)
        assert row[f"samples_{name}_total"] == _rows(out)[2][f"samples_{name}_total"] + row[f"samples_{name}"]


def test_verify_shards_checks_each_set_of_a_mixture(shards, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "data_prep"))
    import verify_shards

    status = verify_shards.main([str(shards), str(tmp_path / "nope"), "--workers", "1", "--no-decode"])
    out = capsys.readouterr()
    assert status == 2 and f"{shards}: 7/7 shards good" in out.out and "nope" in out.err
