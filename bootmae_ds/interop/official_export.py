"""A run's checkpoint written as a released BootMAE file (``launchers/export.py --format official``),
for the official ``run_class_finetuning.py --model_key model``, the official ``Segmentation``
backbone (``mmcv_custom/checkpoint.py``) and our own ``--official`` import.

The file is a dict that ``torch.load(..., weights_only=True)`` reads (tensors and plain Python
values only, no ``argparse.Namespace``):

- ``model``: the online model keyed as the official pre-training model (``ours_to_official``):
  ZeRO's fp32 masters of the encoder and both decoders, the run's position tables.
- ``model_ema`` (runs with a momentum encoder): the official file's EMA is one of the whole model;
  bootmae-ds keeps an EMA of the encoder only, so ``model_ema`` holds the momentum encoder (fp32
  EMA shards) and, in its decoder slots, the online decoders. It loads strictly wherever the
  official one does, and its encoder is exactly our momentum encoder.
- ``epoch`` (the data epoch the checkpoint was in), ``step``, and ``args``: a plain dict with the
  run's config and provenance (the official file's ``args`` is an ``argparse.Namespace``).

What the official layout cannot hold is refused, naming the field: a pixel head with one bias per
value (``model.pixel_head_bias=per_value``) and a feature predictor whose position table is not
the encoder's (the official model reuses ``pos_embed``; ``model.feature_decoder.dim`` must be null).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import official
from .encoders import ExportError, init_provenance, momentum_state, open_run, run_model_state


def official_state(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Our whole model's state (BootMAE names) in the official keys, contiguous fp32 copies."""
    table = state.get("feature_decoder.pos_embed")
    if table is not None and not torch.equal(table, state["encoder.pos_embed"]):
        dim = cfg.model.feature_decoder.dim
        raise ExportError(f"model.feature_decoder.dim={dim}: the feature predictor's position table differs from "
                          f"the encoder's, and the official layout has none of its own (it reuses pos_embed); "
                          f"export this run with --format timm")
    try:
        converted = official.ours_to_official(state, cfg)
    except official.OfficialCheckpointError as err:
        raise ExportError(f"{err}; export this run with --format timm") from None
    return {k: v.detach().float().contiguous().clone() for k, v in converted.items()}


def official_blob(run: Path, tag: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the file's content, provenance) of a run's checkpoint (``latest`` when ``tag`` is None)."""
    tag_dir, manifest, cfg = open_run(Path(run), tag)
    online = run_model_state(tag_dir, cfg)
    blob: dict[str, Any] = {"model": official_state(online, cfg)}
    has_momentum = (tag_dir / "momentum_rank0.pt").is_file()
    if has_momentum:
        ema = momentum_state(tag_dir, manifest["world_size"])
        blob["model_ema"] = official_state(online | {f"encoder.{k}": v for k, v in ema.items()}, cfg)
    provenance = {"source": "run", "run_dir": str(tag_dir.parent.parent.resolve()), "tag": tag_dir.name,
                  "step": manifest["step"], "world_size": manifest["world_size"],
                  "fingerprint": cfg.fingerprint(),
                  "model_ema": "momentum encoder + online decoders" if has_momentum else "none",
                  **init_provenance(cfg)}
    data = (manifest.get("run_state") or {}).get("data") or {}
    if isinstance(data.get("epoch"), int):
        blob["epoch"] = data["epoch"]
    blob["step"] = int(manifest["step"])
    blob["args"] = {"bootmae_ds": cfg.model_dump(mode="json"), "provenance": provenance}
    return blob, provenance


def write_official(blob: dict[str, Any], out: Path, force: bool = False) -> Path:
    """Write ``blob`` to ``out`` (a ``.pth`` file) all at once: staged beside it, then renamed."""
    out = Path(out)
    check_out_file(out, force)
    stage = out.with_name(f".{out.name}.export-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, stage)
        os.replace(stage, out)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        raise ExportError(f"{out}: cannot write the export ({err}); fix that and run again") from None
    finally:
        stage.unlink(missing_ok=True)
    return out


def check_out_file(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``, and a directory always."""
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; --format official writes one file, e.g. --out {out / 'checkpoint.pth'}")
    if out.exists() and not force:
        raise ExportError(f"{out}: exists; pass another --out, or --force to replace it")
