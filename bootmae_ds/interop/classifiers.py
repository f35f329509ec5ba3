"""Released and exported ViT classifiers, read strictly into :class:`ViTClassifier` (mean-pooled
patch tokens, ``fc_norm``, linear head) for ``--eval-only --weights FILE``.

Layouts (after a ``module.`` prefix is dropped):

- ``official``: BootMAE's fine-tuned files (``BootMAE_{Base,Large}_800_FT.pth``,
  ``models/modeling_finetune_bootmae.py`` as ``run_class_finetuning.py --abs_pos_emb
  --disable_rel_pos_bias`` trains it): BEiT block keys with ``attn.q_bias``/``attn.v_bias``, the
  fixed sin-cos ``pos_embed``, no relative position bias, no layer scale, ``fc_norm`` + ``head``;
  the weights under ``model`` or ``model_ema`` (``ema=True``).
- ``mae``: MAE's fine-tuned files (``mae_finetuned_vit_{base,large,huge}.pth``): timm ViT keys
  under ``model``, ``global_pool`` (``fc_norm``), normalised with ImageNet's mean and std.
- ``timm``: a timm ``VisionTransformer(global_pool="avg", fc_norm=True)`` state dict (``.pth``,
  ``.bin``, ``.safetensors``) and this project's ``RUN/best`` (its directory or
  ``model.safetensors``; ``config.json`` beside it gives heads and normalisation).

timm's ``attn.qkv.bias`` has a k part our attention has no place for: adding the same ``q . b_k``
to every logit of a query leaves the softmax unchanged, so it is dropped (``interop/mae.py``).
Every other key is used and every shape checked; a mismatch is a one-line :class:`ClassifierFileError`
naming the key. The architecture comes from the shapes (width, depth, patch, grid, MLP width,
classes) and ``config.json``; the head count from ``config.json``, else the config's architecture
when the widths agree, else the standard ViT of that width (Ti/S/B/L/H).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import InputError
from ..models.classifier import ViTClassifier
from ..models.vit import VisionTransformerEncoder
from .safe_load import safe_torch_load

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BOOTMAE_MEAN = BOOTMAE_STD = (0.5, 0.5, 0.5)
VIT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H by width

# file name -> (layout, width, the published ImageNet-1k top-1, where it is published)
KNOWN_RELEASES: dict[str, tuple[str, int, float, str]] = {
    "BootMAE_Base_800_FT.pth": ("official", 768, 84.2, "BootMAE paper / LightDXY/BootMAE README, ViT-B/16 800 ep"),
    "BootMAE_Large_800_FT.pth": ("official", 1024, 85.9, "BootMAE paper / LightDXY/BootMAE README, ViT-L/16 800 ep"),
    "mae_finetuned_vit_base.pth": ("mae", 768, 83.6, "facebookresearch/mae FINETUNE.md, ViT-B/16"),
    "mae_finetuned_vit_large.pth": ("mae", 1024, 85.9, "facebookresearch/mae FINETUNE.md, ViT-L/16"),
    "mae_finetuned_vit_huge.pth": ("mae", 1280, 86.9, "facebookresearch/mae FINETUNE.md, ViT-H/14"),
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.proj|attn\.qkv|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_QV_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.(q_bias|v_bias)$")
_TOP = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|fc_norm\.(weight|bias)|head\.(weight|bias))$")
_OFFICIAL_OFF_RECIPE = ("relative_position", "gamma_1", "gamma_2", "rel_pos_bias")


class ClassifierFileError(InputError, ValueError):
    """A classifier file that cannot be read, or does not fit; the message names the key."""


@dataclass
class ClassifierFile:
    """A classifier read from a file, and what the file says about itself."""

    model: ViTClassifier
    layout: str
    img_size: int
    num_classes: int
    mean: tuple[float, float, float] | None  # None: the file does not say
    std: tuple[float, float, float] | None
    release: tuple[str, float, str] | None  # (name, published top-1, source) of a known release


def _read(path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """(state dict, config.json or {}, whether it came wrapped under ``model``)."""
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ClassifierFileError(f"--weights {path}: no such file; pass a released .pth, a timm state dict, "
                                  f"model.safetensors or RUN/best")
    config_path = path.parent / "config.json"
    config = json.loads(config_path.read_text()) if path.suffix == ".safetensors" and config_path.is_file() else {}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), config, False
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise ClassifierFileError(f"{path}: unreadable safetensors ({type(err).__name__}: {err})") from None
    blob = safe_torch_load(path, "classifier file")
    if not isinstance(blob, Mapping):
        raise ClassifierFileError(f"{path}: holds a {type(blob).__name__}, not a state dict")
    key = "model_ema" if ema else None
    if ema and "model_ema" not in blob:
        raise ClassifierFileError(f"{path}: --ema asks for 'model_ema', which the file does not hold "
                                  f"(it holds {sorted(blob)[:6]}); drop --ema")
    key = key or next((k for k in ("model", "state_dict", "module") if isinstance(blob.get(k), Mapping)), None)
    state = blob[key] if key else blob
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClassifierFileError(f"{path}: no state dict of tensors (looked under {key or 'the top level'})")
    return {k.removeprefix("module."): v for k, v in state.items()}, config, key in ("model", "model_ema")


def _layout(path: Path, state: Mapping[str, torch.Tensor], wrapped: bool) -> str:
    off = sorted(k for k in state if any(p in k for p in _OFFICIAL_OFF_RECIPE))
    if off:
        raise ClassifierFileError(f"{path}: {off[0]} belongs to relative position bias / layer scale, which the "
                                  f"official fine-tuning (--abs_pos_emb --disable_rel_pos_bias) does not have; "
                                  f"another architecture")
    if "fc_norm.weight" not in state:
        what = "a cls-token classifier (norm + head, global_pool='token')" if "norm.weight" in state else \
            "no classifier (no fc_norm)"
        raise ClassifierFileError(f"{path}: fc_norm.weight missing: {what}; --eval-only scores mean-pooled "
                                  f"ViT classifiers (global_pool='avg', fc_norm) only")
    if "blocks.0.attn.q_bias" in state:
        return "official"
    return "mae" if wrapped else "timm"


def _shape(path: Path, state: Mapping[str, torch.Tensor], key: str, dims: int) -> torch.Size:
    if key not in state:
        raise ClassifierFileError(f"{path}: {key} missing; not a ViT classifier file")
    if state[key].dim() != dims:
        raise ClassifierFileError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {dims} dims")
    return state[key].shape


def _encoder(path: Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
             heads: Mapping[int, int]) -> tuple[VisionTransformerEncoder, int]:
    """The encoder the shapes describe (fresh weights) and the head's class count."""
    dim, chans, p, _ = _shape(path, state, "patch_embed.proj.weight", 4)
    tokens = _shape(path, state, "pos_embed", 3)[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ClassifierFileError(f"{path}: pos_embed holds {tokens} patch positions, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ClassifierFileError(f"{path}: blocks.0.norm1.weight missing; not a ViT classifier file")
    hidden = _shape(path, state, "blocks.0.mlp.fc1.weight", 2)[0]
    classes = _shape(path, state, "head.weight", 2)[0]
    args = config.get("model_args", {})
    n_heads = args.get("num_heads") or heads.get(dim) or VIT_HEADS.get(dim)
    if not n_heads or dim % n_heads:
        raise ClassifierFileError(f"{path}: cannot tell the attention heads of a {dim}-wide ViT; set "
                                  f"init.config to a pre-training preset of this architecture")
    qkv_bias = "blocks.0.attn.q_bias" in state or "blocks.0.attn.qkv.bias" in state
    encoder = VisionTransformerEncoder(grid * p, p, chans, dim, depth, n_heads, hidden / dim, qkv_bias, 0.0, 1e-6)
    return encoder, classes


def _ours(path: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File keys -> :class:`ViTClassifier` keys (the k part of a qkv bias dropped, see above)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := re.match(r"^blocks\.(\d+)\.attn\.qkv\.bias$", key):
            if value.dim() != 1 or value.numel() % 3:
                raise ClassifierFileError(f"{path}: {key} has shape {tuple(value.shape)}, expected [3 x width]")
            q, _k, v = value.chunk(3)
            out[f"encoder.blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"encoder.blocks.{m.group(1)}.attn.v_bias"] = v
        elif _BLOCK.match(key) or _QV_BIAS.match(key) or re.match(r"^(cls_token|pos_embed|patch_embed\.)", key):
            out[f"encoder.{key}"] = value
        elif _TOP.match(key):
            out[key] = value
        else:
            raise ClassifierFileError(f"{path}: {key} has no place in a mean-pooled ViT classifier; "
                                      f"another architecture")
    return out


def _file_key(key: str, layout: str) -> str:
    key = key.removeprefix("encoder.")
    return re.sub(r"attn\.[qv]_bias$", "attn.qkv.bias", key) if layout != "official" else key


def _normalisation(layout: str, config: Mapping[str, Any]) -> tuple[Any, Any]:
    pre = config.get("pretrained_cfg", {})
    if "mean" in pre and "std" in pre:
        return tuple(pre["mean"]), tuple(pre["std"])
    return {"official": (BOOTMAE_MEAN, BOOTMAE_STD), "mae": (IMAGENET_MEAN, IMAGENET_STD)}.get(layout, (None, None))


def read_classifier(path: str | Path, *, ema: bool = False, heads: Mapping[int, int] | None = None) -> ClassifierFile:
    """Read ``path`` strictly into a fresh fp32 :class:`ViTClassifier` in eval mode (see the module
    docstring); ``heads``: width -> attention heads of the config's architecture, used when the
    file cannot say and its width is that one (else the standard ViT of its width)."""
    path = Path(path)
    state, config, wrapped = _read(path, ema)
    layout = _layout(path, state, wrapped)
    encoder, classes = _encoder(path, state, config, heads or {})
    model = ViTClassifier(encoder, classes).eval()
    ours, expected = _ours(path, state), model.state_dict()
    missing = [k for k in expected if k not in ours]
    if missing:
        raise ClassifierFileError(f"{path}: {_file_key(missing[0], layout)} missing ({len(missing)} keys in all) "
                                  f"for the {layout} layout of a {encoder.depth}-block {encoder.embed_dim}-wide ViT")
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise ClassifierFileError(f"{path}: {_file_key(key, layout)} has shape {tuple(value.shape)}, the "
                                      f"architecture its other keys describe needs {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    mean, std = _normalisation(layout, config)
    known = KNOWN_RELEASES.get(path.name)
    release = (path.name, known[2], known[3]) if known and known[:2] == (layout, encoder.embed_dim) else None
    return ClassifierFile(model, layout, encoder.patch_embed.img_size[0], classes, mean, std, release)
