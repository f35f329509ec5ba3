"""The GPU run, in one call, every part time-boxed inside one budget that counts from
``run.sh``'s start (the wheel install included). Started by ``bench/device/run.sh``.

    bash bench/device/run.sh [--budget-s 360]       # on the lent GPU machine (OUT set by the tool)
    bash bench/device/run.sh --smoke                # the same run, tiny, on a CPU (the rehearsal)

Parts, in order of what the figures are worth (each in its own process group, killed with its
children when its time is up; the figures it finished are kept; a part whose minimum no longer
fits is skipped and says so):
  env            GPU, driver, torch, CUDA, DeepSpeed, every import the run needs, usable cores,
                 /dev/shm, gcc and Python headers (torch.compile), the bf16 GEMM peak (MFU base)
  step_vit_b     bench/step.py, ViT-B/16 224 px batch 256 bf16: ours, reference-style, MAE,
                 momentum input 25% (img/s, MFU against the measured peak, peak memory)
  jpeg_shards    ImageNet-size JPEGs (500x375 q90) generated here and built into shards
  e2e_synthetic  deepspeed launchers/pretrain.py, the ViT-B recipe at micro-batch 256, synthetic
  e2e_jpeg       the same on the JPEG shards (one epoch holds warm-up and timed steps)
  loader         the loader alone on those shards, one epoch, the e2e run's batch and workers
  tests          pytest tests/test_gpu.py (the GPU path's correctness checks that fit)
  step_vit_l     bench/step.py, ViT-L/16 batch 128 (img/s, MFU, peak memory)
  step_segment   bench/step.py --only segment: a UperNet training step on ViT-B/16 at 512 px, batch 2
                 (the official ADE20K recipe's per-GPU batch): img/s, MFU, peak memory
  step_vit_b_compiled  our ViT-B step under torch.compile (last: the slowest to build)

``$OUT`` receives exactly two files: ``device_report.json`` (every figure with its units, the
targets of the GPU issue evaluated against this run's figures; rewritten after every part) and
``device_logs.tar.gz`` (every part's log; rewritten after every part). Work files (images,
shards, run directories) live in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import shm
from parts import usable_cores

DEFAULT_BUDGET_S = {"device": 360.0, "smoke": 720.0}
INSTALL_RESERVE_S = 25.0  # the wheel install before run.py starts, and the final archive
# Targets of the GPU issue, checked against the figures of the same run.
TARGETS = {"mfu_vit_b": 0.35, "ours_vs_reference": 2.5, "bootmae_over_mae_step_max": 1.60,
           "jpeg_vs_synthetic_max_loss": 0.05}
SMOKE_MODEL = ["model.img_size=32", "model.patch_size=8", "mask.num_masked=12", "mask.block_budget=8",
               "mask.min_block_patches=2", "mask.max_block_patches=6"]
E2E_WARMUP_STEPS = 5


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # its share of the default 360-s device budget (scaled with --budget-s)
    minimum_s: float  # below this it cannot finish anything: skipped
    smoke_budget_s: float  # its share of the smoke run's budget (CPU ranks start slowly)


PARTS = [Part("env", 27, 8, 200), Part("step_vit_b", 50, 25, 50), Part("jpeg_shards", 25, 8, 30),
         Part("e2e_synthetic", 38, 25, 75), Part("e2e_jpeg", 38, 25, 75), Part("loader", 20, 10, 30),
         Part("tests", 92, 40, 60), Part("step_vit_l", 25, 15, 40), Part("step_segment", 20, 10, 40),
         Part("step_vit_b_compiled", 0, 30, 50)]
# The device shares add up to the default budget less the install reserve (335 s: the scale is 1),
# each with margin over its estimated time (docs/benchmarks.md, GPU, the budget table): the end-to-end
# parts need about half of their former 50 s, which went to the tests (pytest's start-up, the
# profiler, engine_facts.py, three pre-training launches and an export) and the env part (a cold
# disk). step_vit_b_compiled has no share: it gets whatever the others left (the first to be
# skipped). On a CPU the env part also builds DeepSpeed's shared-memory op (see parts.py): 30-60 s
# on an idle 2-core machine, 127 s on a busy one (2026-12-06), hence its large smoke share.
E2E_JPEG_BATCHES = 32  # micro-batches of 256 JPEGs: one epoch holds the 30 steps of an e2e run


class Run:
    """The report, the logs and the time budget of one device run."""

    def __init__(self, out: Path, budget_s: float, smoke: bool, keep_work: bool) -> None:
        self.out, self.smoke, self.keep_work = out, smoke, keep_work
        self.t0 = float(os.environ.get("BOOTMAE_DEVICE_T0") or time.time())  # run.sh's start
        self.budget_s = budget_s
        self.work = Path(tempfile.mkdtemp(prefix="bootmae_device_"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        shares = sum(p.smoke_budget_s if smoke else p.budget_s for p in PARTS)
        self.scale = (budget_s - INSTALL_RESERVE_S) / shares
        self.report: dict = {"date": time.strftime("%Y-%m-%d"), "smoke": smoke, "budget_s": budget_s,
                             "command": " ".join(sys.argv), "work_dir": str(self.work),
                             "started_after_s": round(time.time() - self.t0, 1), "parts": {}, "targets": {}}
        self.log_file = open(self.logs / "device_run.log", "a")  # noqa: SIM115 - closed in finish()
        self.workers = 1 if smoke else max(1, min(15, usable_cores() - 1))  # loader workers, after shm_check

    # -- bookkeeping ---------------------------------------------------------------------------
    def log(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:5.1f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.t0 + self.budget_s - time.time()

    def save(self) -> None:
        """The report and the log archive, both replaced atomically (the only files in $OUT)."""
        self.report["targets"] = targets(self.report["parts"])
        self.report["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.out / ".device_report.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        os.replace(tmp, self.out / "device_report.json")
        tmp = self.out / ".device_logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for log in sorted(self.logs.iterdir()):
                tar.add(log, arcname=f"device_logs/{log.name}")
        os.replace(tmp, self.out / "device_logs.tar.gz")

    def finish(self) -> None:
        self.log(f"done in {time.time() - self.t0:.0f} s of {self.budget_s:.0f}; report: "
                 f"{self.out / 'device_report.json'}")
        self.save()
        self.log_file.close()
        if not self.keep_work:
            subprocess.run(["rm", "-rf", str(self.work)], check=False)

    def skip(self, name: str, reason: str) -> None:
        """Record a part that does not run, with the reason (every part has a status)."""
        self.report["parts"][name] = {"status": "skipped", "reason": reason}
        self.log(f"{name}: skipped ({reason})")
        self.save()

    def shm_check(self) -> None:
        """Room in /dev/shm for the end-to-end parts' loader workers, before any part starts
        (bench/device/shm.py): remounted larger as root, or fewer workers, said in the report."""
        wanted = 1 if self.smoke else max(1, min(15, usable_cores() - 1))
        batch, img = (8, 32) if self.smoke else (256, 224)
        try:
            self.report["shm"] = shm.ensure(wanted, batch, img)
        except Exception as err:  # noqa: BLE001 - the parts still run, with the workers wanted
            self.report["shm"] = {"action": "check failed", "error": f"{type(err).__name__}: {err}",
                                  "workers": wanted}
        self.workers = self.report["shm"]["workers"]
        self.log(f"/dev/shm: {self.report['shm']}")

    # -- parts ---------------------------------------------------------------------------------
    def part(self, spec: Part, fn: Callable[[Run, float], dict]) -> dict:
        """Run ``fn(run, seconds)`` within this part's share and what is left; its entry."""
        share = (spec.smoke_budget_s if self.smoke else spec.budget_s) * self.scale
        left = self.left() - INSTALL_RESERVE_S / 5  # keep a few seconds for the final archive
        limit = min(share, left) if share > 0 else left
        entry: dict = {"status": "skipped", "budget_s": round(limit, 1)}
        self.report["parts"][spec.name] = entry
        if limit < spec.minimum_s:
            entry["reason"] = f"needs at least {spec.minimum_s:.0f} s, {max(left, 0):.0f} s of the run left"
            self.log(f"{spec.name}: skipped ({entry['reason']})")
            self.save()
            return entry
        self.log(f"{spec.name}: starting ({limit:.0f} s)")
        start = time.monotonic()
        try:
            entry.update(fn(self, limit))
        except Exception as err:  # noqa: BLE001 - a failed part is reported, the run goes on
            entry.update(status="failed", error=f"{type(err).__name__}: {err}"[-2000:])
        entry["wall_s"] = round(time.monotonic() - start, 1)
        self.log(f"{spec.name}: {entry['status']} in {entry['wall_s']} s")
        self.save()
        return entry

    def sh(self, cmd: list[str], limit: float, name: str, env: dict | None = None) -> str:
        """Run ``cmd`` in its own process group, its output in ``logs/<name>.log``; kill the
        group (launcher, ranks, loader workers) if it outlives ``limit``. Returns the status:
        ok, timeout, or failed (exit status N)."""
        self.log(f"$ {' '.join(cmd)}")
        with open(self.logs / f"{name}.log", "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                return "timeout"
            kill_group(proc)  # whatever it left behind (a rank's loader workers) goes too
        return "ok" if code == 0 else f"failed (exit status {code})"

    def tail(self, name: str, chars: int = 1500) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            proc.poll()
            time.sleep(0.1)


def finished(run: Run, status: str, name: str, figures: dict | None) -> dict:
    """A part's entry: its status, the figures it got to (also after a time-out), the log tail."""
    entry = {"status": "ok" if status == "ok" else ("timeout" if status == "timeout" else "failed")}
    if figures:
        entry.update(figures)
    if status != "ok":
        entry["error"] = f"{status}: {run.tail(name)}"
    return entry


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the parts ----------------------------------------------------------------------------------
def env_part(run: Run, limit: float) -> dict:
    out = run.work / "env.json"
    status = run.sh([sys.executable, "bench/device/parts.py", "env", "--json", str(out)], limit, "env")
    return finished(run, status, "env", read_json(out))


def step_part(run: Run, limit: float, size: str, batch: int, only: str, name: str) -> dict:
    out = run.work / f"{name}.json"
    if run.smoke:
        args = ["--size", "tiny", "--batch", "2", "--steps", "1", "--dtype", "fp32", "--device", "cpu",
                "--compile-backend", "eager", "--seg-img", "64", "--set", *SMOKE_MODEL]  # inductor: minutes on a CPU
    else:
        args = ["--size", size, "--batch", str(batch), "--steps", "10", "--dtype", "bf16", "--device", "cuda"]
    args += ["--only", only, "--fractions", "0.25", "--json", str(out)]
    if peak := run.report["parts"].get("env", {}).get("matmul_peak_tflops"):
        args += ["--peak-tflops", f"{peak:.3f}"]
    status = run.sh([sys.executable, "bench/step.py", *args], limit, name)
    return finished(run, status, name, read_json(out))


def jpeg_part(run: Run, limit: float) -> dict:
    out = run.work / "jpeg.json"
    images, size = (256, "48x64") if run.smoke else (E2E_JPEG_BATCHES * 256, "375x500")
    status = run.sh([sys.executable, "bench/device/parts.py", "jpeg", "--out", str(run.work), "--images",
                     str(images), "--size", size, "--json", str(out)], limit, "jpeg_shards")
    return finished(run, status, "jpeg_shards", read_json(out))


def e2e_settings(run: Run, train: str) -> tuple[str, list[str], int]:
    """The config, overrides and steps of an end-to-end run: warm-up and timed steps inside one
    epoch of the data (a loader restart in the timed window would be charged to the data)."""
    common = [f"data.train={train}", "logging.trackers=[]", "logging.knn_every_steps=null",
              "logging.every_steps=5", "logging.preview_every_steps=100000", "checkpoint.every_steps=100000"]
    if run.smoke:
        sets = [*common, "data.global_batch_size=8", "data.micro_batch_size=8", "data.num_workers=1",
                "model.depth=1", "model.feature_decoder.context_block=0"]
        return "demo", sets + (["data.num_samples=256"] if train == "synthetic" else []), 6
    sets = [*common, "data.global_batch_size=256", "data.micro_batch_size=256", f"data.num_workers={run.workers}"]
    return "vit_base_800ep", sets + (["data.num_samples=16384"] if train == "synthetic" else []), 30


def e2e_part(run: Run, limit: float, train: str, name: str) -> dict:
    out = run.work / name
    config, sets, steps = e2e_settings(run, train)
    if peak := run.report["parts"].get("env", {}).get("matmul_peak_tflops"):
        sets.append(f"logging.peak_tflops={peak:.3f}")
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if run.smoke else None
    # The run's end-of-run checkpoint goes into the temporary folder with the rest of it.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           "launchers/pretrain.py", "--config", config, "--output-dir", str(out), "--max-steps", str(steps),
           "--resume", "never", "--set", *sets]
    status = run.sh(cmd, limit, name, env)
    return finished(run, status, name, e2e_figures(out / "metrics.jsonl", E2E_WARMUP_STEPS if not run.smoke else 1))


def e2e_figures(metrics: Path, warmup: int) -> dict | None:
    """Throughput of the steps after ``warmup`` that share the first timed step's epoch."""
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    except (OSError, ValueError):
        return None
    if len(rows) <= warmup:
        return {"steps_logged": len(rows)} if rows else None
    timed = [r for r in rows[warmup:] if r["epoch"] == rows[warmup]["epoch"]]
    total = sum(r["step_time_s"] for r in timed)
    out = {"steps_logged": len(rows), "steps_timed": len(timed), "epoch_boundary_in_window": len(timed) < len(rows) - warmup,
           "img_per_s": sum(r["samples_per_s"] * r["step_time_s"] for r in timed) / total,
           "data_wait_share": sum(r["data_wait_s"] for r in timed) / total,
           "ema_update_s": sum(r["ema_update_s"] for r in timed) / len(timed),
           "peak_memory_gib": max(r.get("memory_gb", 0.0) for r in rows)}
    if all("mfu" in r for r in timed):
        out["mfu"] = sum(r["mfu"] * r["step_time_s"] for r in timed) / total
    return out


def loader_part(run: Run, limit: float, manifest: str) -> dict:
    out = run.work / "loader.json"
    config, sets, _ = e2e_settings(run, manifest)
    batch = 8 if run.smoke else 256
    workers = run.workers
    model = [s for s in sets if s.startswith("model.")]
    cmd = [sys.executable, "bench/device/parts.py", "loader", "--manifest", manifest, "--config", config,
           "--batch", str(batch), "--workers", str(workers), "--warmup", "2" if run.smoke else "4",
           "--json", str(out), *(["--set", *model] if model else [])]
    return finished(run, run.sh(cmd, limit, "loader"), "loader", read_json(out))


def tests_part(run: Run, limit: float) -> dict:
    """tests/test_gpu.py alone; each test stopped after its share (pytest-timeout), so the XML
    is written; the verbose log is parsed when pytest itself was cut short."""
    xml = run.work / "gpu_tests.xml"
    per_test = max(20, int(limit - 15))
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-v", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={xml}", f"--timeout={per_test}", "-m", "gpu and not gpu_long"]
    status = run.sh(cmd, limit, "gpu_tests")
    figures = junit_cases(xml) or verbose_cases(run.tail("gpu_tests", 200_000))
    if status.startswith("failed") and figures and not figures.get("failed") and not figures.get("errors"):
        status = "ok" if figures.get("passed", 0) + figures.get("skipped", 0) == figures["collected"] else status
    return finished(run, status, "gpu_tests", figures)


def junit_cases(xml: Path) -> dict | None:
    try:
        suite = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite[0]
    cases = {}
    for case in suite.iter("testcase"):
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        cases[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
    return summarise(cases)


def verbose_cases(log: str) -> dict | None:
    cases = {}
    for line in log.splitlines():  # "tests/test_gpu.py::test_x PASSED [ 25%]"
        if "::" in line and any(w in line for w in (" PASSED", " FAILED", " SKIPPED", " ERROR")):
            name = line.split("::", 1)[1].split()[0]
            word = line.split("::", 1)[1].split()[1]
            cases[name] = {"outcome": {"PASSED": "passed", "SKIPPED": "skipped"}.get(word, "failed")}
    return summarise(cases) if cases else None


def summarise(cases: dict) -> dict:
    count = {k: sum(c["outcome"] == k for c in cases.values()) for k in ("passed", "failed", "skipped")}
    return {"collected": len(cases), **count, "cases": cases}


# -- targets ------------------------------------------------------------------------------------
def targets(parts: dict) -> dict:
    """The GPU issue's targets against this run's figures (what the finished parts allow)."""
    out: dict = {}
    steps = parts.get("step_vit_b", {}).get("steps", {})
    ours, ref, mae = (steps.get(k) for k in ("ours, BootMAE", "reference-style, BootMAE",
                                              "ours, MAE (8-block decoder)"))
    if ours:
        out["mfu_vit_b"] = {"value": ours["mfu"], "target": f">= {TARGETS['mfu_vit_b']}", "goal": ">= 0.45",
                            "met": ours["mfu"] >= TARGETS["mfu_vit_b"]}
        out["peak_memory_vit_b_b256_gib"] = {"value": ours.get("peak_memory_gib")}
    if ours and ref:
        ratio = ref["s_per_step"] / ours["s_per_step"]
        out["ours_vs_reference"] = {"value": ratio, "target": f">= {TARGETS['ours_vs_reference']}",
                                    "met": ratio >= TARGETS["ours_vs_reference"]}
    if ours and mae:
        ratio = ours["s_per_step"] / mae["s_per_step"]
        out["bootmae_over_mae_step"] = {"value": ratio, "target": f"<= {TARGETS['bootmae_over_mae_step_max']}",
                                        "met": ratio <= TARGETS["bootmae_over_mae_step_max"]}
    large = parts.get("step_vit_l", {}).get("steps", {}).get("ours, BootMAE")
    if large:
        out["peak_memory_vit_l_b128_gib"] = {"value": large.get("peak_memory_gib"), "mfu": large["mfu"]}
    segment = next(iter(parts.get("step_segment", {}).get("steps", {}).values()), None)
    if segment:
        out["segment_step_vit_b_512"] = {"img_per_s": segment["img_per_s"], "mfu": segment["mfu"],
                                         "peak_memory_gib": segment.get("peak_memory_gib")}
    synth, jpeg = parts.get("e2e_synthetic", {}), parts.get("e2e_jpeg", {})
    if "img_per_s" in synth and "img_per_s" in jpeg:
        ratio = jpeg["img_per_s"] / synth["img_per_s"]
        out["jpeg_vs_synthetic"] = {"value": ratio, "target": f">= {1 - TARGETS['jpeg_vs_synthetic_max_loss']}",
                                    "met": ratio >= 1 - TARGETS["jpeg_vs_synthetic_max_loss"],
                                    "data_wait_share_jpeg": jpeg["data_wait_share"]}
    loader = parts.get("loader", {})
    if ours and "img_per_s" in loader:
        ratio = loader["img_per_s"] / ours["img_per_s"]
        out["loader_vs_model"] = {"value": ratio, "target": ">= 1 (never the bottleneck)", "met": ratio >= 1}
    return out


# -- the run ------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_out")))
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"wall seconds for everything, from run.sh's start (default "
                             f"{DEFAULT_BUDGET_S['device']:.0f}; {DEFAULT_BUDGET_S['smoke']:.0f} with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (the rehearsal)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--parts", default=None, help=f"comma list, of {','.join(p.name for p in PARTS)} (default all)")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    budget = a.budget_s or DEFAULT_BUDGET_S["smoke" if a.smoke else "device"]
    run = Run(a.out, budget, a.smoke, a.keep_work)
    if a.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # tiny CPU steps: several threads per process only spin against each other (10x slower
        # on a busy 2-core machine)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    chosen = set(a.parts.split(",")) if a.parts else {p.name for p in PARTS}
    if unknown := chosen - {p.name for p in PARTS}:
        parser.error(f"--parts: no part named {sorted(unknown)}")
    by_name = {p.name: p for p in PARTS if p.name in chosen}
    def part(name: str, fn: Callable[[Run, float], dict]) -> dict:
        return run.part(by_name[name], fn) if name in by_name else {}

    # NCCL's INFO lines would bury a part's log (its tail goes into the report); warnings stay
    run.report["nccl_debug"] = os.environ.setdefault("NCCL_DEBUG", "WARN")
    try:
        run.shm_check()
        part("env", env_part)
        part("step_vit_b", lambda r, s: step_part(r, s, "base", 256, "ours,reference,mae,fractions", "step_vit_b"))
        jpeg = part("jpeg_shards", jpeg_part)
        part("e2e_synthetic", lambda r, s: e2e_part(r, s, "synthetic", "e2e_synthetic"))
        if shards := jpeg.get("manifest"):
            part("e2e_jpeg", lambda r, s: e2e_part(r, s, shards, "e2e_jpeg"))
            part("loader", lambda r, s: loader_part(r, s, shards))
        else:
            for name in ("e2e_jpeg", "loader"):
                if name in by_name:
                    run.skip(name, f"needs the JPEG shards, which jpeg_shards did not make "
                                   f"({jpeg.get('status', 'not run')}{': ' + jpeg['reason'] if 'reason' in jpeg else ''})")
        part("tests", tests_part)
        part("step_vit_l", lambda r, s: step_part(r, s, "large", 128, "ours", "step_vit_l"))
        part("step_segment", lambda r, s: step_part(r, s, "base", 2, "segment", "step_segment"))
        env = run.report["parts"].get("env", {})
        if env.get("compile_ready", True):
            part("step_vit_b_compiled", lambda r, s: step_part(r, s, "base", 256, "compiled", "step_vit_b_compiled"))
        elif "step_vit_b_compiled" in by_name:
            run.skip("step_vit_b_compiled", "torch.compile cannot build its kernels here: no "
                     f"{' and no '.join(env['compile_missing'])}")
    finally:
        for name in by_name:  # a part never reached (the run stopped early) says so too
            if name not in run.report["parts"]:
                run.skip(name, "not reached: the run stopped before it (see device_run.log)")
        run.finish()
    return 0 if all(p["status"] == "ok" for p in run.report["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
