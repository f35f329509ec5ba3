"""The loader under real DeepSpeed ranks: 2 CPU ranks (gloo) x 2 workers each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from data_helpers import make_shards, still_running

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_ranks_get_equal_disjoint_batches(tmp_path: Path) -> None:
    manifest = make_shards(tmp_path)  # 60 samples in 7 uneven shards
    out = tmp_path / "out"
    out.mkdir()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()),
           "tests/dist_scripts/data_ranks.py", str(manifest.path), str(out)]
    # The launcher sets the rank variables itself; none may leak in from the calling shell.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    run = subprocess.run(
        cmd, cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["gathered_counts"] == [[7, 7], [7, 7]]  # 60 // (2 ranks x 4) per epoch
    ranks = result["ranks"]
    assert all(r["resume_ok"] for r in ranks)  # rebuilt at micro-batch 3: identical batches
    for epoch in range(2):
        a, b = ranks[0]["keys"][epoch], ranks[1]["keys"][epoch]
        assert len(a) == len(set(a)) == 28 and len(b) == len(set(b)) == 28
        assert not set(a) & set(b)
    assert ranks[0]["keys"][0] != ranks[0]["keys"][1]
    # each rank: a fork server and its 2 x 2 persistent workers (two loaders), none left running
    started = {pid for r in ranks for pid in r["started"]}
    assert all(len(r["started"]) >= 5 for r in ranks), ranks
    assert still_running(started) == set()
