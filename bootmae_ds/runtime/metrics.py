"""Run observability on rank 0: metrics.jsonl every step, TensorBoard and a console line every N."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

EVAL_PREFIXES = ("knn_", "eval_")
CONSOLE_EVALS = (("knn_top1", "k-NN top-1"), ("eval_top1", "val top-1"), ("eval_ema_top1", "EMA val top-1"))
# Dense bf16 matmul peaks (TFLOP/s) of common training GPUs, for MFU when not configured.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def device_peak_tflops(cfg: Any, device: torch.device) -> float | None:
    """``logging.peak_tflops`` if set, else the bf16 peak of a known GPU, else None (no MFU)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None


class MetricsLogger:
    """Writes one JSON line per optimizer step; TensorBoard scalars and a progress line every N."""

    def __init__(self, run_dir: Path, cfg: Any, total_steps: int, enabled: bool) -> None:
        self.enabled = enabled
        self.every = cfg.logging.every_steps
        self.total_steps = total_steps
        self.writer = None
        self.jsonl = None
        self.start_time = time.perf_counter()
        self.start_step: int | None = None
        if enabled:
            self.jsonl = (run_dir / "metrics.jsonl").open("a")
            if cfg.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, row: dict[str, Any]) -> None:
        """``step`` is the number of optimizer steps taken (1-based)."""
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, time.perf_counter()
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:  # evaluations are rare: always on TensorBoard
            for key, value in row.items():
                if key.startswith(EVAL_PREFIXES):
                    self.writer.add_scalar(f"eval/{key}", value, step)
        if step % self.every and step != self.total_steps:
            return
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        elapsed = time.perf_counter() - self.start_time
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        eta = (self.total_steps - step) / max(rate, 1e-9)
        parts = [f"step {step}/{self.total_steps}", f"epoch {row['epoch']}", f"loss {row['loss']:.4f}"]
        if "loss_pixel" in row:
            parts[-1] += f" (pix {row['loss_pixel']:.4f} feat {row['loss_feature']:.4f})"
        parts += [f"lr {row['lr']:.3g}", f"{row['samples_per_s']:.0f} img/s",
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
        parts += [f"{label} {row[key]:.1f}%" for key, label in CONSOLE_EVALS if key in row]
        print("  ".join(parts), flush=True)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
