"""Faults that are not clean, each injected for real: NaN storms, damaged checkpoints, full disks,
failed writes on one rank, and ranks killed at random moments (also in the middle of a save)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from distributed import ROOT, cpu_env, deepspeed_cmd, run

from bootmae_ds.runtime import checkpoint as ckpt

TINY = ["model.depth=2", "model.feature_decoder.context_block=1", "data.micro_batch_size=8",
        "data.num_workers=1", "logging.every_steps=1", "logging.knn_every_steps=null"]
COMPARED = ("loss", "loss_pixel", "loss_feature", "lr", "grad_norm")


def _pretrain(out: Path, steps: int, *extra: str, resume: str = "auto") -> subprocess.CompletedProcess:
    """One CPU process (a world of one) of the demo at a tiny size."""
    return run(["python", "launchers/pretrain.py", "--config", "demo", "--output-dir", str(out), "--max-steps",
                str(steps), "--resume", resume, "--set", *TINY, "data.global_batch_size=8", *extra])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _last_per_step(rows: list[dict]) -> dict[int, dict]:
    """A step run twice (after a resume or rewind) counts with its last row."""
    return {r["step"]: r for r in rows}


def _same_losses(a: dict[int, dict], b: dict[int, dict], steps: range) -> None:
    for step in steps:
        for key in COMPARED:
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])  # bitwise


def _is_nan(x: float) -> bool:
    return x != x


# -- NaN storms ---------------------------------------------------------------------------------
NAN_DRILL = ["checkpoint.every_steps=4", "checkpoint.keep_last=4", "debug.nan_steps=[6,7,8,9]",
             "optim.max_skipped_in_row=2", "optim.on_nonfinite=rewind"]


def test_nan_storm_rewinds_past_the_bad_data_and_resumes_exactly(tmp_path) -> None:
    straight = tmp_path / "straight"
    proc = _pretrain(straight, 14, *NAN_DRILL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rewound: 3 non-finite steps in a row at step 9; reloaded step_00000008" in proc.stdout
    rows = _rows(straight)
    # the poisoned micro-batches (data positions 6..9) are each met once: 3 before the rewind, 1 after
    assert [r["step"] for r in rows if _is_nan(r["loss"])] == [7, 8, 9, 9]
    last_nan = max(i for i, r in enumerate(rows) if _is_nan(r["loss"]))
    assert rows[-1]["step"] == 14 and not any(_is_nan(r["loss"]) for r in rows[last_nan + 1:])
    assert rows[-1]["rewinds"] == 1 and rows[-1]["skipped_steps"] == 4
    manifest = json.loads((straight / "checkpoints" / "step_00000014" / "manifest.json").read_text())
    assert manifest["run_state"]["rewinds"] == [{
        "at_step": 9, "to_step": 8, "checkpoint": "step_00000008", "data_epoch": 0, "data_batches": 9,
        "skipped_in_row": 3}]
    # stopped after the rewind and resumed: the rest is what the uninterrupted run computed
    split = tmp_path / "split"
    first = _pretrain(split, 11, *NAN_DRILL)
    assert first.returncode == 0, first.stdout[-2000:]
    second = _pretrain(split, 14, *NAN_DRILL)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stdout[-2000:]
    assert "rewound" not in second.stdout  # the rewind is in the saved state, not done again
    _same_losses(_last_per_step(_rows(split)), _last_per_step(rows), range(10, 15))


def test_nan_storm_without_rewinds_left_stops_with_status_3(tmp_path) -> None:
    proc = _pretrain(tmp_path / "run", 14, *NAN_DRILL, "optim.max_rewinds=0")
    assert proc.returncode == 3, proc.stdout[-2000:]
    assert "after 0 rewind(s), the most optim.max_rewinds allows" in proc.stdout
    assert ckpt.check_integrity(tmp_path / "run" / "checkpoints" / "step_00000008") is None


# -- damaged checkpoints ------------------------------------------------------------------------
def test_damaged_newest_checkpoints_are_skipped_kept_and_refused_by_name(tmp_path) -> None:
    out = tmp_path / "run"
    extra = ["checkpoint.every_steps=2", "checkpoint.keep_last=4"]
    clean = _pretrain(out, 8, *extra)
    assert clean.returncode == 0, clean.stdout[-2000:]
    reference = _last_per_step(_rows(out))
    ckpts = out / "checkpoints"
    # a truncation (the size no longer matches) and a same-size corruption (only the CRC sees it)
    truncated = ckpts / "step_00000008" / "mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:4096])
    flipped = next((ckpts / "step_00000006").glob("*optim_states.pt"))
    data = bytearray(flipped.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])
    flipped.write_bytes(bytes(data))
    sizes = {p: p.stat().st_size for p in (truncated, flipped)}

    named = _pretrain(out, 8, *extra, resume=str(ckpts / "step_00000006"))
    assert named.returncode == 2 and "damaged (CRC mismatch" in named.stderr and "Traceback" not in named.stderr
    assert (ckpts / "step_00000006").is_dir()  # refused, not moved

    resumed = _pretrain(out, 8, *extra)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "skipping damaged checkpoint step_00000008" in resumed.stdout
    assert "skipping damaged checkpoint step_00000006" in resumed.stdout
    assert f"resumed from {ckpts / 'step_00000004'} at step 4" in resumed.stdout
    for tag, victim in (("step_00000008", truncated), ("step_00000006", flipped)):
        kept = ckpts / f"{tag}.damaged"
        assert (kept / victim.name).stat().st_size == sizes[victim]  # kept as it was, never deleted
        assert victim.name in (kept / "DAMAGED.txt").read_text()
        assert ckpt.check_integrity(ckpts / tag) is None  # written again, whole
    _same_losses(_last_per_step(_rows(out)), reference, range(5, 9))


# -- full disks and failed writes ---------------------------------------------------------------
def _mount_small_tmpfs(where: Path, size_mb: int) -> bool:
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_disk_stops_the_run_cleanly(tmp_path) -> None:
    disk = tmp_path / "disk"
    if not _mount_small_tmpfs(disk, 24):  # one demo checkpoint (~14 MB) fits, two do not
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected-write test covers it")
    try:
        out = tmp_path / "run"
        proc = _pretrain(out, 6, "checkpoint.every_steps=2", "checkpoint.keep_last=2", f"checkpoint.dir={disk}")
        assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-2000:]
        text = proc.stdout + proc.stderr
        assert str(disk) in text and "MiB free" in text and "previous checkpoint is intact" in text
        assert "Traceback" not in text
        assert (disk / ckpt.LATEST).read_text().strip() == "step_00000002"
        assert ckpt.check_integrity(disk / "step_00000002") is None
        assert sorted(p.name for p in disk.iterdir() if p.is_dir()) == ["step_00000002"]  # no debris
        assert [r["step"] for r in _rows(out)][-1] == 4
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def test_a_failed_write_on_one_rank_fails_the_save_on_every_rank(tmp_path) -> None:
    out = tmp_path / "result.json"
    proc = run(deepspeed_cmd("tests/dist_scripts/save_faults.py", str(out), str(tmp_path / "ckpt")), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    where = {"2": "zero_pp_rank_1_mp_rank_00_optim_states.pt", "3": "momentum_rank1.pt", "4": "manifest.json"}
    for rank in ranks:
        for step, name in where.items():
            case = rank[step]
            assert "could not be written" in case["outcome"] and name in case["outcome"], case  # every rank says why
            assert "No space left on device" in case["outcome"]
            assert not case["dir_exists"] and case["latest"] == "step_00000001" and case["good_intact"]
        assert rank["after"] == {"complete": ["step_00000001", "step_00000005"], "latest": "step_00000005"}


# -- damaged data -------------------------------------------------------------------------------
def test_a_damaged_shard_is_counted_named_and_trained_through(tmp_path) -> None:
    import shutil

    from bootmae_ds.data import plan
    from bootmae_ds.data.demo import ensure_demo_shards
    from bootmae_ds.data.shards import Manifest

    shards = tmp_path / "shards"
    shutil.copytree(ensure_demo_shards() / "train", shards)
    manifest = Manifest.read(shards)
    first = manifest.shards[plan.shard_order(0, 0, len(manifest.shards))[0]].name  # read first in epoch 0
    victim = shards / first
    victim.write_bytes(victim.read_bytes()[:20_000])  # a few samples survive, the tail is lost
    out = tmp_path / "run"
    # read in sequence, so that whole micro-batches fall into the lost tail
    proc = _pretrain(out, 4, f"data.train={shards / 'manifest.json'}", "data.shuffle_buffer=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = _rows(out)
    assert sum(r["corrupt_samples"] for r in rows) >= 8 and sum(r["filled_samples"] for r in rows) >= 8
    named = [r["damaged_shards"] for r in rows if "damaged_shards" in r]
    assert len(named) == 1 and named[0] == [str(victim)]  # named once, in metrics.jsonl and the log
    assert f"damaged shard(s) {victim}" in proc.stdout
    assert not any(_is_nan(r["loss"]) for r in rows)


# -- killed ranks -------------------------------------------------------------------------------
KILL_ARGS = [*TINY, "data.global_batch_size=16", "checkpoint.every_steps=3", "checkpoint.keep_last=3"]
KILL_STEPS = 18  # past the latest possible kill (step 15)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher's two rank processes (not their data workers), rank 0 first."""
    trainers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    ranks = [p for p in trainers if p.ppid() not in {t.pid for t in trainers}]
    return sorted(ranks, key=lambda p: next(a for a in p.cmdline() if a.startswith("--local_rank")))


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = deepspeed_cmd("launchers/pretrain.py", "--config", "demo", "--output-dir", str(out), "--max-steps",
                        str(KILL_STEPS), "--set", *KILL_ARGS, *extra)
    return subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _half_written(ckpts: Path, step: int) -> bool:
    tag = ckpts / ckpt.tag_for(step)
    return tag.is_dir() and any(tag.glob("*.pt")) and not (tag / ckpt.MANIFEST).exists()


def _alive(p: psutil.Process) -> bool:
    """Still running: not ended, not a zombie, and its pid not taken by a later process."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _shm_buffers() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_")}


@pytest.mark.slow
def test_ranks_killed_at_random_moments_resume_to_the_same_losses(tmp_path) -> None:
    rng = random.Random(11)
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    shm_before = _shm_buffers()
    # a kill after a random step, then one while a checkpoint is half written (that attempt's saves
    # pause 2 s between DeepSpeed's files and ours); the final run resumes past the replaced one
    first = rng.randint(4, 8)
    in_save = 3 * rng.randint(first // 3 + 1, first // 3 + 3)
    plan = [("step", first), ("save", in_save)]
    started: list[psutil.Process] = []  # every process of the killed runs: ranks, fork servers, workers
    for kind, at in plan:
        proc = _start(out, *(["debug.slow_save_s=2"] if kind == "save" else []))
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                done = [r["step"] for r in _rows(out)] if (out / "metrics.jsonl").exists() else []
                if (kind == "step" and done and done[-1] >= at) or (kind == "save" and _half_written(ckpts, at)):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, f"the run ended before the {kind} kill at {at}"
            assert kind == "step" or _half_written(ckpts, at)  # the kill lands inside the save
            started += psutil.Process(proc.pid).children(recursive=True)
            rng.choice(_ranks(proc)).send_signal(signal.SIGKILL)
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode != 0
    final = _start(out)
    log, _ = final.communicate(timeout=300)
    assert final.returncode == 0, log[-3000:]
    tags = [p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step_")]
    assert tags and all(ckpt.is_complete(p) for p in tags)  # the half-written one was replaced
    reference = tmp_path / "clean"
    clean = run(deepspeed_cmd("launchers/pretrain.py", "--config", "demo", "--output-dir", str(reference),
                              "--max-steps", str(KILL_STEPS), "--set", *KILL_ARGS))
    assert clean.returncode == 0, clean.stdout[-2000:]
    killed_rows = _last_per_step(_rows(out))
    assert sorted(killed_rows) == list(range(1, KILL_STEPS + 1))
    _same_losses(killed_rows, _last_per_step(_rows(reference)), range(1, KILL_STEPS + 1))
    # nothing left behind: no process of the killed run, no DeepSpeed shared-memory buffer
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert left == [] and [p for p in started if _alive(p)] == []
    assert _shm_buffers() <= shm_before
