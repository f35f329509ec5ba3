"""The package's folders form layers: every import points to a lower layer, and no module
imports itself back through others (``python tests/layout_check.py`` prints the table)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import layout_check


def test_every_import_points_down_and_nothing_circles() -> None:
    g = layout_check.graph()
    edges = layout_check.folder_edges(g)
    assert layout_check.upward(edges) == []
    assert layout_check.circles(g) == []
    # the layers exist and are used: jobs sit on runtime, models and data, which sit on config
    assert {("pretrain", "runtime"), ("finetune", "runtime"), ("runtime", "config"),
            ("models", "config"), ("data", "config")} <= set(edges)
    top = [m for m in g if layout_check.folder(m) == "<top>"]
    assert top == ["bootmae_ds"], f"modules outside the layered folders: {top}"


def test_the_checker_sees_upward_arrows_and_circles() -> None:
    edges = {("runtime", "pretrain"): ["bootmae_ds.runtime.run -> bootmae_ds.pretrain.losses"],
             ("data", "models"): ["bootmae_ds.data.x -> bootmae_ds.models.y"],
             ("pretrain", "runtime"): ["bootmae_ds.pretrain.trainer -> bootmae_ds.runtime.run"]}
    assert [line.split(":")[0] for line in layout_check.upward(edges)] == ["data -> models", "runtime -> pretrain"]
    loop = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert layout_check.circles(loop) == [["a", "b", "c"]]


def test_script_prints_the_table() -> None:
    script = Path(layout_check.__file__)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pretrain -> runtime" in out.stdout and "ok: every arrow points down" in out.stdout
