"""The parts of the device run that are not another script of the project, each a command that
``bench/device/run.py`` starts in its own process group and that writes its figures as JSON.

    python bench/device/parts.py env --json env.json [--smoke]
    python bench/device/parts.py jpeg --out DIR --images 16384 --size 375x500 --json jpeg.json
    python bench/device/parts.py loader --manifest DIR/shards/manifest.json --batch 256 --json loader.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# What the device run imports beyond the machine's base set (torch, torchvision, timm, numpy, pytest):
# a missing wheel shows here, in the first seconds, named, instead of failing a later part.
RUN_IMPORTS = ("deepspeed", "webdataset", "pydantic", "yaml", "safetensors", "psutil", "braceexpand", "PIL",
               "pytest_timeout", "einops", "msgpack", "bootmae_ds.pretrain.trainer", "bootmae_ds.data.loader")


def usable_cores() -> int:
    """The cores this process may run on (``os.cpu_count`` may count the host's, not ours)."""
    return len(os.sched_getaffinity(0))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# -- env ----------------------------------------------------------------------------------------
def _version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else None


def versions() -> dict:
    """The versions the figures depend on (None: not importable; the imports entry says why)."""
    out = {}
    for name in ("torchvision", "timm", "deepspeed"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - reported as None
            out[name] = None
    return out


def compile_readiness() -> dict:
    """What ``torch.compile`` (inductor) needs to build its kernels: a C compiler and Python's
    headers; the reason it cannot run when one is missing."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = [what for what, ok in (("a C compiler (gcc)", cc), (f"Python headers ({header})", header.exists()))
               if not ok]
    return {"gcc": _version([cc, "--version"]) if cc else None, "python_headers": header.exists(),
            "compile_ready": not missing, "compile_missing": missing}


def env_part(a: argparse.Namespace) -> None:
    import torch
    from step import DTYPES, matmul_peak

    out: dict = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
                 "cuda": torch.version.cuda, "cpu_cores_usable": usable_cores(), "cpu_count": os.cpu_count()}
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").exists() else None
    out["dev_shm_gib"] = round(shm.total / 2**30, 2) if shm else None  # loader workers pass batches through it
    out |= compile_readiness()
    imports = {}
    for name in RUN_IMPORTS:
        try:
            module = importlib.import_module(name)
            imports[name] = getattr(module, "__version__", "ok")
        except Exception as err:  # noqa: BLE001 - every failure is the finding
            imports[name] = f"missing: {type(err).__name__}: {err}"
    out["imports"] = imports
    out["imports_ok"] = not any(str(v).startswith("missing") for v in imports.values())
    cuda = torch.cuda.is_available()
    out |= versions()
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    write_json(a.json, out)
    # which attention backend the figures come from: ViT-B/16's shapes (a micro-batch of 256 on a
    # GPU, 2 on a CPU), forward and backward, as bench/sdpa_backend.py reads the profiler
    try:
        from sdpa_backend import attention_backend

        shape = (256 if cuda else 2, 12, 197, 64)
        out["sdpa_vit_b"] = attention_backend(shape, torch.bfloat16 if cuda else torch.float32)
    except Exception as err:  # noqa: BLE001 - recorded; the run goes on
        out["sdpa_vit_b"] = {"error": f"{type(err).__name__}: {err}"}
    out["device"] = torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu")
    if cuda:
        out["nvidia_smi"] = _version(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"])
    device = torch.device("cuda" if cuda else "cpu")
    out["matmul_dtype"] = "bf16" if cuda else "fp32"
    write_json(a.json, out)  # what is known so far, should the GEMM hang
    if not cuda and out["imports_ok"]:
        # DeepSpeed's CPU ranks JIT-build a shared-memory op on first use (30-60 s once per
        # machine); built here, it does not eat an end-to-end part's time (the rehearsal's case)
        from deepspeed.comm.torch import build_shm_op

        start = time.perf_counter()
        build_shm_op()
        out["deepspeed_cpu_op_s"] = round(time.perf_counter() - start, 1)
    out["matmul_peak_tflops"] = matmul_peak(device, DTYPES[out["matmul_dtype"]]) / 1e12
    write_json(a.json, out)
    if not out["imports_ok"]:
        raise SystemExit(f"imports missing on this machine: {out['imports']}")


# -- jpeg ---------------------------------------------------------------------------------------
JPEG_TASK_IMAGES = 64  # images per generation task: many small tasks keep every worker busy to the end


def _write_chunk(args: tuple[Path, int, int, int, tuple[int, int]]) -> int:
    """``count`` images of class ``c`` (the ``k``-th chunk) into ``root/class_<c>/``."""
    import torch

    from bootmae_ds.data.sources import write_synthetic_folder

    torch.set_num_threads(1)
    root, c, k, count, size = args
    tmp = root / f"part{c}_{k}"
    for path in write_synthetic_folder(tmp, 1, count, size=size, quality=90, seed=1000 * c + k):
        path.rename(root / f"class_{c}" / f"k{k}_{path.name}")
    shutil.rmtree(tmp)
    return count


def jpeg_tasks(root: Path, images: int, classes: int, size: tuple[int, int],
               per_task: int = JPEG_TASK_IMAGES) -> list[tuple[Path, int, int, int, tuple[int, int]]]:
    """``images`` split evenly into ``classes``, each class into tasks of at most ``per_task``."""
    tasks = []
    for c in range(classes):
        per_class = images // classes
        tasks += [(root, c, k, min(per_task, per_class - start), size)
                  for k, start in enumerate(range(0, per_class, per_task))]
    return tasks


def jpeg_part(a: argparse.Namespace) -> None:
    """``--images`` JPEGs of ``--size`` in 16 classes, quality 90, built into shards of 256. The
    images are made in tasks of 64 (256 tasks for 16,384 images), not one per class: 16 class-sized
    tasks on 15 workers took two rounds."""
    from bootmae_ds.data.builder import BuildOptions, build_shards

    h, w = (int(x) for x in a.size.split("x"))
    src, shards = a.out / "jpeg_src", a.out / "jpeg_shards"
    classes, workers = 16, max(1, usable_cores() - 1)
    tasks = jpeg_tasks(src, a.images, classes, (h, w))
    for c in range(classes):
        (src / f"class_{c}").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        made = sum(pool.map(_write_chunk, tasks))
    generated = time.perf_counter() - start
    build_shards(src, shards, BuildOptions(shard_samples=256, workers=workers), progress=False, log=lambda m: None)
    write_json(a.json, {"images": made, "size": f"{w}x{h}", "manifest": str(shards / "manifest.json"),
                        "tasks": len(tasks), "workers": workers,
                        "generate_s": generated, "build_s": time.perf_counter() - start - generated,
                        "mean_kb": sum(f.stat().st_size for f in src.rglob("*.jpg")) / made / 1e3})
    shutil.rmtree(src)  # the shards hold the bytes


# -- loader -------------------------------------------------------------------------------------
def loader_part(a: argparse.Namespace) -> None:
    """Our loader alone over one epoch of the shards, at the end-to-end run's micro-batch and
    worker count: no worker restart inside the timed window (the first batches are warm-up)."""
    from bootmae_ds.config import load_config
    from bootmae_ds.data.loader import build_train_loader

    cfg = load_config(a.config, [f"data.train={a.manifest}", f"data.num_workers={a.workers}",
                                 f"data.micro_batch_size={a.batch}", f"data.global_batch_size={a.batch}", *a.set])
    loader = build_train_loader(cfg, rank=0, world_size=1)
    batches = len(loader)
    if batches <= a.warmup:
        raise SystemExit(f"one epoch has {batches} batches, not more than the {a.warmup} warm-up ones")
    images, start = 0, None
    out = {"workers": a.workers, "batch": a.batch, "batches_per_epoch": batches, "warmup_batches": a.warmup}
    for seen, batch in enumerate(loader, start=1):  # one epoch: the workers start once
        if seen == a.warmup:
            start = time.perf_counter()
        elif seen > a.warmup:
            images += len(batch["images"])
            out |= {"img_per_s": images / (time.perf_counter() - start), "timed_batches": seen - a.warmup}
            if seen % 8 == 0:
                write_json(a.json, out)  # figures so far, should the part run out of time
    write_json(a.json, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    env = sub.add_parser("env")
    env.add_argument("--json", type=Path, required=True)
    jpeg = sub.add_parser("jpeg")
    jpeg.add_argument("--out", type=Path, required=True)
    jpeg.add_argument("--images", type=int, required=True)
    jpeg.add_argument("--size", default="375x500", help="HxW")
    jpeg.add_argument("--json", type=Path, required=True)
    loader = sub.add_parser("loader")
    loader.add_argument("--manifest", required=True)
    loader.add_argument("--config", default="vit_base_800ep")
    loader.add_argument("--batch", type=int, default=256)
    loader.add_argument("--workers", type=int, default=max(1, usable_cores() - 1))
    loader.add_argument("--warmup", type=int, default=4)
    loader.add_argument("--set", nargs="*", default=[])
    loader.add_argument("--json", type=Path, required=True)
    a = parser.parse_args()
    {"env": env_part, "jpeg": jpeg_part, "loader": loader_part}[a.part](a)


if __name__ == "__main__":
    main()
