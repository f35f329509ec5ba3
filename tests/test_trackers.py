"""Experiment trackers for real: rows written through MetricsLogger come back, equal to
metrics.jsonl, through each tracker's own reader (csv, MLflow's client on a local file store,
wandb's reader of its offline files), and a resumed run goes on logging into the same tracker runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bootmae_ds.config import load_config, load_finetune_config
from bootmae_ds.runtime import trackers
from bootmae_ds.runtime.metrics import MetricsLogger

ROWS = [  # what trainers log: train rows every step, an evaluation now and then
    {"epoch": 0, "loss": 1.5, "lr": 0.0, "samples": 16, "samples_per_s": 40.0},
    {"epoch": 0, "loss": 1.25, "lr": 1e-4, "samples": 32, "samples_per_s": 41.5, "knn_top1": 55.5, "knn_top5": 90.0},
    {"epoch": 1, "loss": 1.125, "lr": 2e-4, "samples": 48, "samples_per_s": 39.0},
]


def _log(run_dir: Path, rows: list[dict], first_step: int, trackers_: list[str]) -> None:
    cfg = load_config("demo", ["logging.every_steps=2", f"logging.trackers={json.dumps(trackers_)}",
                               "logging.project=bootmae-test", "run.name=tracked"])
    logger = MetricsLogger(run_dir, cfg, total_steps=first_step + len(rows) - 1, enabled=True)
    for i, row in enumerate(rows):
        logger.log(first_step + i, row)
    logger.close()


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(run_dir: Path) -> list[dict[str, list[dict]]]:
    """The records of every offline wandb run file by type, read by wandb's own reader."""
    out = []
    for run in sorted((run_dir / "wandb").glob("offline-run-*")):
        lines = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run)],
                               capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
        records: dict[str, list[dict]] = {}
        for record in map(json.loads, lines):
            records.setdefault(record["type"], []).append(record[record["type"]])
        out.append(records)
    return out


def test_every_tracker_reads_back_what_metrics_jsonl_holds(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the file store in RUN/mlruns
    names = ["tensorboard", "csv", "mlflow", "wandb"]
    _log(tmp_path, ROWS[:2], 1, names)
    _log(tmp_path, ROWS[2:], 3, names)  # a resume: the same tracker runs go on
    expected = _jsonl(tmp_path)
    assert [r["step"] for r in expected] == [1, 2, 3]

    # csv: one row per step, widened when the k-NN columns appeared (the first row's cells stay empty)
    with (tmp_path / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [1, 2, 3] and table[0]["knn_top1"] == ""
    for got, want in zip(table, expected):
        assert {k: float(v) for k, v in got.items() if v != ""} == {k: float(v) for k, v in want.items()}

    # MLflow: one run in the experiment, every metric's full history, the config as params
    from mlflow.tracking import MlflowClient

    ids = json.loads((tmp_path / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("bootmae-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    run = runs[0]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["model.embed_dim"] == "96" and run.data.params["logging.every_steps"] == "2"
    for key in {k for r in expected for k in r if k != "step"}:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["step"], float(r[key])) for r in expected if key in r], key
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["run"]["name"] == "tracked"

    # wandb: two offline files (start and resume) of one run id, the rows, the config, a clean exit
    records = _wandb_records(tmp_path)
    assert len(records) == 2 and {r["run"][0]["run_id"] for r in records} == {ids["wandb"]}
    history = [row for r in records for row in r["history"]]
    assert [h["item"]["_step"] for h in history] == [1, 2, 3]
    for h, want in zip(history, expected):
        assert {k: v for k, v in h["item"].items() if not k.startswith("_")} == \
            {k: v for k, v in want.items() if k != "step"}
    for r in records:
        run_record = r["run"][0]
        assert run_record["display_name"] == "tracked" and run_record["project"] == "bootmae-test"
        config = {k: v for c in r["config"] for k, v in c["update"].items()}
        assert config["model"]["embed_dim"] == 96 and r["exit"][0].get("exit_code", 0) == 0

    # TensorBoard: train scalars on the console steps (2 and the last), evaluations always
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3]
    assert [(e.step, e.value) for e in events.Scalars("eval/knn_top1")] == [(2, 55.5)]


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch) -> None:
    # as if wandb were not installed: a module name that no environment has
    monkeypatch.setitem(trackers.OPTIONAL, "wandb", ("wandb_is_not_installed_here", "wandb"))
    cfg = load_config("demo", ["logging.trackers=[csv,wandb]"])
    with pytest.raises(trackers.TrackerError) as err:
        MetricsLogger(tmp_path, cfg, total_steps=3, enabled=False)  # every rank checks, not only rank 0
    assert str(err.value).count("\n") == 0 and "pip install -e '.[wandb]'" in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_old_configs_with_logging_tensorboard_still_load(tmp_path) -> None:
    old = tmp_path / "config.yaml"  # a config.yaml written before logging.trackers existed
    data = load_config("demo").model_dump(mode="json")
    data["logging"].pop("trackers")
    data["logging"]["tensorboard"] = False
    old.write_text(yaml.safe_dump(data))
    assert load_config(old).logging.trackers == []
    assert load_finetune_config("demo", ["logging.tensorboard=true", "logging.trackers=[csv]"]).logging.trackers \
        == ["tensorboard", "csv"]
    with pytest.raises(Exception, match="lists a tracker twice"):
        load_config("demo", ["logging.trackers=[csv,csv]"])
