"""Official checkpoints: strict round trip, clear errors, and forward parity with an independent
re-statement of the official computation (bench/reference_bootmae.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from reference_bootmae import official_forward, official_target_features

from bootmae_ds.config import load_config
from bootmae_ds.interop.official import (
    OfficialCheckpointError,
    load_official_state_dict,
    ours_to_official,
    read_official_checkpoint,
)
from bootmae_ds.models import build_model
from bootmae_ds.pretrain.losses import patchify

# Key layouts of the released checkpoints (copied from shared/reference so CI needs nothing else).
REFERENCE = Path(__file__).resolve().parent / "data"


def _tsv_state_dict(arch: str) -> dict[str, torch.Tensor]:
    path = REFERENCE / f"official_bootmae_{arch}_state_dict.tsv"
    rows = [line.split("\t") for line in path.read_text().strip().splitlines()[1:]]
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn([int(s) for s in shape.split("x")], generator=g) for k, shape in rows}


@pytest.mark.parametrize("arch", ["base", "large"])
def test_round_trip_is_identical(arch) -> None:
    official = _tsv_state_dict(arch)
    model = load_official_state_dict({"model": official, "epoch": 799}, arch)
    back = ours_to_official(model.state_dict(), load_config(f"vit_{arch}_800ep"))
    assert sorted(back) == sorted(official)
    for key, value in official.items():
        assert torch.equal(back[key], value), key


def test_strict_errors_name_the_keys() -> None:
    official = _tsv_state_dict("base")
    missing = dict(official)
    del missing["decode_blocks_1.1.mlp.fc2.bias"]
    with pytest.raises(OfficialCheckpointError, match=r"missing \['feature_decoder.blocks.1.mlp.fc2.bias'\]"):
        load_official_state_dict(missing, "base")
    with pytest.raises(OfficialCheckpointError, match="blocks.0.attn.relative_position_bias_table"):
        load_official_state_dict({**official, "blocks.0.attn.relative_position_bias_table": torch.zeros(3)})
    with pytest.raises(OfficialCheckpointError, match="shape mismatch encoder.blocks.0.norm1.weight"):
        load_official_state_dict({**official, "blocks.0.norm1.weight": torch.zeros(5)})
    with pytest.raises(OfficialCheckpointError, match="encoder.blocks.12"):
        load_official_state_dict(official, "large")  # base weights into the large model
    with pytest.raises(OfficialCheckpointError, match="arch='huge'"):
        load_official_state_dict(official, "huge")


def _perturbed_official_weights(arch: str) -> dict[str, torch.Tensor]:
    """Official-layout weights with every bias and norm made non-trivial."""
    cfg = load_config(f"vit_{arch}_800ep")
    state = build_model(cfg).state_dict()
    g = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if "pos_embed" not in key and (key.endswith("bias") or "norm" in key):
            state[key] = value + 0.1 * torch.randn(value.shape, generator=g)
    return ours_to_official(state, cfg)


def _shuffle_from_mask(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """The official token order: visible patches first, each group in random order."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(mask.shape, generator=g)
    return torch.argsort(mask.float() * 2 + rand, dim=1)


def test_forward_matches_the_official_computation() -> None:
    official = _perturbed_official_weights("base")
    model = load_official_state_dict(official, "base").eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 224, 224, generator=g)
    mask = torch.zeros(2, 196, dtype=torch.bool)
    for b in range(2):
        mask[b, torch.randperm(196, generator=g)[:147]] = True
    with torch.no_grad():
        ours = model(images, mask)
        ref_image, ref_feat = official_forward(
            official, images, _shuffle_from_mask(mask, 3), 147,
            patch=16, depth=12, heads=12, feature_blocks=(0, 11))
        ref_target = official_target_features(official, images, patch=16, depth=12, heads=12)
        target = model.encoder.target_features(images)
    ref_pixels = patchify(ref_image, 16)
    assert ref_pixels.abs().mean() > 0.1 and ref_feat.abs().mean() > 0.1
    torch.testing.assert_close(ours.pixels, ref_pixels, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ours.features, ref_feat, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(target, ref_target, atol=2e-4, rtol=1e-4)


def test_released_file_layout_and_corrupt_files(tmp_path) -> None:
    official = _tsv_state_dict("base")
    path = tmp_path / "BootMAE_Base_800_PT.pth"
    ema = {k: v + 1 for k, v in official.items()}
    torch.save({"model": official, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4)}, path)
    blob = read_official_checkpoint(path)
    assert blob["epoch"] == 799
    online = load_official_state_dict(blob, "base")
    momentum = load_official_state_dict(blob, "base", use_ema=True)
    assert torch.equal(momentum.encoder.cls_token, online.encoder.cls_token + 1)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(OfficialCheckpointError, match="truncated.pth"):
        read_official_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_official_checkpoint(tmp_path / "nope.pth")
