"""Run observability on rank 0: metrics.jsonl every step, the experiment trackers of
``logging.trackers`` (``runtime/trackers.py``) and a console line every N steps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .trackers import Tracker, check_available, numbers, open_trackers

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
    """Writes one JSON line per optimizer step, feeds the trackers, and a progress line every N."""

    def __init__(self, run_dir: Path, cfg: Any, total_steps: int, enabled: bool) -> None:
        check_available(cfg.logging.trackers)  # on every rank, so that all of them stop together
        self.enabled = enabled
        self.every = cfg.logging.every_steps
        self.total_steps = total_steps
        self.trackers: list[Tracker] = []
        self.jsonl = None
        self.start_time = time.perf_counter()
        self.start_step: int | None = None
        self.totals: dict[str, int] = {}  # a mixture's samples_<source>_total of the last row
        if enabled:
            self.jsonl = (run_dir / "metrics.jsonl").open("a")
            self.trackers = open_trackers(run_dir, cfg)

    def log(self, step: int, row: dict[str, Any]) -> None:
        """``step`` is the number of optimizer steps taken (1-based)."""
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, time.perf_counter()
        self.totals = {k: v for k, v in row.items() if k.startswith("samples_") and k.endswith("_total")}
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        periodic = not step % self.every or step == self.total_steps
        self._each("log", step, numbers(row), periodic)
        if not periodic:
            return
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
        self._each("image", tag, grid, step)

    def close(self) -> None:
        if self.jsonl is not None and self.totals:  # a mixture: what each source gave
            total = max(sum(self.totals.values()), 1)
            print("samples per source over the run: " + ", ".join(
                f"{k.removeprefix('samples_').removesuffix('_total')} {v} ({v / total:.1%})"
                for k, v in self.totals.items()), flush=True)
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        self._each("close")
        self.trackers = []

    def _each(self, method: str, *args: Any) -> None:
        """Call ``method`` on every tracker; one that fails is dropped with a warning (only its
        images, when an image fails), since a tracker's service going down must not stop
        training: metrics.jsonl has every row."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 - any library, any failure
                what = "its images are" if method == "image" else "it is"
                if method == "image":
                    tracker.image = lambda *_: None  # type: ignore[method-assign]
                else:
                    self.trackers.remove(tracker)
                print(f"warning: tracker {tracker.name} failed ({type(err).__name__}: {err}); {what} off for "
                      f"the rest of the run, metrics.jsonl has every row", flush=True)
