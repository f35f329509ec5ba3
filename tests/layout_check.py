"""The package's import layers: which folder imports which, and whether any arrow points up.

    python tests/layout_check.py          # prints folder -> folder imports, upward arrows, circles

Every import of the package is read with ``ast`` (top-level, inside functions and under
``TYPE_CHECKING`` alike: a lazy import is still a dependency). Folders sit on layers; an import
may only point to a lower layer. Module-level circles are looked for over the whole package.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "bootmae_ds"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lower numbers sit lower. Jobs (pretrain, finetune, linprobe, segment) may use everything beneath them;
# nothing beneath a job knows about it. The launchers/ scripts sit above all of them.
LAYERS: dict[str, int] = {
    "config": 0,
    "models": 1, "data": 1, "runtime": 1,
    "interop": 2,
    "evaluation": 3,
    "pretrain": 4, "finetune": 4, "linprobe": 4, "segment": 4, "detect": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a ``from pkg import mod`` counts as ``pkg.mod``)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, path.name == "__init__.py", node)
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a function path: its module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                out.add(target)
    return out


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else "<top>"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def folder_edges(g: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, targets in g.items():
        for dst in targets:
            a, b = folder(src), folder(dst)
            if a != b:
                edges[(a, b)].append(f"{src} -> {dst}")
    return edges


def upward(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """Arrows that do not point to a strictly lower layer (or touch a folder with no layer)."""
    bad = []
    for (a, b), why in sorted(edges.items()):
        if a not in LAYERS or b not in LAYERS or LAYERS[b] >= LAYERS[a]:
            bad.append(f"{a} -> {b}: {why[0]}" + (f" (+{len(why) - 1})" if len(why) > 1 else ""))
    return bad


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected module groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    g = graph()
    edges = folder_edges(g)
    for (a, b), why in sorted(edges.items(), key=lambda kv: (LAYERS.get(kv[0][0], 9), kv[0])):
        print(f"{a:>10} -> {b:<10} {len(why):3d} import(s)")
    bad, loops = upward(edges), circles(g)
    for line in bad:
        print(f"UPWARD  {line}")
    for group in loops:
        print(f"CIRCLE  {' <-> '.join(group)}")
    print("ok: every arrow points down, no circle" if not (bad or loops) else "layout broken")
    return 1 if bad or loops else 0


if __name__ == "__main__":
    raise SystemExit(main())
