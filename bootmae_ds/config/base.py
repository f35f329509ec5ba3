"""What every configuration tree shares: sections, YAML with ``base:`` inheritance, dotted
overrides, one-line errors, and the field listing of ``bootmae-config --describe``.

A tree is loaded from a preset name (a YAML file in the tree's preset folder,
``bootmae_ds/presets/<job>/``) or a YAML path, then ``dotted.key=value`` overrides are applied
with YAML-parsed values. Anything invalid raises ``ConfigError`` naming the field, the value and
the rule before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PRESETS_ROOT = Path(__file__).resolve().parent.parent / "presets"


class InputError(Exception):
    """Bad input from the user (a config, a path, a checkpoint, a shard): launchers print the
    message, which names the field or file and what to do, and exit with status 2."""


class ConfigError(InputError, ValueError):
    """A configuration that cannot run; the message names the field, the value and the rule."""


class Section(BaseModel):
    """One section of a tree: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Tree(Section):
    """A whole configuration tree: printed and saved as YAML with every run."""

    # Printed order: the job's mode and starting weights, its own sections, then the sections every
    # job shares, as before these were declared once in base classes (pydantic lists a base class's
    # fields first).
    SHARED_FIRST: ClassVar[tuple[str, ...]] = ("mode", "init")
    SHARED_LAST: ClassVar[tuple[str, ...]] = ("eval", "checkpoint", "logging", "run", "debug")

    @classmethod
    def section_names(cls) -> list[str]:
        """The tree's sections in printed order."""
        names = list(cls.model_fields)
        first = [n for n in cls.SHARED_FIRST if n in names]
        last = [n for n in cls.SHARED_LAST if n in names]
        return first + [n for n in names if n not in first + last] + last

    def to_yaml(self) -> str:
        dump = self.model_dump(mode="json")
        return yaml.safe_dump({k: dump[k] for k in self.section_names()}, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def fail(field: str, value: Any, rule: str) -> None:
    """Raise the validation error of one field (pydantic turns it into a ``ConfigError`` line)."""
    raise ValueError(f"{field}={value!r}: {rule}")


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (a dumped config) as ``{"section.key": value}``, the keys overrides use."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def available_presets(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def read_yaml(source: str | Path, preset_dir: Path) -> dict[str, Any]:
    """A preset name of ``preset_dir`` or a YAML path, with its ``base:`` chain merged in."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = preset_dir / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(
                f"config {str(source)!r}: no such preset or file; presets are "
                f"{', '.join(available_presets(preset_dir))}, or pass a path to a .yaml file"
            )
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    base = data.pop("base", None)  # a preset name, or a YAML path relative to this file
    if base is None:
        return data
    sibling = path.parent / str(base)
    merged = read_yaml(sibling if sibling.is_file() else str(base), preset_dir)
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override in place (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected dotted.key=value, e.g. optim.base_lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {err}") from None
    node = data
    parts = key.strip().split(".")
    if parts == ["model", "size"] and isinstance(data.get("model"), dict):
        for dim in ("embed_dim", "depth", "num_heads"):  # a size given now replaces the file's dims
            data["model"].pop(dim, None)
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" or not field:
            lines.append(f"  - {msg}")
        elif field == "data.train" and isinstance(e.get("input"), list):  # a pre-training mixture
            lines.append("  - data.train: this job takes one source (a string); weighted lists of "
                         "sources are for pre-training only")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  - {field}: unknown field (check the spelling; see `bootmae-config "
                         f"--describe`)")
        else:
            lines.append(f"  - {field}={e.get('input')!r}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


T = TypeVar("T", bound=BaseModel)


def build_tree(data: dict[str, Any], root: type[T]) -> T:
    """Validate a plain dict into ``root`` or raise ``ConfigError``."""
    try:
        return root.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_tree(source: str | Path, overrides: list[str] | None, root: type[T], preset_dir: Path) -> T:
    """Load a preset name or YAML path into the tree ``root``, apply dotted overrides, validate."""
    data = read_yaml(source, preset_dir)
    for override in overrides or []:
        apply_override(data, override)
    return build_tree(data, root)


def describe(root: type[Tree]) -> str:
    """Every field with its default (the job's, from a default-built tree) and description, for
    `bootmae-config --describe`; `bootmae-config --reference` writes the same as Markdown."""
    out: list[str] = []

    def walk(model: type[BaseModel], value: Any, names: list[str], prefix: str) -> None:
        for name in names:
            field, sub = model.model_fields[name], getattr(value, name)
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.append(f"{prefix}{name}: {field.description}")
                walk(ann, sub, list(ann.model_fields), f"{prefix}{name}.")
            else:
                out.append(f"  {prefix}{name} = {sub!r}  # {field.description}")

    walk(root, root(), root.section_names(), "")
    return "\n".join(out)
