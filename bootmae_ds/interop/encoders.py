"""Encoders from wherever they were trained: a run's ZeRO checkpoint of any world size
(consolidated in fp32 on one CPU process) or a released official BootMAE ``.pth``.

``which`` picks the online encoder (ZeRO's fp32 master weights) or the momentum encoder (its
fp32 EMA shards, never the bf16 copy the target forward uses; ``model_ema`` of an official file).
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
from ..models import VisionTransformerEncoder, build_model
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


class ExportError(InputError, RuntimeError):
    """Bad export input or output; the message names the path and what to do."""


@dataclass
class EncoderExport:
    """A consolidated fp32 encoder plus where it came from."""

    encoder: VisionTransformerEncoder
    cfg: BootMAEConfig
    provenance: dict[str, Any]
    head: torch.nn.Linear | None = None  # a fine-tuned classifier's head, exported as timm's ``head``


def load_encoder(cfg: BootMAEConfig, state: dict[str, torch.Tensor], what: str) -> VisionTransformerEncoder:
    """A fresh encoder holding ``state`` in fp32; ``pos_embed`` is the fixed sin-cos table."""
    m = cfg.model
    encoder = VisionTransformerEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth,
                                       m.num_heads, m.mlp_ratio, m.qkv_bias, 0.0, m.norm_eps).eval()
    # pos_embed is frozen, so ZeRO keeps no fp32 master of it (bf16 in bf16 runs): recompute it.
    full = {**{k: v.float() for k, v in state.items() if k != "pos_embed"},
            "pos_embed": encoder.pos_embed.detach().clone()}
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
    if cfg.model.model_dump(mode="json") != manifest["config"].get("model"):
        raise ExportError(f"{path}: its model section differs from the one saved in the checkpoint's "
                          f"{MANIFEST}; restore the run's original config.yaml")
    return cfg


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
    encoder = load_encoder(cfg, state, f"{tag_dir} ({which} encoder)")
    return EncoderExport(encoder, cfg, {
        "source": "run", "run_dir": str(run_dir.resolve()), "tag": tag_dir.name, "step": manifest["step"],
        "world_size": manifest["world_size"], "fingerprint": cfg.fingerprint(), "which": which})


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
