"""The GPU run, in one call, each part time-boxed: a failed or slow part still leaves the report of
the parts before it. Started by ``bench/device/run.sh`` (which installs the carried wheels).

    python3 bench/device/run.py --out $OUT [--budget 360]     # on the lent GPU machine
    python3 bench/device/run.py --out /tmp/dev --smoke        # the same script, tiny, on a CPU

Parts, in order:
  env     GPU, driver, torch, CUDA, deepspeed; the bf16 GEMM peak measured here (the MFU base)
  tests   pytest -m gpu (at most 90 s)
  step    bench/step.py: ViT-B/16 224 px batch 256 bf16: ours, reference-style, MAE, momentum
          input 25%; ViT-L/16 batch 128 ours (img/s, MFU against the measured peak, peak memory)
  e2e     deepspeed --num_gpus 1 launchers/pretrain.py, the ViT-B recipe at micro-batch 256, on
          synthetic images and on WebDataset shards of ~500x375 JPEGs generated here: img/s, MFU,
          data-wait share (from metrics.jsonl)
  loader  the loader alone on those shards with every CPU core: img/s against the model's
  compile our ViT-B step under torch.compile (last: compiling is the slowest part)
Writes OUT/device_report.json (every figure, with units; rewritten after each part) and
OUT/device_run.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SMOKE_MODEL = ["model.img_size=32", "model.patch_size=8", "mask.num_masked=12", "mask.block_budget=8",
               "mask.min_block_patches=2", "mask.max_block_patches=6"]
# Targets of the GPU issue, checked against the figures of the same run.
TARGETS = {"mfu_vit_b": 0.35, "ours_vs_reference": 2.5, "bootmae_over_mae_step_max": 1.60,
           "jpeg_vs_synthetic_max_loss": 0.05}


class Run:
    """The report, the log and the time budget of one device run."""

    def __init__(self, out: Path, budget: float, smoke: bool) -> None:
        self.out, self.smoke, self.deadline = out, smoke, time.monotonic() + budget
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.report: dict = {"date": time.strftime("%Y-%m-%d"), "smoke": smoke, "budget_s": budget,
                             "command": " ".join(sys.argv), "parts": {}}
        self.log_file = open(out / "device_run.log", "a")  # noqa: SIM115 - closed in main

    def log(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.out / "device_report.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        os.replace(tmp, self.out / "device_report.json")

    def part(self, name: str, fn, budget: float) -> dict | None:
        """Run one part within ``budget`` seconds (and what is left of the whole run)."""
        limit = min(budget, self.left())
        entry: dict = {"status": "skipped", "budget_s": round(limit, 1)}
        self.report["parts"][name] = entry
        if limit < 5:
            self.log(f"{name}: skipped, {self.left():.0f} s of the run left")
            self.save()
            return None
        self.log(f"{name}: starting ({limit:.0f} s)")
        start = time.monotonic()
        try:
            entry.update(fn(limit))
            entry["status"] = "ok"
        except subprocess.TimeoutExpired:
            entry["status"] = "timeout"
        except Exception as err:  # noqa: BLE001 - a failed part is reported, the run goes on
            entry["status"] = "failed"
            entry["error"] = f"{type(err).__name__}: {err}"[-2000:]
        entry["wall_s"] = round(time.monotonic() - start, 1)
        self.log(f"{name}: {entry['status']} in {entry['wall_s']} s")
        self.save()
        return entry if entry["status"] == "ok" else None

    def sh(self, cmd: list[str], limit: float, name: str, env: dict | None = None) -> str:
        """Run ``cmd`` with its output appended to the log; raise if it fails or overruns."""
        self.log(f"$ {' '.join(cmd)}")
        with open(self.out / f"{name}.log", "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  timeout=limit, env={**os.environ, **(env or {})})
        text = (self.out / f"{name}.log").read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {text[-1500:]}")
        return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the parts ---------------------------------------------------------------------------------
def env_part(run: Run) -> dict:
    import torch
    from step import DTYPES, matmul_peak

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
           "cpu_cores": os.cpu_count()}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError as err:
        out["deepspeed"] = f"missing ({err})"
    if cuda:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        out["nvidia_smi"] = smi.stdout.strip()
    dtype = "bf16" if cuda else "fp32"
    out["matmul_dtype"] = dtype
    out["matmul_peak_tflops"] = matmul_peak(device, DTYPES[dtype]) / 1e12
    return out


def tests_part(run: Run, limit: float) -> dict:
    xml = run.out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/",
           f"--junitxml={xml}", "-o", "addopts=", "--timeout=80"]
    try:
        run.sh(cmd, limit, "gpu_tests")
    except RuntimeError as err:
        if not xml.exists():
            raise
        failed = str(err)
    else:
        failed = ""
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = {c.get("name"): ("failed" if c.find("failure") is not None or c.find("error") is not None else
                             "skipped" if c.find("skipped") is not None else "passed") for c in suite.iter("testcase")}
    return {**counts, "cases": cases, **({"failure_log_tail": failed[-1500:]} if failed else {})}


def step_part(run: Run, limit: float, peak: float | None, size: str, batch: int, only: str, name: str) -> dict:
    out = run.work / f"{name}.json"
    if run.smoke:
        cmd = ["--size", "tiny", "--batch", "2", "--steps", "1", "--dtype", "fp32", "--device", "cpu",
               "--compile-backend", "eager", "--set", *SMOKE_MODEL]  # inductor would take minutes on a CPU
    else:
        cmd = ["--size", size, "--batch", str(batch), "--steps", "10", "--dtype", "bf16", "--device", "cuda"]
    cmd += ["--only", only, "--fractions", "0.25", "--json", str(out)]
    if peak:
        cmd += ["--peak-tflops", f"{peak:.3f}"]
    run.sh([sys.executable, "bench/step.py", *cmd], limit, name)
    return json.loads(out.read_text())


def _jpegs(args: tuple[Path, int, int, tuple[int, int], int]) -> int:
    from bootmae_ds.data.sources import write_synthetic_folder

    root, first_class, classes, size, per_class = args
    for c in range(first_class, first_class + classes):  # each worker writes its own class folders
        write_synthetic_folder(root / f"part{c}", 1, per_class, size=size, quality=90, seed=c)
    return classes * per_class


def make_jpeg_shards(run: Run, images: int, size: tuple[int, int]) -> Path:
    """~``images`` JPEGs of ``size`` (h, w), quality 90, in 16 classes, built into shards."""
    from bootmae_ds.data.builder import BuildOptions, build_shards

    src, shards = run.work / "jpeg_src", run.work / "jpeg_shards"
    classes, workers = 16, max(1, (os.cpu_count() or 2) - 1)
    per_class = max(1, images // classes)
    with ProcessPoolExecutor(workers) as pool:
        made = sum(pool.map(_jpegs, [(src, c, 1, size, per_class) for c in range(classes)]))
    for part in sorted(src.iterdir()):  # part<c>/class_0/*.jpg -> class_<c>/*.jpg
        (part / "class_0").rename(src / f"class_{part.name.removeprefix('part')}")
        part.rmdir()
    build_shards(src, shards, BuildOptions(shard_samples=256, workers=workers), progress=False, log=lambda m: None)
    run.log(f"made {made} JPEGs of {size[1]}x{size[0]} and their shards in {shards}")
    return shards / "manifest.json"


def e2e_part(run: Run, limit: float, train: str, name: str, peak: float | None) -> dict:
    out = run.work / name
    steps = 4 if run.smoke else 30
    sets = ["data.global_batch_size=256", "data.micro_batch_size=256", f"data.train={train}",
            f"data.num_workers={max(1, min(15, (os.cpu_count() or 2) - 1))}", "logging.tensorboard=false",
            "logging.knn_every_steps=null", "logging.every_steps=5", "checkpoint.every_steps=100000"]
    config = "vit_base_800ep"
    if run.smoke:
        config = "demo"
        sets = ["data.global_batch_size=8", "data.micro_batch_size=8", f"data.train={train}", "data.num_workers=1",
                "logging.tensorboard=false", "logging.knn_every_steps=null", "model.depth=1",
                "model.feature_decoder.context_block=0", "checkpoint.every_steps=100000"]
    if train == "synthetic":
        sets.append(f"data.num_samples={64 if run.smoke else 256 * 40}")
    if peak:
        sets.append(f"logging.peak_tflops={peak:.3f}")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           "launchers/pretrain.py",
           "--config", config, "--output-dir", str(out), "--max-steps", str(steps), "--resume", "never", "--set", *sets]
    run.sh(cmd, limit, name)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm = rows[min(5, len(rows) - 1):] if not run.smoke else rows[1:]
    total = sum(r["step_time_s"] for r in warm)
    result = {"steps_timed": len(warm), "img_per_s": sum(r["samples_per_s"] * r["step_time_s"] for r in warm) / total,
              "data_wait_share": sum(r["data_wait_s"] for r in warm) / total,
              "peak_memory_gib": max(r.get("memory_gb", 0.0) for r in rows)}
    if all("mfu" in r for r in warm):
        result["mfu"] = sum(r["mfu"] * r["step_time_s"] for r in warm) / total
    return result


def loader_part(run: Run, limit: float, manifest: Path) -> dict:
    code = f"""
import json, os, time
from bootmae_ds.config import load_config
from bootmae_ds.data.loader import build_train_loader
smoke = {run.smoke!r}
workers = 1 if smoke else max(1, os.cpu_count() - 1)
batch = 8 if smoke else 256
cfg = load_config("demo" if smoke else "vit_base_800ep", ["data.train={manifest}", f"data.num_workers={{workers}}",
                  f"data.micro_batch_size={{batch}}", f"data.global_batch_size={{batch}}"])
loader = build_train_loader(cfg, rank=0, world_size=1)
seconds, images, start = (3 if smoke else 20), 0, None
while start is None or time.perf_counter() - start < seconds:
    for b in loader:
        if start is None:
            start = time.perf_counter()  # after the first batch: workers started, caches warm
            continue
        images += len(b["images"])
        if time.perf_counter() - start >= seconds:
            break
print(json.dumps({{"img_per_s": images / (time.perf_counter() - start), "workers": workers, "batch": batch}}))
"""
    text = run.sh([sys.executable, "-c", code], limit, "loader")
    return json.loads(text.strip().splitlines()[-1])


# -- the run -----------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_out")))
    parser.add_argument("--budget", type=float, default=360.0, help="wall seconds for everything")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (the CI check of this script)")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run = Run(a.out, a.budget, a.smoke)
    if a.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = run.part("env", lambda limit: env_part(run), 30)
    peak = env["matmul_peak_tflops"] if env else None
    run.part("tests", lambda limit: tests_part(run, limit), 90)
    base = run.part("step_vit_b", lambda limit: step_part(run, limit, peak, "base", 256, "ours,reference,mae,fractions",
                                                          "step_vit_b"), 100)
    run.part("step_vit_l", lambda limit: step_part(run, limit, peak, "large", 128, "ours", "step_vit_l"), 40)
    shards: dict = {}

    def make(limit: float) -> dict:
        shards["manifest"] = make_jpeg_shards(run, 64 if a.smoke else 5120, (48, 64) if a.smoke else (375, 500))
        return {"manifest": str(shards["manifest"])}

    run.part("jpeg_shards", make, 40)
    synth = run.part("e2e_synthetic", lambda limit: e2e_part(run, limit, "synthetic", "e2e_synthetic", peak), 75)
    jpeg = None
    if "manifest" in shards:
        jpeg = run.part("e2e_jpeg", lambda limit: e2e_part(run, limit, str(shards["manifest"]), "e2e_jpeg", peak), 75)
        run.part("loader", lambda limit: loader_part(run, limit, shards["manifest"]), 30)
    run.part("step_vit_b_compiled", lambda limit: step_part(run, limit, peak, "base", 256, "compiled",
                                                            "step_vit_b_compiled"), 150)
    run.report["targets"] = targets(run.report, base, synth, jpeg)
    run.save()
    run.log(f"report: {a.out / 'device_report.json'}")
    run.log_file.close()
    return 0 if all(p["status"] == "ok" for p in run.report["parts"].values()) else 1


def targets(report: dict, base: dict | None, synth: dict | None, jpeg: dict | None) -> dict:
    """The issue's targets against this run's figures (None where a part did not finish)."""
    out: dict = {}
    if base:
        ours = base["steps"].get("ours, BootMAE", {})
        out["mfu_vit_b"] = {"value": ours.get("mfu"), "target": f">= {TARGETS['mfu_vit_b']}"}
        out["ours_vs_reference"] = {"value": base["ratios"].get("ours_vs_reference"),
                                    "target": f">= {TARGETS['ours_vs_reference']}"}
        out["bootmae_over_mae_step"] = {"value": base["ratios"].get("bootmae_over_mae_step"),
                                        "target": f"<= {TARGETS['bootmae_over_mae_step_max']} (FLOP ratio)"}
    if synth and jpeg:
        out["jpeg_vs_synthetic"] = {"value": jpeg["img_per_s"] / synth["img_per_s"],
                                    "target": f">= {1 - TARGETS['jpeg_vs_synthetic_max_loss']}",
                                    "data_wait_share_jpeg": jpeg["data_wait_share"]}
    loader = report["parts"].get("loader", {})
    if base and loader.get("status") == "ok":
        model = base["steps"]["ours, BootMAE"]["img_per_s"]
        out["loader_vs_model"] = {"value": loader["img_per_s"] / model, "target": ">= 1 (never the bottleneck)"}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
