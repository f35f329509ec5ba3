"""What the documentation claims that the code can check: links and anchors resolve, named presets
exist, named files exist, every documented ``--set key=value`` is a key of its job's tree.

    python tests/docs_check.py            # prints each problem, exits 1 if there is one

Read by ``tests/test_docs.py``, which also runs it on a damaged copy to show it can fail.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bootmae_ds.config import (
    ConfigError,
    load_config,
    load_detect_config,
    load_finetune_config,
    load_linprobe_config,
    load_segment_config,
)
from bootmae_ds.config.base import PRESETS_ROOT, available_presets
from bootmae_ds.config.reference import JOBS

ROOT = Path(__file__).resolve().parent.parent
LOADERS: dict[str, Callable[..., Any]] = {
    "pretrain": load_config, "finetune": load_finetune_config, "linprobe": load_linprobe_config,
    "segment": load_segment_config, "detect": load_detect_config}
TREES = {job.name: job.tree for job in JOBS}
# The job whose config a command reads: from its launcher, else its bootmae-config flag.
LAUNCHER_JOB = {"pretrain": "pretrain", "demo": "pretrain", "knn": "pretrain", "finetune": "finetune",
                "linprobe": "linprobe", "segment": "segment", "detect": "detect"}
CONFIG_FLAG_JOB = {"--finetune": "finetune", "--linprobe": "linprobe", "--segment": "segment",
                   "--detect": "detect"}
# A command without a launcher (a prose snippet such as `--set model.size=large`) belongs to its page's job.
PAGE_JOB = {"pretraining.md": "pretrain", "continued-pretraining.md": "pretrain", "data.md": "pretrain",
            "segmentation.md": "segment", "detection.md": "detect"}
NAMED_PATH = re.compile(r"(?<![\w/.-])((?:launchers|data_prep|bench|tests|bootmae_ds|ds_configs)/[\w/.-]*\w\.(?:py|sh|sbatch|md|json))")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code, HTML comments and inline code (where links are not links)."""
    text = COMMENT.sub("", FENCE.sub("", text))
    return re.sub(r"`[^`]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text stays
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in COMMENT.sub("", FENCE.sub("", path.read_text())).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def bad_links(root: Path) -> list[str]:
    problems = []
    for doc in doc_files(root):
        for target in LINK.findall(prose(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(root)}: link {target!r}"
            if not dest.exists():
                problems.append(f"{where}: {path_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def commands(text: str) -> Iterator[tuple[str, bool]]:
    """Shell commands of a page, each with whether its config must load: each line of a fenced block
    (continuations joined, comments cut; a ```console block shows a command that fails on purpose,
    so only its keys are checked) and each inline code span that runs a launcher, bootmae-config or
    holds --set."""
    for block in FENCE.findall(text):
        must_load = not block.startswith("```console")
        body = block.split("\n", 1)[1].rsplit("```", 1)[0] if block.startswith("```") else block
        if block.startswith(("```python", "```yaml")):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
            yield from ((part.strip(), must_load) for part in line.split("&&") if part.strip())
    for span in re.findall(r"`([^`]+)`", COMMENT.sub("", FENCE.sub("", text))):
        span = " ".join(span.split())
        if "--set" in span or "bootmae-config" in span or re.search(r"--config\s", span):
            yield span, True


def command_job(tokens: list[str], page: str) -> str | None:
    for tok in tokens:
        m = re.match(r"launchers/(?:slurm/)?(\w+)\.(?:py|sh|sbatch)$", tok)
        if m:
            return LAUNCHER_JOB.get(m.group(1))
    if "bootmae-config" in tokens or "bootmae_ds.config" in tokens:
        return next((CONFIG_FLAG_JOB[t] for t in tokens if t in CONFIG_FLAG_JOB), "pretrain")
    return PAGE_JOB.get(page)


def is_key(tree: type[BaseModel], key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return True


def bad_commands(root: Path) -> list[str]:
    problems = []
    for doc in doc_files(root):
        for cmd, must_load in commands(doc.read_text()):
            try:
                tokens = shlex.split(cmd)
            except ValueError:
                continue  # a prose fragment, not a shell command
            job = command_job(tokens, doc.name)
            where = f"{doc.relative_to(root)}: `{cmd}`"
            preset, sets = None, []
            for i, tok in enumerate(tokens):
                following = tokens[i + 1] if i + 1 < len(tokens) else "-"
                if tok == "--config" or (tok in ("bootmae-config", "bootmae_ds.config", *CONFIG_FLAG_JOB)
                                         and not following.startswith("-")):
                    preset = following
                elif tok == "--set":
                    for arg in tokens[i + 1:]:
                        if arg.startswith("-") or "=" not in arg:
                            break
                        sets.append(arg)
            # placeholders of the prose: `bootmae-config NAME`, `--set key=value`, `data.val=...`
            if preset is not None and re.fullmatch(r"[A-Z_]+|PATH|NAME\|PATH", preset):
                preset = None
            sets = [s for s in sets if not s.startswith("key=")]
            if job is None:
                if sets:
                    problems.append(f"{where}: --set with no launcher or page to tell its job")
                continue
            if preset is not None and preset.isidentifier() and preset not in available_presets(PRESETS_ROOT / job):
                problems.append(f"{where}: no {job} preset {preset!r} "
                                f"(there are {', '.join(available_presets(PRESETS_ROOT / job))})")
                continue
            unknown = [s for s in sets if not is_key(TREES[job], s.partition("=")[0])]
            if unknown:
                problems.append(f"{where}: not keys of the {job} tree: {', '.join(unknown)}")
            elif must_load and (sets or preset is not None):
                try:
                    LOADERS[job](*([preset] if preset and preset.isidentifier() else []),
                                 overrides=[s for s in sets if not s.endswith("=...")])
                except ConfigError as err:
                    problems.append(f"{where}: the {job} config does not load: {err}")
    return problems


def bad_paths(root: Path) -> list[str]:
    problems = []
    for doc in doc_files(root):
        for name in sorted(set(NAMED_PATH.findall(doc.read_text()))):
            if not (root / name).exists():
                problems.append(f"{doc.relative_to(root)}: {name} does not exist")
    return problems


def check(root: Path = ROOT) -> list[str]:
    return bad_links(root) + bad_commands(root) + bad_paths(root)


if __name__ == "__main__":
    found = check()
    print("\n".join(found) or "docs ok")
    raise SystemExit(1 if found else 0)
