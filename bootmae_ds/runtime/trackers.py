"""Experiment trackers that rank 0 feeds beside ``metrics.jsonl`` (``logging.trackers``).

- ``tensorboard``: ``RUN/tensorboard`` events; train scalars every ``logging.every_steps`` steps
  (``train/``), evaluations always (``eval/``), reconstruction previews.
- ``wandb``: one Weights & Biases run per run directory (its id is kept in ``RUN/trackers.json``,
  so a resumed run goes on logging into it); files under ``RUN/wandb``. ``WANDB_MODE``,
  ``WANDB_ENTITY``, ``WANDB_API_KEY`` work as usual (``WANDB_MODE=offline`` needs no account).
- ``mlflow``: one MLflow run per run directory (id in ``RUN/trackers.json``) in the experiment
  ``logging.project`` of ``MLFLOW_TRACKING_URI``, or of a file store in ``RUN/mlruns`` when that
  is unset. The config goes in as params (dotted keys) and as the artifact ``config.yaml``.
- ``csv``: ``RUN/metrics.csv``, one row per step, a column per scalar (rewritten with a wider
  header when a new scalar appears, e.g. the first evaluation).

wandb, MLflow and csv get every row of ``metrics.jsonl`` under the same names; wandb and MLflow
also get the run name and the config. wandb and mlflow are optional packages (extras ``wandb`` and
``mlflow``); listing one that is not installed stops the run at start with a one-line error. A
tracker that fails while training is switched off with a warning: ``metrics.jsonl`` has it all.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from ..config import InputError
from ..config.base import dotted

EVAL_PREFIXES = ("knn_", "eval_")
IDS_FILE = "trackers.json"
# tracker -> (module it imports, the pip extra that installs it)
OPTIONAL = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


class TrackerError(InputError):
    """A tracker that cannot start: a missing package or an unreachable service."""


def check_available(trackers: list[str]) -> None:
    """Raise ``TrackerError`` naming the extra to install for any listed tracker not installed.
    Cheap (no import), so every rank calls it and all of them stop together."""
    for name in trackers:
        module, extra = OPTIONAL.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise TrackerError(f"logging.trackers lists {name!r} but the {module} package is not installed: "
                               f"pip install -e '.[{extra}]' (or drop {name} from logging.trackers)")


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of a metrics row (what every tracker logs)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunIds:
    """``RUN/trackers.json``: the tracker-side run ids, so a resume logs into the same runs."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / IDS_FILE
        try:
            self.ids: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.ids = {}  # unreadable: start new tracker runs rather than stop training

    def get(self, name: str) -> str | None:
        return self.ids.get(name)

    def set(self, name: str, run_id: str) -> None:
        self.ids[name] = run_id
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.ids, indent=1) + "\n")
        os.replace(tmp, self.path)


class Tracker:
    """One destination of the metrics; ``periodic`` marks the steps of the console line."""

    name = ""

    def log(self, step: int, row: dict[str, float], periodic: bool) -> None:
        raise NotImplementedError

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        return None

    def close(self) -> None:
        return None


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, row: dict[str, float], periodic: bool) -> None:
        for key, value in row.items():  # evaluations are rare: always on TensorBoard
            if key.startswith(EVAL_PREFIXES):
                self.writer.add_scalar(f"eval/{key}", value, step)
        if periodic:
            for key, value in row.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, name: str, project: str, config: dict[str, Any], ids: RunIds) -> None:
        import wandb

        self.wandb = wandb
        run_id = ids.get("wandb") or secrets.token_hex(4)  # wandb ids: [a-z0-9]
        # console="off": our own stdout stays untouched (every rank prints; rank 0 alone has wandb)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              settings=wandb.Settings(console="off"))
        self.run.config.update(config, allow_val_change=True)  # a resume may change e.g. logging knobs
        ids.set("wandb", run_id)

    def log(self, step: int, row: dict[str, float], periodic: bool) -> None:
        self.run.log(row, step=step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(grid.float().cpu())}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, name: str, project: str, config: dict[str, Any], ids: RunIds,
                 config_yaml: str) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses a file store unless asked for one; it is the zero-setup default here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        run_id = ids.get("mlflow")
        existing = None
        if run_id:
            try:
                existing = self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                existing = None  # another store, or deleted: start a new run
        if existing is None:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            # params are immutable in MLflow: logged once, when the run is created
            params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                      for k, v in dotted(config).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(run_id, params=params[i: i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.client.log_text(run_id, config_yaml, "config.yaml")
        self.run_id = run_id
        self.pending: list[Any] = []  # asynchronous logging operations not yet waited for
        ids.set("mlflow", run_id)

    def log(self, step: int, row: dict[str, float], periodic: bool) -> None:
        ms = int(time.time() * 1000)
        metrics = [self.Metric(k, v, ms, step) for k, v in row.items()]
        # asynchronous: a remote tracking server must not hold up rank 0 (and with it every rank);
        # waiting for all but the newest few bounds the queue when the server is slower than training
        self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
        if len(self.pending) > 64:
            for operation in self.pending[:-8]:
                operation.wait()
            self.pending = self.pending[-8:]

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if hasattr(self.client, "log_image"):
            self.client.log_image(self.run_id, grid.float().cpu().permute(1, 2, 0).clamp(0, 1).numpy(),
                                  key=tag, step=step)

    def close(self) -> None:
        for operation in self.pending:  # (mlflow.flush_async_logging would use the global store)
            operation.wait()
        self.pending = []
        self.client.set_terminated(self.run_id)


class CsvTracker(Tracker):
    name = "csv"

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns: list[str] = []
        if self.path.is_file():  # a resumed run appends under the header it has
            with self.path.open(newline="") as f:
                self.columns = next(csv.reader(f), [])

    def log(self, step: int, row: dict[str, float], periodic: bool) -> None:
        new = [k for k in row if k not in self.columns]
        if not self.columns or new:
            self._widen(["step", *[c for c in self.columns if c != "step"], *new])
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({"step": step, **row})

    def _widen(self, columns: list[str]) -> None:
        """Rewrite the file under a header with ``columns`` (old rows get empty new cells)."""
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.columns = columns


def open_trackers(run_dir: Path, cfg: Any) -> list[Tracker]:
    """Start the trackers of ``cfg.logging.trackers`` for a run in ``run_dir`` (rank 0)."""
    check_available(cfg.logging.trackers)
    ids = RunIds(run_dir)
    config = cfg.model_dump(mode="json")
    out: list[Tracker] = []
    for name in cfg.logging.trackers:
        try:
            if name == "tensorboard":
                out.append(TensorBoardTracker(run_dir))
            elif name == "wandb":
                out.append(WandbTracker(run_dir, cfg.run.name, cfg.logging.project, config, ids))
            elif name == "mlflow":
                out.append(MlflowTracker(run_dir, cfg.run.name, cfg.logging.project, config, ids, cfg.to_yaml()))
            elif name == "csv":
                out.append(CsvTracker(run_dir))
        except Exception as err:  # noqa: BLE001 - a service that is down, a bad URI, a bad key
            for tracker in out:
                tracker.close()
            raise TrackerError(f"logging.trackers: {name} could not start ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:300]}); fix its settings or drop it") from None
    return out
