"""Segmentation runs for real: 2 DeepSpeed CPU ranks from the session's demo pre-training run
(evaluations, RUN/best in mmseg's layout, exact resume), the best weights re-scored by one rank
with --eval-only, and bad data stopping the launcher with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from distributed import deepspeed_cmd, run

from bootmae_ds.config import load_segment_config
from bootmae_ds.segment.model import build_segmentor, load_weights

pytestmark = pytest.mark.slow

# The demo preset on the session run's 2-block encoder: 4 steps of 2 x 2 images, evaluations after
# steps 2 and 4 on 16 validation images, a checkpoint every 2 steps.
SEGMENT = ["--config", "demo", "--set", "model.out_indices=[0,0,1,1]", "schedule.iters=4", "schedule.warmup_iters=1",
           "eval.every_steps=2", "checkpoint.every_steps=2", "data.val_limit=16", "data.num_samples=32",
           "data.micro_batch_size=2", "data.global_batch_size=4", "logging.every_steps=1"]


def _segment(out: Path, pretrained: Path, *extra: str) -> list[dict]:
    proc = run(deepspeed_cmd("launchers/segment.py", "--output-dir", str(out), *SEGMENT,
                             f"init.source={pretrained}", *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(demo_pretrain_run, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("seg") / "full"
    return out, _segment(out, demo_pretrain_run)


def test_segment_evaluates_and_keeps_the_best_in_mmseg_layout(full_run, demo_pretrain_run):
    out, rows = full_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    evals = [r for r in rows if "eval_miou" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_images"] == 16 for r in evals)
    assert all(0 <= r[k] <= 100 for r in evals for k in ("eval_miou", "eval_macc", "eval_aacc"))
    assert all({"loss", "loss_decode", "loss_aux", "lr", "grad_norm"} <= set(r) for r in rows)
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["miou"] == max(r["eval_miou"] for r in evals) == rows[-1]["best_miou"]
    assert (out / "eval" / "step_00000004.md").read_text().count("| digit") == 10  # the per-class table
    init = json.loads((out / "init.json").read_text())
    assert init["source"] == "run" and Path(init["run_dir"]) == demo_pretrain_run.resolve()
    cfg = load_segment_config("demo", ["model.out_indices=[0,0,1,1]", "init.config=" + str(demo_pretrain_run / "config.yaml")])
    model, _, _ = build_segmentor(cfg)
    load_weights(model, out / "best" / "model.pth")  # strict: every key of the file, every key of the model
    blob = torch.load(out / "best" / "model.pth", weights_only=True)
    assert set(blob) == {"state_dict", "meta"} and all(k.split(".")[0] in ("backbone", "decode_head", "auxiliary_head")
                                                        for k in blob["state_dict"])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"


# CI: the same JobTrainer.train resume in test_detect (a transfer job keeping its best) and
# test_pretrain; ~39 s on 2 cores.
@pytest.mark.extended
def test_segment_resume_continues_exactly(full_run, demo_pretrain_run, tmp_path):
    _, full = full_run
    out = tmp_path / "resumed"
    first = _segment(out, demo_pretrain_run, "--max-steps", "2")
    assert [r["step"] for r in first] == [1, 2]
    rows = _segment(out, demo_pretrain_run)[len(first):]
    assert [r["step"] for r in rows] == [3, 4]
    for key in ("loss", "loss_decode", "loss_aux", "lr", "grad_norm", "eval_miou", "eval_macc", "eval_aacc"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in full[2:]], key  # bitwise on CPU


def test_one_rank_scores_the_validation_set_like_two(full_run, demo_pretrain_run, tmp_path):
    out, _ = full_run
    best = json.loads((out / "best" / "metrics.json").read_text())  # measured by the 2 training ranks
    proc = run([sys.executable, "launchers/segment.py", "--output-dir", str(tmp_path / "eval"), *SEGMENT,
                f"init.config={demo_pretrain_run / 'config.yaml'}", "--eval-only", "--weights",
                str(out / "best" / "model.pth")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scored = json.loads((tmp_path / "eval" / "eval_only.json").read_text())
    assert scored["world_size"] == 1 and scored["images"] == best["images"] == 16
    assert (scored["eval_miou"], scored["eval_macc"], scored["eval_aacc"]) == (best["miou"], best["macc"], best["aacc"])


def test_an_image_without_its_label_map_stops_the_launcher(tmp_path):
    from test_segment import _ade_folder

    _ade_folder(tmp_path / "ade", {"a": ((20, 30), (20, 30)), "b": ((16, 16), None)})
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    proc = run([sys.executable, "launchers/segment.py", "--output-dir", str(out), *SEGMENT,
                f"data.train={tmp_path / 'ade'}"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "images/training/b.jpg: no label map" in errors[0]
    assert (out / "keep.txt").read_text() == "earlier work" and not (out / "checkpoints").exists()
