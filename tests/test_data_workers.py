"""The training loader's workers: started once per run from the fork server, never by forking the
rank again; exact resume across epoch boundaries with them; none left behind by a finished, failed
or exiting run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from data_helpers import loader_config, make_shards, still_running

from bootmae_ds.data import build_train_loader
from bootmae_ds.data.shards import ShardError

ROOT = Path(__file__).resolve().parents[1]

# Forks taken by this (the loader-owning) process. A hook cannot be unregistered: count for the
# whole session and compare differences.
FORKS = [0]
os.register_at_fork(after_in_parent=lambda: FORKS.__setitem__(0, FORKS[0] + 1))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):
    """36 images in 4 shards of 9: 4 micro-batches of 4 per rank of 2 and epoch."""
    return make_shards(tmp_path_factory.mktemp("workers"), num_classes=3, per_class=12,
                       size=(32, 32))


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _worker_pids(loader) -> set[int]:
    """The pids of ``loader``'s persistent workers (white box: the DataLoader iterator's)."""
    return {w.pid for w in loader._workers._iterator._workers}


def _same(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and (a["epoch"], a["index"]) == (b["epoch"], b["index"])
            and torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"]))


def test_a_busy_rank_forks_nothing_after_its_first_step_and_resumes_across_epochs(manifest) -> None:
    """Three epochs of a 2-worker loader in a process with a running thread (as a rank has its
    tracker writer and process group): after the first batch the owner takes no fork and no new
    process appears (the per-epoch DataLoader forked 2 workers per epoch here); a loader resumed
    in the middle of epoch 0, or abandoned mid-epoch and iterated again, yields the uninterrupted
    batches bitwise across both epoch boundaries; ``close()`` ends the workers and joins their
    queue threads."""
    cfg = loader_config(manifest.path, workers=2)
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)
    busy.start()
    try:
        loader = build_train_loader(cfg, rank=1, world_size=2)
        assert len(loader) == 4
        it = iter(loader)
        full = [next(it)]  # the first step: the workers start here
        forks, procs = FORKS[0], _descendants()
        full += list(it) + list(loader) + list(loader)  # the rest of epoch 0, epochs 1 and 2
        assert [(b["epoch"], b["index"]) for b in full] == [(e, i) for e in range(3) for i in range(4)]
        assert FORKS[0] - forks == 0, "the loader forked its owner after the first step"
        assert _descendants() - procs == set(), "worker processes were started after the first step"
        workers = _worker_pids(loader)
        assert len(workers) == 2 and workers <= procs
        assert all(psutil.Process(w).ppid() != os.getpid() for w in workers)  # the fork server's
        feeders = [q._thread for q in loader._workers._iterator._index_queues if q._thread is not None]
        assert feeders and all(t.is_alive() for t in feeders)  # kept across epochs, as the workers
        loader.close()
        assert still_running(workers) == set()
        assert not any(t.is_alive() for t in feeders)  # joined: nothing left exiting
    finally:
        stop.set()
    state = loader.state_dict() | {"epoch": 0, "batches": 3}
    resumed = build_train_loader(cfg, rank=1, world_size=2, state=state)
    rest = list(resumed) + list(resumed) + list(resumed)  # 1 batch of epoch 0, epochs 1 and 2
    assert len(rest) == 9 and all(_same(a, b) for a, b in zip(rest, full[3:], strict=True))
    # abandoned with batches still in flight: the live workers restart at the loader's position
    again = []
    for batch in resumed:  # epoch 3
        break
    resumed.load_state_dict(state | {"epoch": 1, "batches": 0})  # back to epoch 1 on live workers
    for batch in resumed:
        again.append(batch)
        if len(again) == 2:
            break
    again += list(resumed) + list(resumed)
    assert len(again) == 8 and all(_same(a, b) for a, b in zip(again, full[4:], strict=True))
    resumed.close()


def test_a_failing_stream_ends_its_workers(manifest, tmp_path: Path) -> None:
    """An error raised in a worker (here: every shard damaged after epoch 0) reaches the caller
    and ends the persistent workers with it."""
    root = tmp_path / "shards"
    shutil.copytree(manifest.path.parent, root)
    loader = build_train_loader(loader_config(root / "manifest.json", workers=2), rank=0, world_size=2)
    assert len(list(loader)) == 4
    workers = _worker_pids(loader)
    assert len(workers) == 2 and still_running(workers, wait=0) == workers
    for shard in root.glob("*.tar"):
        shard.write_bytes(b"\0" * shard.stat().st_size)  # zeroed: no sample reads
    with pytest.raises(ShardError, match="unreadable"):
        list(loader)
    assert still_running(workers) == set()
    assert loader._workers is None


EXITING = """
import json, sys, time
import psutil
from data_helpers import loader_config
from bootmae_ds.data import build_train_loader

if __name__ == "__main__":  # workers come from the fork server, which imports this file
    loader = build_train_loader(loader_config(sys.argv[1], workers=2), rank=0, world_size=2)
    for epoch in range(2):
        for i, batch in enumerate(loader):
            if epoch == 1 and i == 1:
                print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
                if sys.argv[2] == "raise":
                    raise RuntimeError("a failing step")
                time.sleep(600)  # until killed
"""


# Covered in CI by test_data_dist (ranks that end normally: interpreter exit, the same atexit path)
# and test_faults' kill drill (ranks killed with SIGKILL); this adds an uncaught exception and a
# lone killed owner, for ~8 s each (idle 2-core machine).
@pytest.mark.extended
@pytest.mark.parametrize("end", ["raise", "kill"])
def test_no_worker_or_fork_server_outlives_its_owner(manifest, tmp_path: Path, end: str) -> None:
    """A run that fails by an exception, or is killed (SIGKILL), in the middle of an epoch leaves
    no worker and no fork server behind (before the workers watched their owner, a killed owner
    left its fork server and workers running for good: each holds the server's alive pipe)."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(EXITING))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(script), str(manifest.path), end], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = set(json.loads(proc.stdout.readline()))
        assert len(pids) >= 3  # the fork server and 2 workers (fork: the 2 workers of epoch 1)
        if end == "kill":
            proc.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == (1 if end == "raise" else -9), err[-2000:]
    assert end == "kill" or "a failing step" in err
    assert still_running(pids) == set()


EVALUATING = """
import json, sys, time
import psutil
from data_helpers import loader_config
from bootmae_ds.data.labelled import eval_batches, open_eval_source

if __name__ == "__main__":
    source = open_eval_source(sys.argv[1], loader_config(sys.argv[1], workers=2))
    for i, batch in enumerate(eval_batches(source, 32, 1.0, 0, 1, 4, None, 2)):
        print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
        time.sleep(600)  # until killed
"""


# The evaluation loaders start their workers through data.workers.eval_worker_options, the same
# owner watch as the training loader's (covered above): ~8 s (idle 2-core machine).
@pytest.mark.extended
def test_no_evaluation_worker_outlives_a_killed_rank(manifest, tmp_path: Path) -> None:
    """A rank killed (SIGKILL) in the middle of an evaluation leaves no evaluation worker and no
    fork server behind."""
    script = tmp_path / "evaluate.py"
    script.write_text(textwrap.dedent(EVALUATING))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(script), str(manifest.path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = set(json.loads(proc.stdout.readline()))
        assert len(pids) >= 3, proc.stderr.read()[-2000:]  # the fork server and 2 workers
        proc.kill()
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -9
    assert still_running(pids) == set()


def test_workers_and_their_fork_server_leave_the_preemption_signals_to_their_rank(manifest) -> None:
    """SLURM sends a job step's SIGUSR1 / SIGTERM to every process of the step: the fork server and
    the workers ignore both (a fork-server worker died of them, and its rank then failed instead of
    saving a checkpoint), the rank's own handlers stay as they were, and the epoch reads on whole."""
    from multiprocessing import forkserver

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with build_train_loader(loader_config(manifest.path, workers=2), rank=0, world_size=2) as loader:
        it = iter(loader)
        first = next(it)
        server = forkserver._forkserver._forkserver_pid
        targets = _worker_pids(loader) | {server}
        assert len(targets) == 3
        for pid in targets:
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in targets)
        rest = list(it)
    assert [b["index"] for b in [first, *rest]] == list(range(len(loader)))
    assert {sig: signal.getsignal(sig) for sig in before} == before
