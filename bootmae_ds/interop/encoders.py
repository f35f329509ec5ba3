"""Encoders from wherever they were trained: a run's ZeRO checkpoint of any world size
(consolidated in fp32 on one CPU process) or a released official BootMAE ``.pth``.

``which`` picks the online encoder (ZeRO's fp32 master weights) or the momentum encoder (its
fp32 EMA shards, never the bf16 copy the target forward uses; ``model_ema`` of an official file).

Position tables are frozen, so ZeRO keeps no fp32 master of them: a run's tables are the fixed
sin-cos ones of its config, recomputed, unless the run started from other weights
(``init.source``): then the tables it started with (an MAE table orders its halves column first,
a timm table may be learned) are in ``RUN/init_frozen.safetensors`` and are used instead.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig, ConfigError, InputError, load_config
from ..config.common import InitConfig
from ..models import VisionTransformerEncoder, build_model, sincos_2d
from ..runtime.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    complete_tags,
    validate_checkpoint,
)
from ..runtime.sharded_ema import consolidate_shards
from . import official

WHICH = ("online", "momentum")
INIT_FROZEN = "init_frozen.safetensors"  # a run's frozen tensors when it started from other weights
INIT_RECORD = "init.json"  # where those weights came from


class ExportError(InputError, RuntimeError):
    """Bad export input or output; the message names the path and what to do."""


@dataclass
class EncoderExport:
    """A consolidated fp32 encoder plus where it came from."""

    encoder: VisionTransformerEncoder
    cfg: BootMAEConfig
    provenance: dict[str, Any]
    head: torch.nn.Linear | None = None  # a fine-tuned classifier's head, exported as timm's ``head``
    fc_norm: torch.nn.LayerNorm | None = None  # a classifier's own fc_norm; None: the encoder's final norm


def frozen_tables(run_dir: Path, cfg: BootMAEConfig) -> dict[str, torch.Tensor]:
    """A run's frozen position tables (BootMAE names, fp32): those it started with when it has
    ``RUN/init_frozen.safetensors``, else the sin-cos tables of its config."""
    path = run_dir / INIT_FROZEN
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise ExportError(f"{path}: unreadable ({type(err).__name__}: {err}); it holds the position "
                              f"tables this run started with, restore it from a backup") from None
    m = cfg.model
    out = {"encoder.pos_embed": sincos_2d(m.grid_size, m.embed_dim),
           "pixel_decoder.pos_embed": sincos_2d(m.grid_size, m.pixel_decoder.dim or m.embed_dim)}
    if m.feature_decoder.enabled:
        out["feature_decoder.pos_embed"] = sincos_2d(m.grid_size, m.feature_decoder.dim or m.embed_dim)
    return out


def load_encoder(cfg: BootMAEConfig, state: dict[str, torch.Tensor], what: str,
                 pos_embed: torch.Tensor | None = None) -> VisionTransformerEncoder:
    """A fresh encoder holding ``state`` in fp32; ``pos_embed`` is the given table (a run's, see
    :func:`frozen_tables`) or else the fixed sin-cos table of ``cfg``."""
    m = cfg.model
    encoder = VisionTransformerEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth,
                                       m.num_heads, m.mlp_ratio, m.qkv_bias, 0.0, m.norm_eps).eval()
    # pos_embed is frozen, so ZeRO keeps no fp32 master of it (bf16 in bf16 runs): never from state
    table = encoder.pos_embed.detach().clone() if pos_embed is None else pos_embed.float().clone()
    full = {**{k: v.float() for k, v in state.items() if k != "pos_embed"}, "pos_embed": table}
    expected = encoder.state_dict()
    missing, extra = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    shapes = [k for k in expected if k in full and full[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise ExportError(f"{what}: does not fit the encoder of its config (missing {missing[:5]}, "
                          f"unexpected {extra[:5]}, shape mismatch {shapes[:5]})")
    encoder.load_state_dict(full, strict=True)
    return encoder


def resolve_tag_dir(run: Path, tag: str | None) -> Path:
    """``RUN/checkpoints/TAG``, or the tag named by ``latest``; a checkpoint dir is accepted too."""
    if not run.is_dir():
        raise ExportError(f"{run}: no such run directory; pass the --output-dir of a pre-training run")
    if tag is None and (run / MANIFEST).is_file():
        return run  # RUN was a checkpoint directory itself
    ckpt = run if (run / LATEST).is_file() else run / "checkpoints"  # RUN or RUN/checkpoints
    if tag is None:
        try:
            tag = (ckpt / LATEST).read_text().strip()
        except OSError:
            raise ExportError(f"{ckpt / LATEST}: missing, the run has no complete checkpoint yet; "
                              f"pass --tag step_XXXXXXXX") from None
    tag_dir = ckpt / tag
    if not tag_dir.is_dir():
        have = [p.name for p in complete_tags(ckpt)]
        raise ExportError(f"{tag_dir}: no such checkpoint; pick --tag among {have or 'none'}")
    if not (tag_dir / MANIFEST).is_file():
        raise ExportError(f"{tag_dir}: incomplete checkpoint (no {MANIFEST}, its save was interrupted); "
                          f"export another --tag")
    return tag_dir


def read_manifest(tag_dir: Path) -> dict[str, Any]:
    """The manifest, after checking every file's size (any world size is fine here)."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        # Compared with itself, so only the file checks of validate_checkpoint can fail.
        return validate_checkpoint(tag_dir, manifest["config"], manifest["world_size"])
    except CheckpointError as err:  # its advice is about resuming; keep the path and the problem
        raise ExportError(f"{str(err).split('; ')[0]}; export another checkpoint with --tag") from None
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"{tag_dir / MANIFEST}: unreadable manifest ({err}); export another --tag") from None


def _run_config(run_dir: Path, manifest: dict[str, Any]) -> BootMAEConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path}: missing; the export needs the run's config (mean/std, model)")
    try:
        cfg = load_config(path)
    except ConfigError as err:
        raise ExportError(f"{path}: {err}") from None
    saved, now = _flat(manifest["config"].get("model") or {}), _flat(cfg.model.model_dump(mode="json"))
    if any(now.get(k) != v for k, v in saved.items()):  # fields the checkpoint predates are not compared
        raise ExportError(f"{path}: its model section differs from the one saved in the checkpoint's "
                          f"{MANIFEST}; restore the run's original config.yaml")
    return cfg


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise ExportError(f"{path}: unreadable ({type(err).__name__}: {err}); export another --tag") from None


def online_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The online encoder's fp32 master weights, consolidated from ZeRO shards on the CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:  # DeepSpeed narrates every shard it reads; the CLI prints one line instead
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises many types; name the directory
        raise ExportError(f"{tag_dir}: DeepSpeed could not consolidate it ({type(err).__name__}: {err}); "
                          f"export another --tag") from None
    return {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}


def momentum_state(tag_dir: Path, world_size: int) -> dict[str, torch.Tensor]:
    """The momentum encoder's fp32 EMA, joined from the shards of all ``world_size`` ranks."""

    paths = [tag_dir / f"momentum_rank{r}.pt" for r in range(world_size)]
    if not paths[0].is_file():
        raise ExportError(f"{paths[0]}: missing; this run has no momentum encoder "
                          f"(no feature branch?), export --which online")
    try:
        return consolidate_shards([_torch_load(p) for p in paths])
    except (KeyError, IndexError, ValueError, RuntimeError) as err:
        raise ExportError(f"{tag_dir}: momentum shards do not fit together ({err})") from None


def from_run(run: Path, tag: str | None = None, which: str = "online") -> EncoderExport:
    """Consolidate one encoder of a run's checkpoint (``latest`` when ``tag`` is None)."""
    if which not in WHICH:
        raise ExportError(f"which={which!r}: must be one of {WHICH}")
    tag_dir = resolve_tag_dir(Path(run), tag)
    manifest = read_manifest(tag_dir)
    run_dir = tag_dir.parent.parent
    cfg = _run_config(run_dir, manifest)
    state = online_state(tag_dir) if which == "online" else momentum_state(tag_dir, manifest["world_size"])
    table = frozen_tables(run_dir, cfg)["encoder.pos_embed"]
    encoder = load_encoder(cfg, state, f"{tag_dir} ({which} encoder)", table)
    return EncoderExport(encoder, cfg, {
        "source": "run", "run_dir": str(run_dir.resolve()), "tag": tag_dir.name, "step": manifest["step"],
        "world_size": manifest["world_size"], "fingerprint": cfg.fingerprint(), "which": which,
        **init_provenance(cfg)})


def init_provenance(cfg: BootMAEConfig) -> dict[str, Any]:
    """``{"started_from": ...}``: the weights a run started from (its config's resolved ``init``),
    or nothing for a run that started from a random initialisation."""
    init = getattr(cfg, "init", None)
    if init is None or init.source == "random":
        return {}
    return {"started_from": init.model_dump(mode="json")}


def run_model_state(tag_dir: Path, cfg: BootMAEConfig) -> dict[str, torch.Tensor]:
    """The whole online model of a run's checkpoint in fp32, BootMAE names: ZeRO's fp32 masters of
    every trained parameter (encoder and decoders) and the run's frozen tables."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                            exclude_frozen_parameters=True)
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises many types; name the directory
        raise ExportError(f"{tag_dir}: DeepSpeed could not consolidate it ({type(err).__name__}: {err}); "
                          f"pick another --tag") from None
    return {k: v.float() for k, v in full.items()} | frozen_tables(tag_dir.parent.parent, cfg)


def open_run(run: Path, tag: str | None) -> tuple[Path, dict[str, Any], BootMAEConfig]:
    """(checkpoint directory, its manifest, the run's config) of ``run`` at ``tag`` (latest: None)."""
    tag_dir = resolve_tag_dir(Path(run), tag)
    manifest = read_manifest(tag_dir)
    return tag_dir, manifest, _run_config(tag_dir.parent.parent, manifest)


def from_official(path: Path, arch: str = "base", which: str = "online") -> EncoderExport:
    """One encoder of a released BootMAE checkpoint (``momentum`` = its ``model_ema``)."""

    if which not in WHICH:
        raise ExportError(f"which={which!r}: must be one of {WHICH}")
    try:
        blob = official.read_official_checkpoint(path)
        model = official.load_official_state_dict(blob, arch, use_ema=which == "momentum")
    except (FileNotFoundError, official.OfficialCheckpointError) as err:
        raise ExportError(f"{err}; pass the released BootMAE_*_PT.pth and its --arch") from None
    cfg = load_config(official.ARCH_PRESETS[arch])  # the strict load checked every encoder key and shape
    return EncoderExport(model.encoder.float().eval(), cfg, {
        "source": "official", "file": str(Path(path).resolve()), "arch": arch, "epoch": blob.get("epoch"),
        "fingerprint": cfg.fingerprint(), "which": which})


def load_init_encoder(init: InitConfig, seed: int) -> tuple[VisionTransformerEncoder, BootMAEConfig, dict[str, Any]]:
    """(fp32 encoder, its pre-training config, provenance) for ``init``: a run directory, an
    official ``.pth`` or ``random`` (a fresh encoder of ``init.config`` seeded with ``seed``)."""
    if init.source == "random":
        pre = load_config(init.config)
        torch.manual_seed(seed)
        return build_model(pre).encoder, pre, {"source": "random", "config": init.config}
    path = Path(init.source)
    if path.is_file():
        exp = from_official(path, init.arch, init.which)
    elif path.is_dir():
        exp = from_run(path, init.tag, init.which)
    else:
        raise FileNotFoundError(f"init.source={init.source!r}: neither a run directory, an official .pth, "
                                f"nor 'random'")
    return exp.encoder, exp.cfg, exp.provenance
