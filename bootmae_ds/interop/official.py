"""Converting the official BootMAE pre-training checkpoints into our model and back.

The released files (``BootMAE_{Base,Large}_800_PT.pth``) are dicts with ``model`` (the
pre-training state dict), ``model_ema`` (an EMA of the whole model), ``optimizer``, ``epoch``,
``scaler`` and ``args``. Key layout: ``../shared/reference/official_bootmae_*_state_dict.tsv``.

    model = load_official_state_dict(torch.load(path, ...), arch="base").eval()

Conversion is strict in both directions: every key is used, every shape is checked, and any
mismatch raises ``OfficialCheckpointError`` listing the offending keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import BootMAEConfig, InputError, load_config
from ..models import BootMAE, build_model

ARCH_PRESETS = {"base": "vit_base_800ep", "large": "vit_large_800ep"}

# (official prefix, our prefix); longest official prefixes first so "decode_blocks_1." wins.
_PREFIXES: list[tuple[str, str]] = [
    ("decode_blocks_1.", "feature_decoder.blocks."),
    ("decode_norm_1.", "feature_decoder.norm."),
    ("lm_head_1.", "feature_decoder.head."),
    ("down_1.", "feature_decoder.embed."),
    ("mask_token_1", "feature_decoder.mask_token"),
    ("decode_blocks.", "pixel_decoder.blocks."),
    ("decode_norm.", "pixel_decoder.norm."),
    ("lm_head.proj.", "pixel_decoder.head."),
    ("down.", "pixel_decoder.embed."),
    ("mask_token", "pixel_decoder.mask_token"),
    ("de_pos_embed", "pixel_decoder.pos_embed"),
    ("pos_embed", "encoder.pos_embed"),
    ("cls_token", "encoder.cls_token"),
    ("patch_embed.", "encoder.patch_embed."),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
]


class OfficialCheckpointError(InputError, ValueError):
    """An official checkpoint that does not match the requested architecture."""


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for src, dst in table:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):] if src.endswith(".") else dst
    return None


def _reverse_table() -> list[tuple[str, str]]:
    return sorted(((dst, src) for src, dst in _PREFIXES), key=lambda kv: -len(kv[0]))


def _patch_size(cfg: BootMAEConfig) -> int:
    return cfg.model.patch_size


def official_to_ours(state_dict: Mapping[str, torch.Tensor], cfg: BootMAEConfig) -> dict[str, torch.Tensor]:
    """Rename and reshape an official ``model`` state dict into our ``BootMAE`` layout."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    p = _patch_size(cfg)
    for key, value in state_dict.items():
        ours = _rename(key, _PREFIXES)
        if ours is None:
            unknown.append(key)
            continue
        if key == "lm_head.proj.weight":
            # ConvTranspose2d weight [dim, C, P, P] -> per-patch linear [(p, q, c), dim]
            if value.dim() != 4 or value.shape[2:] != (p, p):
                raise OfficialCheckpointError(
                    f"lm_head.proj.weight has shape {tuple(value.shape)}, expected [dim, C, {p}, {p}]")
            value = value.permute(2, 3, 1, 0).reshape(-1, value.shape[0])
        out[ours] = value
    if unknown:
        raise OfficialCheckpointError(f"keys not in the official BootMAE layout: {sorted(unknown)}")
    if "encoder.pos_embed" in out and cfg.model.feature_decoder.enabled:
        # The official feature predictor reuses the encoder's position embedding.
        out["feature_decoder.pos_embed"] = out["encoder.pos_embed"]
    return out


def ours_to_official(state_dict: Mapping[str, torch.Tensor], cfg: BootMAEConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`official_to_ours` (our ``feature_decoder.pos_embed`` is dropped)."""
    table = _reverse_table()
    out: dict[str, torch.Tensor] = {}
    p = _patch_size(cfg)
    for key, value in state_dict.items():
        if key == "feature_decoder.pos_embed":
            continue
        official = _rename(key, table)
        if official is None:
            raise OfficialCheckpointError(f"{key!r} has no place in the official layout")
        if official == "lm_head.proj.weight":
            dim = value.shape[1]
            value = value.reshape(p, p, -1, dim).permute(3, 2, 0, 1)
        if official == "lm_head.proj.bias" and value.numel() != cfg.model.in_chans:
            raise OfficialCheckpointError(
                f"{key} holds {value.numel()} biases, one per predicted value (model.pixel_head_bias="
                f"per_value, MAE's head); the official ConvTranspose2d head holds one per channel")
        out[official] = value
    return out


def _strict_load(model: BootMAE, state: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:8]))
        raise OfficialCheckpointError(f"{what} does not fit the model: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def _unwrap(state_dict: Mapping[str, Any], use_ema: bool) -> Mapping[str, torch.Tensor]:
    """Accept a bare state dict or the released file layout (``model`` / ``model_ema``)."""
    key = "model_ema" if use_ema else "model"
    if key in state_dict and isinstance(state_dict[key], Mapping):
        return state_dict[key]
    if use_ema:
        raise OfficialCheckpointError("use_ema=True needs the released layout with a 'model_ema' entry")
    return state_dict


def load_official_state_dict(
    state_dict: Mapping[str, Any], arch: str = "base", *, use_ema: bool = False
) -> BootMAE:
    """Build our BootMAE for ``arch`` ("base" or "large") and load official weights strictly."""
    if arch not in ARCH_PRESETS:
        raise OfficialCheckpointError(f"arch={arch!r}: must be one of {sorted(ARCH_PRESETS)}")
    cfg = load_config(ARCH_PRESETS[arch])
    model = build_model(cfg)
    converted = official_to_ours(_unwrap(state_dict, use_ema), cfg)
    _strict_load(model, converted, f"official {arch} checkpoint")
    return model


def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a released ``.pth`` on CPU without unpickling arbitrary code.

    The files carry an ``argparse.Namespace`` (``args``); it is the only non-tensor class
    allowed besides torch's own.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as err:
        raise OfficialCheckpointError(
            f"cannot read {str(path)!r} as a BootMAE checkpoint (truncated or not a torch file?): {err}"
        ) from None
