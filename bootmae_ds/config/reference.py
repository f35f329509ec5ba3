"""``docs/configuration.md``: every key of every job's tree, generated from the pydantic trees.

    bootmae-config --reference > docs/configuration.md      # or: python -m bootmae_ds.config --reference

Each key gets its type, its default (read from a default-built tree, so a job's own defaults show,
e.g. segmentation's ``checkpoint.every_steps``), its allowed range (the field's bounds and choices;
rules between fields are checked too but live in the validators) and its description.
``tests/test_docs.py`` fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel

from .base import PRESETS_ROOT, Tree, available_presets
from .detect import DetectConfig
from .finetune import FinetuneConfig
from .linprobe import LinprobeConfig
from .pretrain import BootMAEConfig
from .segment import SegmentConfig

REGENERATE = "bootmae-config --reference > docs/configuration.md"


@dataclass(frozen=True)
class Job:
    name: str          # the preset folder, bootmae_ds/presets/<name>/
    tree: type[Tree]
    flag: str          # bootmae-config's flag for this tree ('' for pre-training)
    launcher: str
    page: str          # the doc page of the job, relative to docs/


JOBS = (
    Job("pretrain", BootMAEConfig, "", "launchers/pretrain.py", "pretraining.md"),
    Job("finetune", FinetuneConfig, "--finetune", "launchers/finetune.py", "evaluation.md#fine-tuning"),
    Job("linprobe", LinprobeConfig, "--linprobe", "launchers/linprobe.py", "evaluation.md#linear-probing"),
    Job("segment", SegmentConfig, "--segment", "launchers/segment.py", "segmentation.md"),
    Job("detect", DetectConfig, "--detect", "launchers/detect.py", "detection.md"),
)


def type_name(ann: Any) -> str:
    """A field's annotation as a reader writes it: ``int``, ``float | null``, ``"a" | "b"``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(ann, "__name__", str(ann))


_BOUNDS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"),
           (at.MinLen, "min_length", "length >="), (at.MaxLen, "max_length", "length <="))


def value_range(field: Any) -> str:
    """The field's bounds, e.g. ``>= 1`` or ``> 0, <= 1``; '' when it has none."""
    out = []
    for meta in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(out)


def show(value: Any) -> str:
    """A default as it would be written in YAML or ``--set``."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str) and value:
        return value
    return json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sub_model(ann: Any) -> tuple[type[BaseModel] | None, str]:
    """A nested section (``model.rpn``) or a list of them (``key[].field``)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, "."
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, "[]."
    return None, ""


def rows(model: type[BaseModel], instance: Any, prefix: str) -> list[tuple[str, ...]]:
    """(key, type, default, range, meaning) of every leaf below ``model``."""
    out: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance, name) if instance is not None else field.get_default(call_default_factory=True)
        sub, sep = _sub_model(field.annotation)
        if sub is not None and sep == ".":
            out += rows(sub, value, key + ".")
            continue
        out.append((key, type_name(field.annotation), show(value), value_range(field), field.description or ""))
        if sub is not None:  # a list of sections: its items' keys, with the item class's defaults
            out += rows(sub, None, key + "[].")
    return out


def job_table(job: Job) -> str:
    tree = job.tree()
    cmd = f"bootmae-config {job.flag} NAME".replace("  ", " ")
    presets = ", ".join(f"`{p}`" for p in available_presets(PRESETS_ROOT / job.name))
    lines = [
        f"## {job.name}", "",
        (f"`{job.tree.__name__}` (`bootmae_ds/config/{job.tree.__module__.rsplit('.', 1)[-1]}.py`), read by "
         f"`{job.launcher}` (see [its page]({job.page})). Presets in `bootmae_ds/presets/{job.name}/`: "
         f"{presets}; `{cmd}` prints one resolved, `{cmd.replace(' NAME', '')} --describe` lists these keys."), "",
        "| key | type | default | range | meaning |", "|---|---|---|---|---|",
    ]
    for section in job.tree.section_names():
        field = job.tree.model_fields[section]
        sub, _ = _sub_model(field.annotation)
        if sub is None:  # a top-level key (linprobe's mode)
            lines += [f"| `{k}` | {_cell(t)} | `{_cell(d)}` | {r} | {_cell(m)} |"
                      for k, t, d, r, m in rows(job.tree, tree, "") if k == section]
            continue
        doc = (sub.__doc__ or field.description or "").strip().split("\n\n")[0]
        lines.append(f"| **{section}** | | | | {_cell(' '.join(doc.split()))} |")
        lines += [f"| `{k}` | {_cell(t)} | `{_cell(d)}` | {r} | {_cell(m)} |"
                  for k, t, d, r, m in rows(sub, getattr(tree, section), f"{section}.")]
    return "\n".join(lines)


def count_keys(job: Job) -> int:
    return len(rows(job.tree, job.tree(), ""))


def reference() -> str:
    """The whole of ``docs/configuration.md``."""
    head = [
        "# Configuration reference", "",
        (f"<!-- Generated by `{REGENERATE}` from the pydantic trees in bootmae_ds/config/; "
         "do not edit by hand: tests/test_docs.py compares this file with the code. -->"), "",
        ("Every job reads one validated tree: a preset name or a YAML file (`--config`), then dotted "
         "overrides (`--set key=value ...`, values parsed as YAML). A YAML file may start with "
         "`base: <preset or path>` and give only what differs. An unknown key or a value outside its "
         "range stops the job before any work, naming the key; rules between keys (for example "
         "`data.global_batch_size` a multiple of `data.micro_batch_size`) are checked the same way. "
         "How to write configs and overrides: [getting started](getting-started.md#configs-and-overrides)."), "",
        ("Defaults are those of the job's tree; a preset changes some of them "
         "(`bootmae-config NAME` prints what a preset resolves to)."), "",
        " | ".join(f"[{j.name}](#{j.name}) ({count_keys(j)} keys)" for j in JOBS), "",
    ]
    return "\n".join(head + [job_table(j) + "\n" for j in JOBS])
