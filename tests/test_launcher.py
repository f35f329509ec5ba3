"""The pre-training entry point runs end to end as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from bootmae_ds.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_smoke_runs_saves_config_and_learns(tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launchers/pretrain.py", "--config", "demo", "--output-dir", str(out),
         "--max-steps", "25", "--set", "model.depth=2", "model.feature_decoder.context_block=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "engine is not built yet" in proc.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["depth"] == 2 and load_config(out / "config.yaml").model.depth == 2
    rows = [json.loads(line) for line in (out / "smoke_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]


def test_bad_config_fails_before_work(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "launchers/pretrain.py", "--config", "demo", "--output-dir", str(tmp_path / "r"),
         "--set", "mask.num_masked=70"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "mask.num_masked=70" in proc.stderr
    assert not (tmp_path / "r").exists()
