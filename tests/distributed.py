"""Helpers to run real `deepspeed` CPU ranks from tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def deepspeed_cmd(script: str, *args: str, ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N script args` through the current interpreter."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port()), script, *args]


def run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=kw.pop("env", cpu_env()), capture_output=True, text=True,
                          timeout=timeout, **kw)


def check_engine_facts(facts: dict) -> None:
    """What tests/dist_scripts/engine_facts.py must find, on CPU ranks and on a GPU alike: the bf16
    engine accumulates, holds and reduces gradients in fp32, skips the non-finite step, and the
    sharded EMA is the fp32 reference EMA (computed on its device) within 1 ulp."""
    assert facts["accum_steps"] == 2 and facts["param_dtype"] == "torch.bfloat16", facts
    assert facts["grad_accum_dtype"] == "torch.float32" and facts["separate_grad_accum"], facts
    assert facts["held_grad_dtypes"] == ["torch.float32"], facts  # the first micro-batch's gradient, in fp32
    assert facts["communication_dtype"] == "torch.float32", facts
    assert facts["applied"] == [True, True, False, True], facts
    assert facts["reference_device"] == facts["device"] and facts["ema_max_ulps"] <= 1, facts
