"""Run observability on rank 0: metrics.jsonl every step, TensorBoard and a console line every N."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .config import BootMAEConfig
from .models import BootMAE

EVAL_PREFIXES = ("knn_", "eval_")
CONSOLE_EVALS = (("knn_top1", "k-NN top-1"), ("eval_top1", "val top-1"), ("eval_ema_top1", "EMA val top-1"))
# Dense bf16 matmul peaks (TFLOP/s) of common training GPUs, for MFU when not configured.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def device_peak_tflops(cfg: BootMAEConfig, device: torch.device) -> float | None:
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None


def _linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _block_flops(tokens: int, dim: int, inner: int, mlp: int, ctx_tokens: int = 0, ctx_dim: int = 0) -> float:
    """Forward FLOPs of one (decoder) block on ``tokens`` tokens."""
    f = _linear(tokens, dim, 3 * inner) + 4.0 * tokens * tokens * inner + _linear(tokens, inner, dim)
    f += _linear(tokens, dim, mlp) + _linear(tokens, mlp, dim)
    if ctx_tokens:
        f += _linear(tokens, dim, inner) + _linear(ctx_tokens, ctx_dim, 2 * inner)
        f += 4.0 * tokens * ctx_tokens * inner + _linear(tokens, inner, dim)
    return f


def flops_per_image(model: BootMAE, cfg: BootMAEConfig) -> dict[str, float]:
    """Analytic forward FLOPs per image of each part (matmuls only; norms etc. are negligible)."""
    m = cfg.model
    n = m.num_patches
    visible = 1 + n - cfg.mask.num_masked
    d = m.embed_dim
    mlp = int(d * m.mlp_ratio)
    patch = _linear(n, m.in_chans * m.patch_size**2, d)
    enc_block = lambda t: _block_flops(t, d, d, mlp)  # noqa: E731
    parts = {"encoder": patch * visible / n + m.depth * enc_block(visible)}
    fraction = cfg.momentum.input_fraction
    teacher_tokens = 1 + (n if fraction == 1 else round(fraction * cfg.mask.num_masked))
    if model.feature_decoder is not None:
        parts["momentum_encoder"] = patch + m.depth * enc_block(teacher_tokens)
    for name, dec in (("pixel_decoder", model.pixel_decoder), ("feature_decoder", model.feature_decoder)):
        if dec is None:
            continue
        blk = dec.blocks[0]
        inner = blk.attn.num_heads * blk.attn.head_dim
        dmlp = blk.mlp.fc1.out_features
        ctx = visible if blk.has_context else 0
        f = _linear(visible, d, dec.dim) + len(dec.blocks) * _block_flops(1 + n, dec.dim, inner, dmlp, ctx, d)
        out = dec.head.weight.shape[0]
        parts[name] = f + _linear(n, dec.dim, out)
    return parts


def training_flops_per_image(parts: dict[str, float]) -> float:
    """Forward + backward (3x) for trained parts, forward only for the momentum encoder."""
    return sum(v if k == "momentum_encoder" else 3 * v for k, v in parts.items())


class MetricsLogger:
    """Writes one JSON line per optimizer step; TensorBoard scalars and a progress line every N."""

    def __init__(self, run_dir: Path, cfg: BootMAEConfig, total_steps: int, enabled: bool) -> None:
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
