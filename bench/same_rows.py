"""The five jobs' demo-scale ``metrics.jsonl`` rows against rows recorded from other code: the proof
that moving the training loop into ``bootmae_ds.runtime`` (issue 27) left every step's numbers as
they were.

    python bench/same_rows.py --record bench/same_rows.json      # on the code whose rows are the reference
    python bench/same_rows.py --compare bench/same_rows.json     # on the code under test; exit 1 on a difference

Each job runs a few steps on 2 CPU ranks (DeepSpeed's CPU accelerator) with a fixed seed, gradient
accumulation over 2 micro-batches, and evaluations inside the run: a 3-step demo pre-training with
the NaN drill at step 1 (a skipped step), then fine-tuning (model EMA), the linear probe,
segmentation and detection from it. Timing fields (step time, img/s, data wait, memory, the
momentum update's time, MFU) are left out; every other field of every row, evaluation metrics
included, must be identical (JSON text, so NaN equals NaN). ``--allow job.field`` lists fields
whose change is intended (the linear probe's ``grad_norm``, 0.0 before the real norm was reported).
About 5 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"samples_per_s", "samples_per_s_per_device", "step_time_s", "data_wait_s", "memory_gb", "ema_update_s",
          "mfu"}
SMALL = ["data.num_workers=1", "logging.every_steps=1", "checkpoint.every_steps=1000"]


def jobs(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """Each job's launcher and arguments (downstream jobs start from the pre-training run)."""
    pre = tmp / "pretrain"
    init = f"init.source={pre}"
    return {
        "pretrain": ("launchers/pretrain.py", [
            "--config", "demo", "--max-steps", "3", "--set", "model.depth=2", "model.feature_decoder.context_block=1",
            "data.micro_batch_size=4", "data.global_batch_size=16", "debug.nan_steps=[1]",
            "optim.max_skipped_in_row=2", *SMALL]),
        "finetune": ("launchers/finetune.py", [
            "--config", "demo", "--set", init, "init.which=momentum", "schedule.steps_per_epoch=2",
            "schedule.epochs=2", "data.micro_batch_size=4", "data.global_batch_size=16", "data.val_limit=64", *SMALL]),
        "linprobe": ("launchers/linprobe.py", [
            "--config", "demo", "--set", init, "data.train=synthetic", "data.num_samples=256",
            "schedule.steps_per_epoch=2", "schedule.epochs=2", "schedule.warmup_epochs=1", "eval.every_epochs=1",
            "optim.base_lr=8", "data.micro_batch_size=8", "data.global_batch_size=32", "data.val_limit=64",
            "data.eval_batch_size=32", *SMALL]),
        "segment": ("launchers/segment.py", [
            "--config", "demo", "--set", init, "model.out_indices=[0,0,1,1]", "schedule.iters=4",
            "schedule.warmup_iters=1", "eval.every_steps=2", "data.val_limit=8", "data.num_samples=32",
            "data.micro_batch_size=2", "data.global_batch_size=8", *SMALL]),
        "detect": ("launchers/detect.py", [
            "--config", "demo", "--set", init, f"data.cache_dir={tmp / 'cache'}", "model.out_indices=[0,0,1,1]",
            "model.fpn_channels=16", "model.roi.box_head_dim=32", "model.roi.mask_head_channels=16",
            "model.roi.batch_size_per_image=32", "model.rpn.batch_size_per_image=32",
            "model.rpn.pre_nms_top_n_train=200", "model.rpn.pre_nms_top_n_test=100",
            "model.rpn.post_nms_top_n_train=50", "model.rpn.post_nms_top_n_test=50",
            "model.roi.detections_per_image=20", "data.micro_batch_size=2", "data.global_batch_size=8",
            "data.val_limit=8", "data.eval_batch_size=1", "data.hflip=0.5", "schedule.steps_per_epoch=2",
            "schedule.epochs=2", "schedule.decay_epochs=[1]", "schedule.warmup_steps=2", *SMALL]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(name: str, launcher: str, args: list[str], tmp: Path) -> list[dict]:
    """The job's rows without timing fields (2 CPU ranks)."""
    out = tmp / name
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           launcher, "--output-dir", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def differences(name: str, before: list[dict], after: list[dict], allowed: set[str]) -> list[str]:
    """Every field that differs (or is missing on one side), as ``job step N field: before -> after``."""
    if len(before) != len(after):
        return [f"{name}: {len(before)} rows before, {len(after)} after"]
    out = []
    for b, a in zip(before, after):
        for key in dict.fromkeys([*b, *a]):
            if f"{name}.{key}" in allowed:
                continue
            if json.dumps(b.get(key, "<absent>")) != json.dumps(a.get(key, "<absent>")):
                out.append(f"{name} step {b.get('step')} {key}: {b.get(key, '<absent>')} -> {a.get(key, '<absent>')}")
        if [k for k in b if f"{name}.{k}" not in allowed] != [k for k in a if f"{name}.{k}" not in allowed]:
            out.append(f"{name} step {b.get('step')}: key order {list(b)} -> {list(a)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", type=Path, help="write the rows of this code here")
    what.add_argument("--compare", type=Path, help="compare the rows of this code with these")
    ap.add_argument("--only", default="", help="comma-separated jobs (pretrain always runs: the others start from it)")
    ap.add_argument("--allow", action="append", default=[], help="job.field whose change is intended")
    ap.add_argument("--keep", type=Path, help="keep the runs in this directory")
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="same_rows_"))
    tmp.mkdir(parents=True, exist_ok=True)
    todo = jobs(tmp)
    if args.only:
        todo = {k: v for k, v in todo.items() if k == "pretrain" or k in args.only.split(",")}
    rows = {}
    for name, (launcher, job_args) in todo.items():
        rows[name] = run_job(name, launcher, job_args, tmp)
        print(f"{name}: {len(rows[name])} rows", flush=True)
    if args.record:
        args.record.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"recorded {sum(map(len, rows.values()))} rows of {len(rows)} jobs in {args.record}")
        return 0
    reference = json.loads(args.compare.read_text())
    allowed = set(args.allow)
    problems = [p for name in rows for p in differences(name, reference[name], rows[name], allowed)]
    for name in rows:
        fields = sorted({k for r in rows[name] for k in r})
        same = [f for f in fields if f"{name}.{f}" not in allowed]
        print(f"{name}: {len(rows[name])} rows, fields compared: {', '.join(same)}")
    for allowed_field in sorted(allowed):
        name, key = allowed_field.split(".", 1)
        if name in rows:
            print(f"{allowed_field} (intended change): {[r.get(key) for r in reference[name]]} -> "
                  f"{[r.get(key) for r in rows[name]]}")
    print("\n".join(problems) if problems else "identical: every compared field of every row")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
