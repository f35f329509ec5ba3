"""The initial weights of a pre-training run, applied (``init.*``; the sources are read by
``init_sources``): at the first start the model, ZeRO's fp32 masters and the momentum encoder take
the source's weights, and the run keeps a record (``RUN/init.json``) and its starting position
tables (``RUN/init_frozen.safetensors``); a resume takes both from the run's files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig
from ..config.pretrain import PretrainInitConfig
from ..runtime import checkpoint as ckpt
from .encoders import (
    INIT_FROZEN,
    INIT_RECORD,
)
from .init_sources import (
    IMAGENET_MEAN,
    InitError,
    InitialState,
    fit_table,
    read_initial_state,
    table_layout,
)

__all__ = ["InitError", "PretrainInit", "fit_table", "initial_weights", "read_initial_state", "table_layout"]
def will_resume(ckpt_dir: Path, resume: str) -> bool:
    """Whether ``start_engine`` will resume a checkpoint: ``find_resume_dir``'s answer (or its
    error), from a directory listing only (that function may move damaged checkpoints aside)."""
    return resume != "never" and (resume != "auto" or bool(ckpt.complete_tags(ckpt_dir)))


def _record_dir(run_dir: Path, resume: str) -> Path:
    """Where the record of a resumed run's initial weights lies: this run directory, or that of
    the checkpoint ``--resume PATH`` names."""
    if (run_dir / INIT_RECORD).is_file() or resume in ("auto", "never"):
        return run_dir
    other = Path(resume).resolve().parent.parent
    return other if (other / INIT_RECORD).is_file() else run_dir


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().contiguous().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def set_fp32_masters(engine: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` (full tensors, model names) into this rank's slices of ZeRO's fp32 master
    weights. DeepSpeed builds the masters from the module, which bf16 runs cast to bf16 first:
    without this a run would start from bf16-rounded copies of the file's fp32 weights."""
    import torch.distributed as dist

    from ..runtime.sharded_ema import zero_slots

    zero = engine.optimizer
    groups = list(range(len(zero.bit16_groups)))
    rank = dist.get_rank()
    for slot in zero_slots(engine, groups, ""):
        if slot.name not in state:
            continue
        part = zero.single_partition_of_fp32_groups[slot.group]
        size = part.numel()
        lo, hi = rank * size, (rank + 1) * size  # this rank's range of the group's flat buffer
        a, b = slot.offset, slot.offset + math.prod(slot.shape)
        if b <= lo or a >= hi:
            continue
        value = state[slot.name].reshape(-1).to(part.device, part.dtype)
        part[max(a, lo) - lo: min(b, hi) - lo].copy_(value[max(a, lo) - a: min(b, hi) - a])


class PretrainInit:
    """``init.*`` applied to one run: the model's initial weights (before DeepSpeed wraps it),
    then, once the engine and the teacher exist, ZeRO's fp32 masters and the momentum encoder."""

    def __init__(self, state: InitialState | None) -> None:
        self.state = state  # None: a resume, which takes everything from its checkpoint

    def start(self, engine: Any, teacher: Any, resumed: Any) -> None:
        """After ``start_engine`` and ``build_teacher``; does nothing when a checkpoint was resumed."""
        if resumed is not None or self.state is None:
            if resumed is None:
                raise RuntimeError("a checkpoint was expected to be resumed and none was; rerun the command")
            return
        set_fp32_masters(engine, self.state.model)
        if hasattr(teacher, "load_full"):  # the sharded momentum encoder (a frozen teacher has its own file)
            encoder = self.state.teacher or {k[len("encoder."):]: v for k, v in self.state.model.items()
                                             if k.startswith("encoder.") and k != "encoder.pos_embed"}
            teacher.load_full(encoder)


def initial_weights(cfg: BootMAEConfig, model: torch.nn.Module, run_dir: Path, ckpt_dir: Path, resume: str,
                    is_main: bool) -> PretrainInit | None:
    """Load ``cfg.init``'s weights into ``model`` (fresh start) or the run's recorded frozen tables
    (resume); resolve ``cfg.init`` (kind, sha256, tag, loaded) and, on rank 0, record it in
    ``RUN/init.json``, ``RUN/init_frozen.safetensors`` and ``config.yaml``. None: nothing to do
    (a run from a random initialisation), without touching any random stream."""
    if will_resume(ckpt_dir, resume):
        return _resume(cfg, model, run_dir, resume, is_main)
    if cfg.init.source == "random":
        if is_main:
            _set_aside_stale(run_dir)
        return None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_initial_state(cfg.init, cfg, expected)
    result = model.load_state_dict(state.model, strict=False)
    if result.unexpected_keys:  # _fit checked every key against the model: this cannot happen
        raise RuntimeError(f"initial weights not in the model: {result.unexpected_keys[:5]}")
    p = state.provenance
    cfg.init = cfg.init.model_copy(update={
        "source": p["source"], "kind": p["kind"], "sha256": p["sha256"], "loaded": p["loaded"],
        "tag": p.get("tag", cfg.init.tag)})
    if is_main:
        from safetensors.torch import save_file

        frozen = _frozen(model)
        _write_atomic(run_dir / INIT_FROZEN, lambda tmp: save_file(frozen, str(tmp)))
        record = {"provenance": p, "config": cfg.init.model_dump(mode="json")}
        _write_atomic(run_dir / INIT_RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        cfg.save(run_dir / "config.yaml")
        _announce(p, cfg)
    return PretrainInit(state)


def _resume(cfg: BootMAEConfig, model: torch.nn.Module, run_dir: Path, resume: str, is_main: bool) -> PretrainInit | None:
    """A resumed run: the frozen tables it started with, and its recorded ``init``."""
    where = _record_dir(run_dir, resume)
    record_path, frozen_path = where / INIT_RECORD, where / INIT_FROZEN
    if not record_path.is_file():
        if cfg.init.source != "random":
            raise InitError(f"init.source={cfg.init.source!r}: {run_dir} resumes a run that started without "
                            f"init; drop init.source to continue it, or pass a new --output-dir")
        return None
    from safetensors.torch import load_file

    try:
        record = json.loads(record_path.read_text())
        frozen = load_file(str(frozen_path))
    except Exception as err:  # noqa: BLE001 - json / safetensors / OS errors alike
        raise InitError(f"{record_path} / {frozen_path}: unreadable ({type(err).__name__}: {err}); they hold "
                        f"the position tables the run started with: restore them from a backup") from None
    own = _frozen(model)
    bad = sorted(set(own) ^ set(frozen)) + [k for k in own if k in frozen and frozen[k].shape != own[k].shape]
    if bad:
        raise InitError(f"{frozen_path}: does not fit this model ({bad[:5]}); resume with the run's config.yaml")
    model.load_state_dict(frozen, strict=False)
    given = cfg.init.source
    cfg.init = PretrainInitConfig.model_validate(record["config"])
    if is_main:
        if where != run_dir:  # --resume PATH from another run: this one records its origin too
            for src in (record_path, frozen_path):
                _write_atomic(run_dir / src.name, lambda tmp, src=src: tmp.write_bytes(src.read_bytes()))
        cfg.save(run_dir / "config.yaml")
        note = "" if given in ("random", cfg.init.source) else f" (init.source={given!r} of this command is not read)"
        print(f"init: resuming a run that started from {cfg.init.source}{note}", flush=True)
    return PretrainInit(None)


def _set_aside_stale(run_dir: Path) -> None:
    """A fresh start from a random initialisation in a directory whose earlier run started from a
    file (its checkpoints gone): rename that run's record, which would otherwise give the new
    run's exports the old position tables. Renamed, not deleted."""
    for name in (INIT_RECORD, INIT_FROZEN):
        path = run_dir / name
        if path.is_file():
            target = path.with_name(f"{name}.previous")
            os.replace(path, target)
            print(f"init: moved the record of an earlier run aside: {target}", flush=True)


def _announce(p: dict[str, Any], cfg: BootMAEConfig) -> None:
    teacher = f"; momentum encoder from the {p['teacher']}" if p["teacher"] != "none" else ""
    print(f"init: {p['source']} ({p['kind']}, {p['weights']}, sha256 {p['sha256'][:12]}): loaded "
          f"{', '.join(p['loaded'])}{teacher}"
          + (f"; fresh {', '.join(p['fresh'])}" if p["fresh"] else "")
          + (f"; unused {'; '.join(p['unused'])}" if p["unused"] else ""), flush=True)
    for key, how in p["tables"].items():
        if how != "kept":
            print(f"init: {key}: {how}", flush=True)
    if p["kind"] == "mae" and tuple(cfg.data.mean) != IMAGENET_MEAN:
        print(f"warning: MAE's weights were trained on inputs normalised with ImageNet's mean/std; this run "
              f"uses data.mean={list(cfg.data.mean)} (set data.mean=[0.485,0.456,0.406] "
              f"data.std=[0.229,0.224,0.225] to match)", flush=True)
