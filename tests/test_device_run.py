"""The prepared GPU run cannot rot between device sessions: its script runs here, tiny, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from distributed import ROOT, cpu_env

PARTS = ["env", "tests", "step_vit_b", "step_vit_l", "jpeg_shards", "e2e_synthetic", "e2e_jpeg", "loader",
         "step_vit_b_compiled"]


@pytest.mark.slow
def test_device_run_smoke(tmp_path) -> None:
    env = cpu_env(OUT=str(tmp_path))
    env.pop("DS_ACCELERATOR")  # the script chooses the accelerator itself
    proc = subprocess.run(["bash", "bench/device/run.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    report = json.loads((tmp_path / "device_report.json").read_text())
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert proc.returncode == 0 and statuses == dict.fromkeys(PARTS, "ok"), (statuses, proc.stdout[-3000:])
    parts = report["parts"]
    assert parts["env"]["matmul_peak_tflops"] > 0 and parts["env"]["deepspeed"][0].isdigit()
    assert parts["tests"]["tests"] >= 4 and parts["tests"]["failures"] == parts["tests"]["errors"] == 0
    assert {"ours, BootMAE", "reference-style, BootMAE", "ours, MAE (8-block decoder)",
            "ours, momentum input 25%"} <= set(parts["step_vit_b"]["steps"])
    assert "ours, BootMAE, torch.compile" in parts["step_vit_b_compiled"]["steps"]
    for name in ("e2e_synthetic", "e2e_jpeg"):
        assert parts[name]["img_per_s"] > 0 and 0 <= parts[name]["data_wait_share"] < 1 and "mfu" in parts[name]
    assert parts["loader"]["img_per_s"] > 0
    assert set(report["targets"]) == {"mfu_vit_b", "ours_vs_reference", "bootmae_over_mae_step",
                                      "jpeg_vs_synthetic", "loader_vs_model"}
    assert (tmp_path / "device_run.log").stat().st_size > 0 and not os.path.exists(tmp_path / "device_report.json.tmp")
