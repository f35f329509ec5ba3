"""The documentation stays true of the code: links and anchors resolve, named presets, files and
``--set`` keys exist (``tests/docs_check.py``), the configuration reference is what the trees
generate, every field says what it means, and every launcher's ``--help`` names its page."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shutil
from pathlib import Path

import docs_check
import pytest
from pydantic import BaseModel

from bootmae_ds.config.reference import JOBS, REGENERATE, reference

ROOT = docs_check.ROOT


def test_links_presets_paths_and_set_keys_of_the_docs_hold() -> None:
    problems = docs_check.check()
    assert problems == [], "\n".join(problems)


def test_configuration_reference_is_what_the_code_generates() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference(), f"docs/configuration.md is out of date: run `{REGENERATE}`"


def test_every_config_field_has_a_description() -> None:
    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, f"{prefix}{name}.")

    for job in JOBS:
        walk(job.tree, f"{job.name}: ")
    assert missing == [], "add Field(description=...) to: " + ", ".join(missing)


def test_the_reference_lists_each_jobs_own_defaults() -> None:
    ref = reference()
    segment = ref[ref.index("## segment"):ref.index("## detect")]
    assert "| `checkpoint.every_steps` | int | `16000` | >= 1 |" in segment  # the tree's, not the section's 1000
    assert "| `run.name` | str \\| null | `segment` |" in segment  # null in a file = the job's name
    assert '| `run.precision` | "auto" \\| "bf16" \\| "fp32" | `auto` |' in segment


def _copy_docs(tmp_path: Path) -> Path:
    """README.md and docs/ copied, the code folders they name linked."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    for name in ("launchers", "data_prep", "bench", "tests", "bootmae_ds", "ds_configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_checker_reports_what_breaks(tmp_path) -> None:
    root = _copy_docs(tmp_path)
    assert docs_check.check(root) == []
    _edit(root / "README.md", "](docs/data.md)", "](docs/dta.md)")
    _edit(root / "docs" / "getting-started.md", "](configuration.md)", "](configuration.md#no-such-heading)")
    _edit(root / "docs" / "pretraining.md", "--config vit_large_800ep --output-dir runs/l800",
          "--config vit_large_800 --output-dir runs/l800")
    _edit(root / "docs" / "pretraining.md", "model.size=huge", "model.sise=huge")
    _edit(root / "docs" / "data.md", "data_prep/verify_shards.py /data", "data_prep/verify.py /data")
    problems = "\n".join(docs_check.check(root))
    assert "README.md: link 'docs/dta.md': docs/dta.md does not exist" in problems
    assert "no heading with anchor #no-such-heading in docs/configuration.md" in problems
    assert "no pretrain preset 'vit_large_800'" in problems
    assert "not keys of the pretrain tree: model.sise=huge" in problems
    assert "docs/data.md: data_prep/verify.py does not exist" in problems
    assert len(docs_check.check(root)) == 5


def test_github_anchor_slugs() -> None:
    assert docs_check.slug("Does the demo learn? (measured 2026-11-24 to 26, 2 CPU cores)") == \
        "does-the-demo-learn-measured-2026-11-24-to-26-2-cpu-cores"
    assert docs_check.slug("Export: timm and the `official` layout") == "export-timm-and-the-official-layout"
    assert docs_check.slug("k-NN") == "k-nn"


SCRIPTS = sorted([*ROOT.glob("launchers/*.py"), *(p for p in ROOT.glob("data_prep/*.py") if p.stem != "_path")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help_names_an_existing_doc_page(script: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(script.parent))  # data_prep's scripts import their _path helper
    spec = importlib.util.spec_from_file_location(f"_help_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    pages = re.findall(r"docs/[\w.-]+\.md(?:#[\w-]+)?", " ".join(out.getvalue().split()))
    assert pages, f"{script.name} --help names no doc page"
    for page in pages:
        path, _, anchor = page.partition("#")
        assert (ROOT / path).is_file(), page
        assert not anchor or anchor in docs_check.anchors(ROOT / path), page


def test_detection_memory_table_is_what_its_command_prints(capsys) -> None:
    """docs/detection.md's attention-memory table, re-derived by its command
    (`python -m bootmae_ds.detect.memory`: arithmetic, no model is built)."""
    from bootmae_ds.detect import memory

    memory.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ViT")]
    page = (ROOT / "docs" / "detection.md").read_text()
    assert len(rows) == 4 and all(row in page for row in rows), "\n".join(rows)


def test_readme_test_command_is_what_ci_runs() -> None:
    """CI (.ci/run) runs the README's test command; the two must not drift apart."""
    readme = (ROOT / "README.md").read_text()
    command = readme.split("Tests:", 1)[1].split("```")[1].strip()
    assert command == "pip install -e '.[test]' && python -m pytest -q"
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == command
