"""Reading what a pre-training run can start from (``init.*``): continued pre-training from
released or earlier weights. ``pretrain_init`` applies it to the run.

Sources (``init.kind``; ``auto`` recognises them from their keys):

- ``bootmae``: a released BootMAE ``.pth`` (``model``, ``model_ema``; or a bare state dict in
  that layout): encoder, both decoders and mask tokens of ``model`` (``init.which=momentum``:
  of ``model_ema``); the momentum encoder starts from ``model_ema``'s encoder.
- ``mae``: MAE's released checkpoints (``model``): the encoder, and the decoder as the pixel
  regressor for the files that hold one (``interop/mae.py``).
- ``timm``: a timm ViT state dict (``.pth``/``.bin``/``.safetensors``, bare or under ``model`` /
  ``state_dict``) or one of our exports (its directory or ``model.safetensors``): the encoder.
- ``run``: another bootmae-ds pre-training run (``init.tag`` or its latest checkpoint), weights
  only: the online model from ZeRO's fp32 masters, the momentum encoder from its fp32 shards.

Every key of the source is used or reported (``unused`` in ``RUN/init.json``), every shape is
checked against the model (the encoder must be complete; a decoder is taken whole or not at
all), and a source without an EMA encoder starts the momentum encoder as a copy of the encoder.

Position tables. On the same grid the source's tables are carried bit for bit (MAE's sin-cos
table orders its halves column first, ours row first: recomputing ours would transpose every
position). On another grid a fixed sin-cos table, recognised in either order, is recomputed for
the new grid in that order (bicubic interpolation of a sin-cos table is not a sin-cos table, and
the method keeps fixed sin-cos positions); a learned table (timm) is resampled bicubically, as
fine-tuning does. Fresh decoders get their tables in the encoder's order. The tables a run
started with are kept in ``RUN/init_frozen.safetensors``: a resume and every export use them.

The optimizer, step and schedules start fresh. ``init`` is read at the first start only: a resume
continues from its checkpoint and takes the frozen tables and the provenance from the run's files.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig, InputError
from ..config.pretrain import PretrainInitConfig
from ..models.pos_embed import LAYOUTS, sincos_2d
from ..runtime import checkpoint as ckpt
from . import mae, official
from .encoders import (
    ExportError,
    momentum_state,
    open_run,
    run_model_state,
)

PARTS = ("encoder", "pixel_decoder", "feature_decoder")
TABLES = tuple(f"{part}.pos_embed" for part in PARTS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


class InitError(InputError, ValueError):
    """An ``init.source`` that cannot start this model; the message names the file and the keys."""


@dataclass
class InitialState:
    """What a source gives a new run, in our names and fp32."""

    model: dict[str, torch.Tensor]  # the BootMAE keys it sets (parts not in it start fresh)
    teacher: dict[str, torch.Tensor] | None  # encoder keys of the momentum encoder; None: copy the encoder
    provenance: dict[str, Any] = field(default_factory=dict)


# -- reading sources -------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_file(path: Path) -> dict[str, Any]:
    """A torch or safetensors file, loaded without unpickling arbitrary code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # the released BootMAE files carry an argparse.Namespace (args); nothing else is allowed.
        # mmap: every rank reads the file, and only the weights it uses (not an optimizer state)
        # should take memory; legacy (non-zip) files cannot be mapped.
        with torch.serialization.safe_globals([argparse.Namespace]):
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types for damaged files
        raise InitError(f"init.source={str(path)!r}: cannot read it (truncated, or not a torch/safetensors "
                        f"file?): {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(blob, Mapping):
        raise InitError(f"init.source={str(path)!r}: holds a {type(blob).__name__}, not a state dict")
    return dict(blob)


def _unwrap(blob: dict[str, Any]) -> tuple[str | None, Mapping[str, torch.Tensor]]:
    """(the wrapper key or None, the state dict) of a checkpoint file."""
    for key in ("model", "state_dict"):
        if isinstance(blob.get(key), Mapping):
            return key, blob[key]
    return None, blob


def _layout_of(state: Mapping[str, Any]) -> str | None:
    if "blocks.0.attn.q_bias" in state or any(k.startswith(("decode_blocks", "lm_head")) for k in state):
        return "bootmae"
    if mae.is_timm_layout(state):
        return "timm"
    return None


def _resolve_path(source: str) -> tuple[Path, str | None]:
    """The file (or run directory) of ``init.source`` and the kind its form implies."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            return path / "model.safetensors", "timm"  # one of our exports
        return path, "run"
    if path.is_file():
        return path, None
    raise InitError(f"init.source={source!r}: no such file or directory; give a released .pth, an MAE or "
                    f"timm state dict, an export directory, a pre-training run directory, or 'random'")


def table_layout(table: torch.Tensor) -> str | None:
    """The half order of a fixed 2-D sin-cos table on a square grid, or None (a learned table)."""
    n, dim = table.shape[1] - 1, table.shape[2]
    side = math.isqrt(n)
    if side * side != n or dim % 4:
        return None
    for layout in LAYOUTS:  # MAE computes its table in float64: equal to ours up to float32 rounding
        if torch.allclose(table.float(), sincos_2d((side, side), dim, layout=layout), atol=1e-4, rtol=0):
            return layout
    return None


def fit_table(table: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """``table`` for ``grid``: kept on the same grid, else recomputed (sin-cos) or resampled."""
    if table.shape[1] == 1 + grid[0] * grid[1]:
        return table, "kept"
    side = math.isqrt(table.shape[1] - 1)
    layout = table_layout(table)
    if layout is not None:
        return sincos_2d(grid, table.shape[2], layout=layout), \
            f"sin-cos ({layout}) recomputed for {side}x{side} -> {grid[0]}x{grid[1]}"
    if side * side != table.shape[1] - 1:
        raise InitError(f"position table of {table.shape[1] - 1} patches is not a square grid")
    from timm.layers import resample_abs_pos_embed

    out = resample_abs_pos_embed(table.float(), list(grid), [side, side], num_prefix_tokens=1)
    return out, f"learned, resampled bicubic {side}x{side} -> {grid[0]}x{grid[1]}"


def _read_bootmae(path: Path, blob: dict[str, Any], init: PretrainInitConfig, cfg: BootMAEConfig):
    wrapper, main = _unwrap(blob)
    ema = blob.get("model_ema") if isinstance(blob.get("model_ema"), Mapping) else None
    if init.which == "momentum" and ema is None:
        raise InitError(f"init.source={str(path)!r}: init.which=momentum needs a 'model_ema' entry; it has "
                        f"{sorted(blob)[:6]}; use init.which=online")
    src = ema if init.which == "momentum" else main
    try:
        model = official.official_to_ours(src, cfg)
        teacher = None
        if ema is not None:
            teacher = {k[len("encoder."):]: v for k, v in official.official_to_ours(ema, cfg).items()
                       if k.startswith("encoder.") and k != "encoder.pos_embed"}
    except official.OfficialCheckpointError as err:
        raise InitError(f"init.source={str(path)!r}: {err}") from None
    unused = [f"{k} (not weights)" for k in blob if k not in ("model", "model_ema", wrapper)] if wrapper else []
    if ema is not None:
        unused.append("model_ema decoders (the momentum encoder is an EMA of the encoder only)")
    meta = {"epoch": blob.get("epoch") if isinstance(blob.get("epoch"), int) else None,
            "teacher": "model_ema encoder" if ema is not None else "copy of the encoder",
            "weights": "model_ema" if init.which == "momentum" else (wrapper or "state dict")}
    return model, teacher, unused, meta


def _read_timm(path: Path, blob: dict[str, Any], init: PretrainInitConfig, kind: str):
    if init.which == "momentum":
        raise InitError(f"init.source={str(path)!r}: an MAE or timm file has no momentum encoder; use "
                        f"init.which=online (the momentum encoder then starts as a copy of the encoder)")
    wrapper, main = _unwrap(blob)
    try:
        model, unused = mae.to_ours(main, decoders=init.decoders)
    except mae.LayoutError as err:
        raise InitError(f"init.source={str(path)!r}: {err}") from None
    unused += [f"{k} (not weights)" for k in blob if k != wrapper] if wrapper else []  # optimizer, epoch, ...
    meta = {"epoch": blob.get("epoch") if isinstance(blob.get("epoch"), int) else None,
            "teacher": "copy of the encoder", "weights": wrapper or "state dict",
            "dropped": "the k part of every qkv.bias (exact: softmax ignores a per-query constant)"}
    return model, None, unused, meta


def _read_run(path: Path, init: PretrainInitConfig):
    try:
        tag_dir, manifest, src_cfg = open_run(path, init.tag)
        model = run_model_state(tag_dir, src_cfg)
        has_shards = (tag_dir / "momentum_rank0.pt").is_file()
        momentum = momentum_state(tag_dir, manifest["world_size"]) if has_shards else None
    except ExportError as err:
        raise InitError(f"init.source={str(path)!r}: {err}") from None
    if init.which == "momentum":
        if momentum is None:
            raise InitError(f"init.source={str(path)!r}: {tag_dir} has no momentum encoder (no "
                            f"momentum_rank*.pt); use init.which=online")
        model |= {f"encoder.{k}": v for k, v in momentum.items()}
    meta = {"tag": tag_dir.name, "step": manifest["step"], "run_dir": str(tag_dir.parent.parent.resolve()),
            "teacher": "momentum shards" if momentum is not None else "copy of the encoder",
            "weights": f"{init.which} ({tag_dir.name})", "manifest": tag_dir / ckpt.MANIFEST}
    return model, momentum, [], meta


def _fit(model: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None,
         expected: Mapping[str, torch.Size], cfg: BootMAEConfig, decoders: bool, what: str):
    """Keep the parts the model has, fit the tables, check every key and shape strictly."""
    grid = cfg.model.grid_size
    unused, tables, loaded = [], {}, []
    parts = {p: {k: v for k, v in model.items() if k.startswith(f"{p}.")} for p in PARTS}
    stray = sorted(set(model) - {k for keys in parts.values() for k in keys})
    if stray:
        raise InitError(f"{what}: keys outside encoder/decoders: {stray[:8]}")
    out: dict[str, torch.Tensor] = {}
    for part, state in parts.items():
        if not state:
            continue
        has_part = any(k.startswith(f"{part}.") for k in expected)
        if part != "encoder" and not (decoders and has_part):
            why = "init.decoders=false" if not decoders else f"this config has no {part}"
            unused.append(f"{part}.* ({len(state)} tensors; {why})")
            continue
        table_key = f"{part}.pos_embed"
        if table_key in state and table_key in expected:
            state[table_key], tables[table_key] = fit_table(state[table_key], grid)
        want = {k: v for k, v in expected.items() if k.startswith(f"{part}.")}
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        shapes = [f"{k}: source {tuple(state[k].shape)} vs model {tuple(want[k])}"
                  for k in sorted(set(want) & set(state)) if tuple(state[k].shape) != tuple(want[k])]
        if missing or extra or shapes:
            parts_msg = ([f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}"] if missing else []) + \
                ([f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}"] if extra else []) + \
                (["shape mismatch " + "; ".join(shapes[:4])] if shapes else [])
            hint = " (init.decoders=false takes the encoder alone)" if part != "encoder" else \
                " (another architecture: set model.size / model.* to the source's)"
            raise InitError(f"{what}: its {part} does not fit this config: {' | '.join(parts_msg)}{hint}")
        out.update({k: v.float() for k, v in state.items()})
        loaded.append(part)
    if "encoder" not in loaded:
        raise InitError(f"{what}: holds no encoder weights")
    if teacher is not None and not _has_momentum_encoder(cfg):
        why = "momentum.policy=frozen takes momentum.teacher_path" if cfg.uses_teacher else \
            "this config has no feature branch, hence no momentum encoder"
        unused.append(f"its momentum encoder ({why})")
        teacher = None
    if teacher is not None:
        want = {k[len("encoder."):]: v for k, v in expected.items()
                if k.startswith("encoder.") and k != "encoder.pos_embed"}
        bad = sorted(k for k in want if k not in teacher or tuple(teacher[k].shape) != tuple(want[k]))
        if bad:
            raise InitError(f"{what}: its momentum encoder does not fit this config ({bad[:6]})")
        teacher = {k: teacher[k].float() for k in want}
        loaded.append("momentum_encoder")
    # Fresh decoders take position tables in the encoder's half order (MAE's is column first).
    layout = table_layout(out["encoder.pos_embed"])
    if layout not in (None, "row_first"):
        for part in ("pixel_decoder", "feature_decoder"):
            key = f"{part}.pos_embed"
            if part not in loaded and key in expected:
                out[key] = sincos_2d(grid, expected[key][-1], layout=layout)
                tables[key] = f"fresh, sin-cos ({layout}) as the encoder's"
    return out, teacher, unused, tables, loaded


def _has_momentum_encoder(cfg: BootMAEConfig) -> bool:
    return cfg.uses_teacher and cfg.momentum.policy != "frozen"


def read_initial_state(init: PretrainInitConfig, cfg: BootMAEConfig,
                       expected: Mapping[str, torch.Size]) -> InitialState:
    """Read, recognise, convert and check ``init.source`` for a model of ``cfg`` whose state dict
    has the shapes ``expected``. Local reads only (no collective, no random numbers)."""
    path, implied = _resolve_path(init.source)
    what = f"init.source={init.source!r}"
    if implied == "run" or init.kind == "run":
        if implied != "run" or init.kind not in ("auto", "run"):
            raise InitError(f"{what}: init.kind={init.kind} but it is "
                            f"{'a directory (a pre-training run)' if implied == 'run' else 'a file'}")
        model, teacher, unused, meta = _read_run(path, init)
        kind, digest_of = "run", meta.pop("manifest")
    else:
        blob = _read_file(path)
        layout = _layout_of(_unwrap(blob)[1])
        if layout is None:
            keys = sorted(_unwrap(blob)[1])[:6]
            raise InitError(f"{what}: neither a BootMAE nor an MAE/timm ViT state dict (keys {keys} ...); "
                            f"wrong file, or another architecture")
        kind = init.kind if init.kind != "auto" else implied or (
            "bootmae" if layout == "bootmae" else
            "mae" if mae.has_mae_decoder(_unwrap(blob)[1]) or _unwrap(blob)[0] == "model" else "timm")
        if (kind == "bootmae") != (layout == "bootmae"):
            raise InitError(f"{what}: init.kind={kind} but it holds {'BootMAE' if layout == 'bootmae' else 'MAE/timm'} "
                            f"keys; set init.kind=auto")
        if kind == "bootmae":
            model, teacher, unused, meta = _read_bootmae(path, blob, init, cfg)
        else:
            model, teacher, unused, meta = _read_timm(path, blob, init, kind)
        digest_of = path
    digest = sha256_of(digest_of)
    if init.sha256 and init.sha256.lower() != digest:
        raise InitError(f"{what}: sha256 {digest} differs from init.sha256={init.sha256}; another file than "
                        f"the one this config names (set init.sha256=null to accept it)")
    model, teacher, dropped, tables, loaded = _fit(model, teacher, expected, cfg, init.decoders, what)
    if teacher is None:
        meta["teacher"] = "copy of the encoder" if _has_momentum_encoder(cfg) else "none"
    fresh = [p for p in PARTS if p not in loaded and any(k.startswith(f"{p}.") for k in expected)]
    provenance = {"source": str(path.resolve()), "kind": kind, "which": init.which, "sha256": digest,
                  **{k: v for k, v in meta.items() if v is not None}, "loaded": loaded, "fresh": fresh,
                  "tables": tables, "unused": unused + dropped}
    return InitialState(model, teacher, provenance)


def read_vit_state(path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The state dict of a checkpoint file (unwrapped from ``model`` / ``state_dict``) and its layout:
    ``bootmae`` (ours, the official release), ``timm`` (MAE, timm, our exports) or None. For jobs that
    take an encoder from any file (``interop/transfer.py``)."""
    state = _unwrap(_read_file(path))[1]
    return state, _layout_of(state)
