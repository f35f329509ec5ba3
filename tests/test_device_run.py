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
    assert {"gcc", "python_headers", "dev_shm_gib", "torchvision", "timm", "cudnn", "deepspeed"} <= set(env)
    assert env["sdpa_vit_b"]["dispatched"] == "flash_cpu"  # the backend the ViT-B shapes dispatch to
    assert report["shm"]["action"] == "none" and report["shm"]["workers"] == 1  # checked before the parts
    assert report["nccl_debug"] == "WARN"
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
    script = f"echo '{{\"img_per_s\": 12.5}}' > {figures}; sleep 313.5 & sleep 313.5"  # a duration no other process uses
    entry = run.part(PARTS[0], lambda r, limit: finished(r, r.sh(["bash", "-c", script], 1.0, "hang"), "hang",
                                                        json.loads(figures.read_text())))
    assert entry["status"] == "timeout" and entry["img_per_s"] == 12.5 and entry["wall_s"] < 15
    sleeping = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "313.5"]]
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
    assert entry["status"] == "skipped" and "needs at least 25 s" in entry["reason"]
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


def test_every_part_has_a_status_and_a_part_that_cannot_run_says_why(tmp_path, monkeypatch) -> None:
    """The JPEG shards fail: the JPEG end-to-end part and the loader part, which need them, are
    recorded as skipped with the reason; every other part still runs. (The parts' commands are
    stand-ins here: what is checked is the run's bookkeeping; the rehearsal runs the real ones.)"""
    import run

    def fails(r, limit):
        raise RuntimeError("disk full")

    for name in ("env_part", "step_part", "e2e_part", "tests_part"):
        monkeypatch.setattr(run, name, lambda *a, **k: {"status": "ok"})
    monkeypatch.setattr(run, "jpeg_part", fails)
    for key in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "NCCL_DEBUG", "BOOTMAE_DEVICE_T0"):
        monkeypatch.delenv(key, raising=False)  # main() sets them for its parts: restored after
    monkeypatch.setattr(sys, "argv", ["run.py", "--smoke", "--out", str(tmp_path / "out")])
    assert run.main() == 1
    report = json.loads((tmp_path / "out" / "device_report.json").read_text())
    parts = report["parts"]
    assert list(parts) == PARTS[:3] + ["e2e_synthetic", "e2e_jpeg", "loader"] + PARTS[6:]
    assert parts["jpeg_shards"]["status"] == "failed" and "disk full" in parts["jpeg_shards"]["error"]
    for name in ("e2e_jpeg", "loader"):
        assert parts[name]["status"] == "skipped", parts[name]
        assert parts[name]["reason"].startswith("needs the JPEG shards, which jpeg_shards did not make (failed")
    assert all(parts[n]["status"] == "ok" for n in PARTS if n not in ("jpeg_shards", "e2e_jpeg", "loader"))


def test_the_jpeg_images_are_made_in_small_tasks_that_keep_every_worker_busy() -> None:
    from parts import jpeg_tasks

    tasks = jpeg_tasks(Path("src"), 32 * 256, 16, (375, 500))
    assert sum(t[3] for t in tasks) == 8192 and max(t[3] for t in tasks) == 64 and len(tasks) == 128
    assert len({(t[1], t[2]) for t in tasks}) == len(tasks)  # one folder per task
    # on 15 workers the last round holds 128 % 15 = 8 tasks: no worker waits more than one task
    # (class-sized tasks, 16 of them, took two full rounds)
    assert len(jpeg_tasks(Path("src"), 256, 16, (48, 64))) == 16


def test_dev_shm_is_made_large_enough_or_the_workers_fewer() -> None:
    """bench/device/shm.py's decision, with /dev/shm's free bytes and the remount stood in for:
    15 workers need 15 x 2 batches x 38.5 MB x 1.5 = 1.6 GiB."""
    from shm import ensure, need_bytes

    gib = 2**30
    plenty = ensure(15, 256, 224, free=lambda: 24 * gib, grow=None, root=True)
    assert plenty["action"] == "none" and plenty["workers"] == 15 and plenty["need_gib"] == pytest.approx(1.61, abs=0.01)
    size = {"free": 64 * 2**20}  # a container's 64 MB default
    asked = []

    def grow(n: int) -> None:
        asked.append(n)
        size["free"] = n

    remounted = ensure(15, 256, 224, free=lambda: size["free"], grow=grow, root=True)
    assert remounted["action"] == "remounted" and remounted["workers"] == 15 and asked == [2 * need_bytes(15, 256, 224)]
    size["free"] = 600 * 2**20
    failed = ensure(15, 256, 224, free=lambda: size["free"], grow=lambda n: "mount: permission denied", root=True)
    assert failed["action"] == "fewer workers (remount failed)" and failed["workers"] == 5, failed
    assert failed["remount_error"] == "mount: permission denied"
    not_root = ensure(15, 256, 224, free=lambda: 64 * 2**20, grow=None, root=False)
    assert not_root["action"] == "fewer workers (not root: no remount)" and not_root["workers"] == 1


def _install(tmp_path: Path, wheels: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = cpu_env(OUT=str(out), BOOTMAE_DEVICE_WHEELS=str(wheels), BOOTMAE_DEVICE_DEPS=str(tmp_path / "deps"))
    proc = subprocess.run(["bash", "bench/device/run.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, check=False,
                          text=True, timeout=120)
    return proc, json.loads((out / "device_report.json").read_text())


def test_a_wheel_set_for_another_python_is_refused_and_a_failed_install_comes_back_as_a_file(tmp_path) -> None:
    import platform

    from wheels import mismatched

    cp311 = [Path(n) for n in ("pydantic_core-2.46.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                               "msgpack-1.2.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                               "psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl",
                               "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                               "pydantic-2.13.4-py3-none-any.whl")]
    assert [w.split(" ")[0].split("-")[0] for w in mismatched(cp311, "3.12")] == ["pydantic_core", "msgpack"]
    assert [w.split("-")[0] for w in mismatched(cp311, "3.11")] == ["pycocotools"]  # abi3 of a later Python
    assert mismatched(cp311, "3.10") == [f"{cp311[i].name} ({t})" for i, t in
                                         ((0, "tags cp311-cp311-manylinux2014_x86_64,cp311-cp311-manylinux_2_17_x86_64"),
                                          (1, "tags cp311-cp311-manylinux2014_x86_64,cp311-cp311-manylinux_2_17_x86_64"),
                                          (3, "tags cp312-abi3-manylinux2014_x86_64,cp312-abi3-manylinux_2_17_x86_64"))]

    # run.sh refuses a set for another Python before pip, and the refusal is device_report.json
    here = f"{sys.version_info.major}{sys.version_info.minor}"
    other = "312" if here != "312" else "311"
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / f"msgpack-1.2.4-cp{other}-cp{other}-manylinux_2_17_x86_64.whl").write_bytes(b"")
    (wrong / "pydantic-2.13.4-py3-none-any.whl").write_bytes(b"")
    proc, report = _install(tmp_path, wrong)
    assert proc.returncode == 2 and report["status"] == "install_failed", proc.stderr
    assert report["python"] == platform.python_version() and f"msgpack-1.2.4-cp{other}" in report["error"]
    assert "prepare.sh --python" in report["error"] and report["parts"] == {}
    # a wheel for this Python that pip cannot install: pip's own error comes back
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    proc, report = _install(tmp_path, broken)
    assert proc.returncode == 2 and report["status"] == "install_failed"
    assert report["error"].startswith("pip install: ") and "broken-1.0-py3-none-any.whl" in report["error"], report
    # a set too large to travel (opencv-python-headless alone is 64 MB): refused, naming the largest
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "opencv_python_headless-5.1.0.95-cp37-abi3-manylinux_2_28_x86_64.whl", "wb") as f:
        f.truncate(61 * 2**20)  # sparse: no 61 MiB written
    (big / "pydantic-2.13.4-py3-none-any.whl").write_bytes(b"")
    proc, report = _install(tmp_path, big)
    assert proc.returncode == 2 and report["status"] == "install_failed", proc.stderr
    assert "61.0 MiB" in report["error"] and "opencv_python_headless" in report["error"] and "BASE" in report["error"]


def test_the_wheel_set_leaves_out_what_the_device_image_has() -> None:
    from wheels import carried

    names = carried("3.12")
    assert "opencv-python-headless" not in names and "deepspeed" in names and "pydantic" in names
