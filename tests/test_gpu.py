"""The GPU path (``pytest -m gpu``; skipped without CUDA; bench/device/run.sh runs those not marked
``gpu_long`` on a lent GPU, in its time budget): the bf16 ZeRO-2 engine with fp32 gradient
accumulation and reduction, the exact sharded EMA, a fused attention kernel (flash or cuDNN) for
the regressor's 42-wide heads and flash forced, a step path that never waits for the GPU, exact
resume (``run.deterministic``: the math attention backend), and a GPU run's export in timm.
Tests run quickest first, so that a budget cut short loses the slow ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import ROOT, check_engine_facts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = ["model.depth=2", "model.feature_decoder.context_block=1", "data.micro_batch_size=8",
        "data.global_batch_size=8", "data.num_workers=2", "logging.every_steps=1", "logging.knn_every_steps=null",
        "data.train=synthetic", "data.num_samples=256", "run.precision=bf16", "logging.trackers=[]"]
COMPARED = ("loss", "loss_pixel", "loss_feature", "grad_norm")


def gpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")}
    return env | {"PYTHONUNBUFFERED": "1"}


def _python(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=gpu_env(), capture_output=True, text=True,
                          timeout=timeout)


def _pretrain(out: Path, steps: int, *extra: str) -> None:
    proc = _python("launchers/pretrain.py", "--config", "demo", "--output-dir", str(out), "--max-steps", str(steps),
                   "--set", *TINY, *extra)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def regressor_heads() -> tuple[torch.Tensor, ...]:
    """q, k, v at the official regressor's shape (42-wide heads, 197 tokens) and their exact
    attention in fp64 with the math backend's error, the yardstick of the fused kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bootmae_ds.models.layers import attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 12, 197, 42, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with sdpa_kernel(SDPBackend.MATH):
        err_plain = (attend(q, k, v).double() - exact).abs().max().item()
    return q, k, v, exact, err_plain


def test_a_fused_attention_kernel_runs_the_regressor_heads(regressor_heads) -> None:
    """The official regressor's heads are 42 wide. Checked by what runs: the backend torch
    dispatches to is a fused one, flash or cuDNN (on sm90 torch may prefer cuDNN's attention when
    its cuDNN is new enough; the figures of bench/device/run.sh come from whichever this is, and
    its env part records it), its kernel ran (the profiler's names, bench/sdpa_backend.py), the
    output is bitwise the same backend's forced alone, and its error against fp64 is at most
    twice the math backend's."""
    from sdpa_backend import profile_backend, sdp_backend
    from torch.nn.attention import sdpa_kernel

    from bootmae_ds.models.layers import attend

    q, k, v, exact, err_plain = regressor_heads
    outputs = []
    ran = profile_backend(lambda: outputs.append(attend(q, k, v)))
    backend, fast = ran["dispatched"], outputs[0]
    assert backend in ("flash", "cudnn") and backend in ran["kernel_backends"], ran
    with sdpa_kernel(sdp_backend(backend)):
        forced = attend(q, k, v)  # that backend alone (raises if it cannot take these heads)
    assert torch.equal(fast, forced), backend
    err_fast = (fast.double() - exact).abs().max().item()
    assert fast.shape == q.shape and err_fast <= max(2 * err_plain, 1e-2), (backend, err_fast, err_plain)


def test_flash_attention_forced_takes_the_regressor_heads(regressor_heads) -> None:
    """flash alone, whichever backend torch prefers: it takes the (padded) 42-wide heads, its
    kernel runs, and its error against fp64 is within the same tolerance (not bitwise: another
    backend may be the default)."""
    from sdpa_backend import profile_backend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bootmae_ds.models.layers import attend

    q, k, v, exact, err_plain = regressor_heads
    outputs = []
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ran = profile_backend(lambda: outputs.append(attend(q, k, v)))
    assert ran["dispatched"] == "flash" and "flash" in ran["kernel_backends"], ran
    err_flash = (outputs[0].double() - exact).abs().max().item()
    assert err_flash <= max(2 * err_plain, 1e-2), (err_flash, err_plain)


def test_the_step_path_never_waits_for_the_gpu() -> None:
    """Forward, losses, teacher targets and backward of a bf16 BootMAE step with CUDA's sync
    debug mode set to error: any operation that makes the host wait for the GPU raises."""
    from bootmae_ds.config import load_config
    from bootmae_ds.data.masking import MaskGenerator
    from bootmae_ds.models import build_model
    from bootmae_ds.pretrain.losses import feature_loss, pixel_loss

    cfg = load_config("demo", ["model.depth=2", "model.feature_decoder.context_block=1"])
    model = build_model(cfg).cuda().to(torch.bfloat16)
    teacher = build_model(cfg).encoder.cuda().to(torch.bfloat16).requires_grad_(False)
    masks = MaskGenerator.from_config(cfg).batch(8, 0).pin_memory().cuda(non_blocking=True)
    images = torch.randn(8, 3, 32, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(images.to(torch.bfloat16), masks)
        loss = pixel_loss(out.pixels, images, masks, patch_size=cfg.model.patch_size, norm=cfg.loss.pixel_norm,
                          weighted=cfg.loss.weighted_mask)
        with torch.no_grad():
            targets = teacher.target_features(images.to(torch.bfloat16))
        loss = loss + feature_loss(out.features, targets, masks, weighted=cfg.loss.weighted_mask)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_bf16_engine_accumulates_and_reduces_in_fp32_and_its_ema_is_exact(tmp_path) -> None:
    out = tmp_path / "facts.json"
    proc = _python("tests/dist_scripts/engine_facts.py", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    facts = json.loads(out.read_text())
    assert facts["device"].startswith("cuda") and facts["world_size"] == 1
    check_engine_facts(facts)  # as on 2 CPU ranks (tests/test_momentum.py)


@pytest.fixture(scope="module")
def deterministic_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "straight"
    _pretrain(out, 6, "run.deterministic=true")
    return out


def test_a_gpu_runs_export_loads_strictly_into_timm(deterministic_run, tmp_path) -> None:
    import timm

    out = tmp_path / "export"
    proc = _python("launchers/export.py", str(deterministic_run), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((out / "config.json").read_text())
    from safetensors.torch import load_file

    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, config["num_features"])


def test_resume_on_the_gpu_repeats_the_uninterrupted_run(deterministic_run, tmp_path) -> None:
    split = tmp_path / "split"
    _pretrain(split, 3, "run.deterministic=true")
    _pretrain(split, 6, "run.deterministic=true")
    a, b = _rows(deterministic_run), _rows(split)
    for step in range(1, 7):
        for key in COMPARED:
            assert a[step][key] == b[step][key], (step, key)  # bitwise with run.deterministic


@pytest.mark.gpu_long
def test_a_resume_without_deterministic_kernels_drifts_little(tmp_path) -> None:
    """Fast non-deterministic kernels: how far a resumed run drifts (three launches: too long
    for the device run's budget)."""
    free, free_split = tmp_path / "free", tmp_path / "free_split"
    _pretrain(free, 6)
    _pretrain(free_split, 3)
    _pretrain(free_split, 6)
    c, d = _rows(free), _rows(free_split)
    drift = max(abs(c[s]["loss"] - d[s]["loss"]) / abs(c[s]["loss"]) for s in range(4, 7))
    print(f"non-deterministic resume: largest relative loss difference over steps 4-6 = {drift:.3g}")
    assert drift < 1e-2
