"""bench/step.py's reference-style step in what the device runs it in: bf16, on another device
than the CPU. The device run's rehearsal runs it in fp32 on the CPU only, where a tensor made on
the CPU in fp32 inside the step goes unnoticed; on the GPU it would cost every figure after "ours"
(bench/device/run.py, step_vit_b)."""

from __future__ import annotations

import pytest
import torch
from step import reference_step

from bootmae_ds.config import load_config

TINY = ["model.size=tiny", "model.depth=2", "model.feature_decoder.context_block=1", "model.pixel_decoder.dim=64",
        "model.pixel_decoder.depth=1", "model.feature_decoder.depth=1", "model.img_size=32",
        "model.patch_size=8", "mask.num_masked=12", "mask.block_budget=8", "mask.min_block_patches=2",
        "mask.max_block_patches=6"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("vit_base_800ep", TINY)


def test_the_reference_step_makes_nothing_on_the_cpu(cfg) -> None:
    """On the ``meta`` device any tensor the step makes on the CPU meets one of the device's
    in an op and raises (as a CUDA run would); nothing is computed, so it takes a second."""
    reference_step(cfg, 2, torch.device("meta"), torch.bfloat16)()


def test_the_reference_step_runs_in_bf16(cfg) -> None:
    """bf16 on the CPU: an fp32 tensor made inside the step promotes a sum to fp32, and the bf16
    matmul that follows raises. The official forward keeps to bf16 throughout."""
    from reference_bootmae import official_forward

    from bootmae_ds.interop.official import ours_to_official
    from bootmae_ds.models import build_model

    torch.manual_seed(0)
    reference_step(cfg, 2, torch.device("cpu"), torch.bfloat16)()
    m = cfg.model
    sd = {k: v.to(torch.bfloat16) for k, v in ours_to_official(build_model(cfg).state_dict(), cfg).items()}
    n = (m.img_size // m.patch_size) ** 2
    shuffle = torch.stack([torch.randperm(n) for _ in range(2)])
    image, features = official_forward(sd, torch.randn(2, 3, m.img_size, m.img_size, dtype=torch.bfloat16), shuffle,
                                       cfg.mask.num_masked, patch=m.patch_size, depth=m.depth, heads=m.num_heads,
                                       feature_blocks=(0, m.depth - 1))
    assert image.dtype == features.dtype == torch.bfloat16 and torch.isfinite(image.float()).all()


def test_a_failing_part_costs_no_other_parts_figures(cfg, tmp_path, monkeypatch) -> None:
    """One part's error (here the reference step's, as on the GPU before its fix) is recorded and
    the parts after it still run: the device run keeps the MAE figure."""
    import json

    import step

    def broken(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(step, "reference_step", broken)
    out = tmp_path / "step.json"
    result = step.main(["--size", "tiny", "--batch", "2", "--steps", "1", "--device", "cpu", "--peak-tflops", "1",
                        "--only", "reference,mae", "--json", str(out), "--set", *TINY[1:]])
    assert set(result["steps"]) == {"ours, MAE (8-block decoder)"}
    assert result["errors"] == {"reference": "RuntimeError: Expected all tensors to be on the same device"}
    assert json.loads(out.read_text())["errors"] == result["errors"]
