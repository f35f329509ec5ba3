"""The device rehearsal: the prepared GPU run, tiny, on the CPU, in a virtual environment that holds
only what the lent GPU machine has (torch, torchvision, timm, numpy, pytest and what they require)
plus the wheels ``bench/device/prepare.sh`` carries, installed the way ``run.sh`` installs them
there. An import the wheels lack, a part that cannot finish in its time, or an ``$OUT`` the device
tool could not bring back fails here, not on the device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from distributed import ROOT, cpu_env

sys.path.insert(0, str(ROOT / "bench" / "device"))
from base_venv import make as make_base_venv

PARTS = ["env", "step_vit_b", "jpeg_shards", "e2e_synthetic", "e2e_jpeg", "loader", "tests", "step_vit_l",
         "step_segment", "step_vit_b_compiled"]
# What the device tool brings back from $OUT (../.library/device/README.md, Limits).
MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2


@pytest.fixture(scope="module")
def device_like(tmp_path_factory) -> dict[str, Path]:
    """The base-set venv and the carried wheels for this Python (downloaded as prepare.sh does)."""
    root = tmp_path_factory.mktemp("device")
    venv = root / "venv"
    make_base_venv(venv)
    wheels = root / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    proc = subprocess.run(["bash", "bench/device/prepare.sh", "--python", version, "--out", str(wheels)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {"venv": venv, "wheels": wheels}


def _smoke(device_like: dict[str, Path], out: Path, wheels: Path, *args: str) -> subprocess.CompletedProcess:
    env = cpu_env(OUT=str(out), BOOTMAE_DEVICE_WHEELS=str(wheels),
                  PATH=f"{device_like['venv'] / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for key in ("DS_ACCELERATOR", "PYTHONPATH", "OMP_NUM_THREADS", "BOOTMAE_DEVICE_T0"):
        env.pop(key, None)  # the script chooses them itself, as it will on the device
    return subprocess.run(["bash", "bench/device/run.sh", "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _returnable(out: Path) -> list[Path]:
    """Assert the device tool could bring ``out`` back whole; its files."""
    files = [p for p in out.rglob("*") if not p.is_dir()]
    assert 0 < len(files) <= MAX_FILES, files
    for f in files:
        assert f.is_file() and not f.is_symlink() and f.stat().st_size <= MAX_BYTES, f
        assert len(f.relative_to(out).parts) - 1 <= MAX_DEPTH, f
    return files


@pytest.mark.slow
def test_the_device_run_works_in_the_device_environment(device_like, tmp_path) -> None:
    venv_python = device_like["venv"] / "bin" / "python"
    missing = subprocess.run([str(venv_python), "-c", "import deepspeed"], capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'deepspeed'" in missing.stderr  # only the base set
    out = tmp_path / "out"
    proc = _smoke(device_like, out, device_like["wheels"])
    report = json.loads((out / "device_report.json").read_text())
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert proc.returncode == 0 and statuses == dict.fromkeys(PARTS, "ok"), (statuses, proc.stdout[-4000:])
    assert sorted(f.name for f in _returnable(out)) == ["device_logs.tar.gz", "device_report.json"]
    assert not Path(report["work_dir"]).exists()  # images, shards and run directories are gone
    with tarfile.open(out / "device_logs.tar.gz") as tar:
        logs = {Path(m.name).name for m in tar.getmembers()}
    assert {"device_run.log", "env.log", "e2e_synthetic.log", "gpu_tests.log"} <= logs
    parts = report["parts"]
    env = parts["env"]
    assert env["imports_ok"] and env["deepspeed_cpu_op_s"] >= 0 and env["cpu_cores_usable"] >= 1
    assert Path(env["executable"]).parent == venv_python.parent  # ran in the device-like venv
    assert env["imports"]["deepspeed"].startswith("0.") and env["matmul_peak_tflops"] > 0
    assert {"gcc", "python_headers", "dev_shm_gib"} <= set(env)
    assert report["started_after_s"] < 60  # the budget counts from run.sh's start, the install included
    assert parts["tests"]["collected"] >= 4 and parts["tests"]["failed"] == 0  # skipped without CUDA
    assert {"ours, BootMAE", "reference-style, BootMAE", "ours, MAE (8-block decoder)",
            "ours, momentum input 25%"} <= set(parts["step_vit_b"]["steps"])
    assert "ours, BootMAE, torch.compile" in parts["step_vit_b_compiled"]["steps"]
    for name in ("e2e_synthetic", "e2e_jpeg"):
        e2e = parts[name]
        assert e2e["img_per_s"] > 0 and 0 <= e2e["data_wait_share"] < 1 and "mfu" in e2e, e2e
        assert e2e["steps_timed"] == 5 and not e2e["epoch_boundary_in_window"] and e2e["ema_update_s"] > 0
    assert parts["loader"]["img_per_s"] > 0 and parts["loader"]["timed_batches"] > 0
    assert {"mfu_vit_b", "ours_vs_reference", "bootmae_over_mae_step", "jpeg_vs_synthetic", "loader_vs_model",
            "peak_memory_vit_b_b256_gib", "peak_memory_vit_l_b128_gib", "segment_step_vit_b_512"} <= set(report["targets"])

    # A wheel left out (msgpack, which DeepSpeed imports) is named by the first part, in seconds.
    partial = tmp_path / "partial_wheels"
    shutil.copytree(device_like["wheels"], partial)
    for wheel in partial.glob("msgpack-*.whl"):
        wheel.unlink()
    out2 = tmp_path / "out2"
    proc = _smoke(device_like, out2, partial, "--parts", "env")
    env = json.loads((out2 / "device_report.json").read_text())["parts"]["env"]
    assert proc.returncode != 0 and env["status"] == "failed" and not env["imports_ok"], env
    assert "msgpack" in env["imports"]["deepspeed"], env["imports"]


# -- the run's time keeping, without a device ---------------------------------------------------
def _run(tmp_path: Path, budget_s: float):
    from run import Run

    os.environ.pop("BOOTMAE_DEVICE_T0", None)
    (tmp_path / "out").mkdir(exist_ok=True)
    return Run(tmp_path / "out", budget_s, smoke=False, keep_work=False)


def test_a_part_out_of_time_loses_its_whole_process_tree_but_keeps_its_figures(tmp_path) -> None:
    import psutil
    from run import PARTS, finished

    run = _run(tmp_path, 360)
    figures = tmp_path / "figures.json"
    # a part that wrote a figure, then hangs in a grandchild (as a rank's loader worker would)
    script = f"echo '{{\"img_per_s\": 12.5}}' > {figures}; sleep 300 & sleep 300"
    entry = run.part(PARTS[0], lambda r, limit: finished(r, r.sh(["bash", "-c", script], 1.0, "hang"), "hang",
                                                        json.loads(figures.read_text())))
    assert entry["status"] == "timeout" and entry["img_per_s"] == 12.5 and entry["wall_s"] < 15
    sleeping = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "300"]]
    assert sleeping == []  # the group was killed, the background child too
    report = json.loads((tmp_path / "out" / "device_report.json").read_text())
    assert report["parts"]["env"]["status"] == "timeout"  # rewritten right after the part
    run.finish()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["device_logs.tar.gz", "device_report.json"]
    assert not run.work.exists()


def test_a_part_whose_minimum_no_longer_fits_is_skipped_and_says_why(tmp_path) -> None:
    from run import PARTS

    run = _run(tmp_path, 30)  # less than the install reserve leaves for anything
    entry = run.part(PARTS[3], lambda r, limit: {"status": "ok"})
    assert entry["status"] == "skipped" and "needs at least 30 s" in entry["reason"]
    run.finish()


def test_e2e_figures_skip_warmup_and_keep_to_one_epoch(tmp_path) -> None:
    from run import e2e_figures

    rows = [{"step": s, "epoch": 0 if s <= 8 else 1, "step_time_s": 0.5 if s > 2 else 3.0, "samples_per_s": 512.0,
             "data_wait_s": 0.05, "ema_update_s": 0.01, "memory_gb": 10.0 + s, "mfu": 0.4} for s in range(1, 11)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))  # a run cut short after 6 steps
    partial = e2e_figures(metrics, warmup=2)
    assert partial["steps_timed"] == 4 and partial["img_per_s"] == 512.0 and not partial["epoch_boundary_in_window"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = e2e_figures(metrics, warmup=2)
    assert whole["steps_timed"] == 6 and whole["epoch_boundary_in_window"]  # steps 9-10 are the next epoch's
    assert whole["data_wait_share"] == pytest.approx(0.1) and whole["peak_memory_gib"] == 20.0
