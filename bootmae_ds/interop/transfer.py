"""The encoder a dense-transfer job (detection, segmentation) starts from, from any ``init.source``:
a pre-training run, an official BootMAE ``.pth`` or random (``encoders.load_init_encoder``), and
also an MAE or timm ViT state dict or one of our exports (its directory or ``model.safetensors``).

MAE / timm keys map onto our encoder exactly (``interop/mae.py``: the k part of ``qkv.bias`` is
dropped, which softmax ignores). The architecture of an export comes from its ``config.json``
(timm's ``model_args``, and ``pretrained_cfg``'s mean and std); that of a bare MAE / timm file from
``init.config`` (a pre-training preset: ``vit_base_800ep``, ``vit_large_800ep``), with ImageNet's
mean and std, which MAE and timm trained with. The file's position table is kept as it is (MAE's
sin-cos halves are column first); a downstream backbone resamples it to its own grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import BootMAEConfig, ConfigError, load_config
from ..config.common import InitConfig
from ..models import VisionTransformerEncoder
from . import mae
from .encoders import ExportError, load_encoder, load_init_encoder
from .init_sources import InitError, read_vit_state, sha256_of

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
ARGS = {"img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim",
        "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias"}


def _export_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` beside (or in) an export, or None for a bare file."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise InitError(f"{config}: unreadable ({err}); restore the export's config.json") from None
    return data if isinstance(data.get("model_args"), dict) else None


def _architecture(init: InitConfig, export: dict[str, Any] | None, what: str) -> BootMAEConfig:
    """The pre-training config whose encoder the file fits (and the mean / std it was trained with)."""
    try:
        pre = load_config(init.config)
    except ConfigError as err:
        raise InitError(f"{what}: init.config={init.config!r}: {err}") from None
    if export is None:
        return pre.model_copy(update={"data": pre.data.model_copy(update=IMAGENET)})
    args, norm = export["model_args"], export.get("pretrained_cfg", {})
    dims = [f"model.{ours}={args[theirs]}" for theirs, ours in ARGS.items() if theirs in args]
    data = [f"data.{k}=[{','.join(str(v) for v in norm[k])}]" for k in ("mean", "std") if k in norm]
    patches = (args.get("img_size", 224) // args.get("patch_size", 16)) ** 2
    masking = ["mask.strategy=random", f"mask.num_masked={patches * 3 // 4}"]  # only the encoder is used
    try:
        return load_config(init.config, ["model.size=null", *dims, *data, *masking])
    except ConfigError as err:
        raise InitError(f"{what}: its config.json does not give a valid encoder ({err})") from None


def load_transfer_encoder(init: InitConfig, seed: int) -> tuple[VisionTransformerEncoder, BootMAEConfig, dict[str, Any]]:
    """(fp32 encoder, its pre-training config, provenance) for ``init`` (see the module docstring)."""
    path = Path(init.source).expanduser()
    file = path / "model.safetensors" if path.is_dir() else path
    if init.source == "random" or not file.is_file():
        return load_init_encoder(init, seed)  # a run directory, random, or a missing path (named there)
    what = f"init.source={init.source!r}"
    state, layout = read_vit_state(file)
    if layout != "timm":
        return load_init_encoder(init, seed)  # an official BootMAE file (or not a ViT: named there)
    if init.which == "momentum":
        raise InitError(f"{what}: an MAE or timm file has no momentum encoder; use init.which=online")
    try:
        ours, unused = mae.to_ours(state, decoders=False)
    except mae.LayoutError as err:
        raise InitError(f"{what}: {err}") from None
    export = _export_config(file)
    pre = _architecture(init, export, what)
    encoder_state = {k[len("encoder."):]: v for k, v in ours.items() if k.startswith("encoder.")}
    table = encoder_state.pop("pos_embed", None)
    if table is None or table.shape[1] != 1 + pre.model.num_patches:
        shape = None if table is None else tuple(table.shape)
        raise InitError(f"{what}: position table {shape} does not fit the {pre.model.grid_size} grid of "
                        f"init.config={init.config!r}; set init.config to the file's architecture")
    try:
        encoder = load_encoder(pre, encoder_state, what, table)
    except ExportError as err:
        raise InitError(f"{err}; set init.config to the file's architecture (vit_large_800ep for ViT-L)") from None
    provenance = {"source": "export" if export else "timm", "file": str(file.resolve()), "sha256": sha256_of(file),
                  "config": init.config if export is None else "config.json", "unused": unused,
                  "dropped": "the k part of every qkv.bias (exact: softmax ignores a per-query constant)"}
    return encoder, pre, provenance
