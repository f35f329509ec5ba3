"""Shared test fixtures: tiny configs of every model variant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests' own helper modules
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # bench/reference_bootmae.py

from bootmae_ds.config import BootMAEConfig, load_config  # noqa: E402

# The official pixel branch at demo size (the demo preset itself uses MAE's pixel branch).
OFFICIAL_PIXEL = [
    "model.pixel_decoder.depth=2", "model.pixel_decoder.context=true", "model.pixel_decoder.context_block=0",
    "model.pixel_decoder.pos_embed_visible=false", "mask.strategy=block", "loss.pixel_norm=per_channel",
    "loss.weighted_mask=true", "loss.feature_weight=1.0",
]
# Overrides that turn the demo preset into each variant the system supports.
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "bootmae_official": OFFICIAL_PIXEL,
    "mae": [
        "model.pixel_decoder.depth=8", "model.pixel_decoder.context=false",
        "model.pixel_decoder.pos_embed_visible=true", "model.pixel_decoder.num_heads=2",
        "model.feature_decoder.enabled=false", "loss.feature_weight=0", "mask.strategy=random",
        "loss.pixel_norm=per_patch",
    ],
    "no_context": ["model.pixel_decoder.context=false", "model.feature_decoder.context=false"],
    "middle_context": [*OFFICIAL_PIXEL, "model.pixel_decoder.context_block=1", "model.feature_decoder.context_block=2"],
    "wide_regressor": ["model.pixel_decoder.dim=128", "model.pixel_decoder.depth=1"],
    "uneven_heads": ["model.pixel_decoder.dim=60", "model.num_heads=4", "model.pixel_decoder.num_heads=7"],
    "deep_decoders": ["model.pixel_decoder.depth=4", "model.feature_decoder.depth=4"],
    "drop_path": ["model.drop_path=0.1"],
}


def tiny_config(*overrides: str) -> BootMAEConfig:
    """The demo preset (32 px, patch 4, 4 blocks, 96 wide) with overrides."""
    return load_config("demo", list(overrides))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


# -- one demo pre-training run for every downstream job's tests --------------------------------
# A 2-rank DeepSpeed run of 3 steps on the demo digits (2 blocks): what fine-tuning, segmentation
# and detection start from (``init.source=<run>``). Made once per session; read it, never write it.
DEMO_PRETRAIN = ["--config", "demo", "--max-steps", "3", "--set", "model.depth=2",
                 "model.feature_decoder.context_block=1", "data.micro_batch_size=8", "data.global_batch_size=16",
                 "data.num_workers=1"]


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.fixture(scope="session")
def demo_pretrain_run(tmp_path_factory) -> Path:
    """The run directory of a finished 3-step, 2-rank demo pre-training (checkpoint ``step_00000003``).

    ``shm_left.json`` beside it lists the DeepSpeed shared-memory buffers the run left behind."""
    from distributed import deepspeed_cmd, run

    out = tmp_path_factory.mktemp("demo_pretrain") / "run"
    before = _shm_buffers()
    proc = run(deepspeed_cmd("launchers/pretrain.py", "--output-dir", str(out), *DEMO_PRETRAIN))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (out / "shm_left.json").write_text(json.dumps(sorted(_shm_buffers() - before)))
    return out
