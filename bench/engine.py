"""Pre-training engine costs on this machine, measured side by side through the real launcher.

    python bench/engine.py [--steps 12] [--out /tmp/bench_engine]

Runs short pre-trainings (fp32 ZeRO-2 on CPU, or the GPU path where there is one) and reads
their metrics.jsonl: step time, img/s, the momentum encoder's overhead (BootMAE step / the same
model without the feature branch), the sharded EMA update + gather time as a share of the step,
and the fp32 EMA bytes each rank holds at 1 and 2 ranks. The first 3 steps are warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIT_S = ["model.size=small", "model.img_size=224", "model.patch_size=16", "mask.num_masked=147",
         "mask.block_budget=120", "mask.min_block_patches=16", "mask.max_block_patches=60",
         "model.pixel_decoder.dim=512", "data.micro_batch_size=8", "data.global_batch_size=8",
         "data.num_workers=1"]
NO_FEATURE = ["model.feature_decoder.enabled=false", "loss.feature_weight=0"]
DEMO = ["data.num_workers=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, overrides: list[str], ranks: int, steps: int, out: Path) -> dict[str, float]:
    run_dir = out / name
    args = ["launchers/pretrain.py", "--config", "demo", "--output-dir", str(run_dir), "--resume", "never",
            "--max-steps", str(steps), "--set", *overrides, "logging.every_steps=1000"]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(_port()), *args]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][3:]
    med = lambda key: statistics.median(r.get(key, 0.0) for r in rows)  # noqa: E731
    return {"step_s": med("step_time_s"), "img_s": med("samples_per_s"), "ema_s": med("ema_update_s"),
            "ema_bytes": med("ema_bytes_per_rank"), "data_wait_s": med("data_wait_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_engine"))
    a = parser.parse_args()
    cases = {
        "demo, 1 rank": (DEMO, 1),
        "demo, 2 ranks": (DEMO, 2),
        "demo, 2 ranks, no feature branch": (DEMO + NO_FEATURE, 2),
        "ViT-S/16 224px b8, 1 rank": (VIT_S, 1),
        "ViT-S/16 224px b8, 1 rank, no feature branch": (VIT_S + NO_FEATURE, 1),
    }
    results = {name: run(name.replace(" ", "_").replace(",", "").replace("/", ""), o, r, a.steps, a.out)
               for name, (o, r) in cases.items()}
    print(f"{'case':46s} {'step s':>8s} {'img/s':>8s} {'EMA s':>8s} {'EMA %':>6s} {'EMA MB/rank':>11s} {'wait s':>7s}")
    for name, r in results.items():
        share = 100 * r["ema_s"] / r["step_s"] if r["step_s"] else 0.0
        print(f"{name:46s} {r['step_s']:8.3f} {r['img_s']:8.1f} {r['ema_s']:8.4f} {share:6.2f} "
              f"{r['ema_bytes'] / 2**20:11.3f} {r['data_wait_s']:7.3f}")
    for base in ("demo, 2 ranks", "ViT-S/16 224px b8, 1 rank"):
        ratio = results[base]["step_s"] / results[f"{base}, no feature branch"]["step_s"]
        print(f"momentum-encoder overhead ({base}): BootMAE step / no-feature step = {ratio:.2f}x")
    one, two = results["demo, 1 rank"]["ema_bytes"], results["demo, 2 ranks"]["ema_bytes"]
    print(f"EMA fp32 bytes per rank: 1 rank {one:.0f}, 2 ranks {two:.0f} (ratio {two / one:.3f})")


if __name__ == "__main__":
    main()
