"""MLflow tracking of a run (``[logging] mlflow = true``; the ``mlflow`` extra): beside the run files, never
instead of them.

One MLflow run per fedsim run directory: the resolved scenario as parameters (``data.name``, ``strategy.lr``,
...), every metrics.csv row as metrics at step = its round, the numeric summary values (``summary.<key>``) and
the status (FINISHED, KILLED for an interrupted run, FAILED) when the run ends; tags name the run directory,
label, strategy and seed. The store is ``run_dir/mlflow.db`` (SQLite: MLflow's file store is in maintenance
mode and refuses to start) unless ``logging.mlflow_tracking_uri`` names one, e.g. ``sqlite:///runs/mlflow.db``
for every run of a sweep in one store, or an ``http://`` tracking server. MLflow's own telemetry is switched off
(``MLFLOW_DISABLE_TELEMETRY``) unless the user set it: fedsim sends nothing anywhere on its own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

MLFLOW_DB = "mlflow.db"  # the default store, in the run directory
MLFLOW_ARTIFACTS = "mlflow-artifacts"  # the default store's artifact root (nothing is logged there by fedsim)
BATCH = 100  # MLflow's log_batch takes at most 1000 metrics and 100 params per call
PARAM_LENGTH = 500


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = str(value)[:PARAM_LENGTH]
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


class MlflowTracker:
    """Writes one fedsim run into MLflow as it goes (``log_row``), closed by ``finish(summary)``."""

    def __init__(self, run_dir: Path, config: dict, label: str | None = None, seed: int | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) are not fedsim's output
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        settings = config.get("logging") or {}
        run_dir = Path(run_dir).resolve()
        uri = settings.get("mlflow_tracking_uri") or f"sqlite:///{run_dir / MLFLOW_DB}"
        self.uri, self.own_store = uri, not settings.get("mlflow_tracking_uri")
        if self.own_store:  # a new file: connections this process cached to an earlier one must go
            release_store(uri)
        self.client = MlflowClient(tracking_uri=uri)
        name = settings.get("mlflow_experiment") or "fedsim"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = None if settings.get("mlflow_tracking_uri") else (run_dir / MLFLOW_ARTIFACTS).as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        strategy = (config.get("strategy") or {}).get("name")
        tags = {"fedsim.run_dir": str(run_dir), "fedsim.label": str(label or strategy),
                "fedsim.strategy": str(strategy), "fedsim.seed": str(seed if seed is not None else config.get("seed"))}
        self.run_id = self.client.create_run(experiment_id, run_name=str(label or strategy), tags=tags).info.run_id
        params = [Param(k, v) for k, v in _flatten({k: v for k, v in config.items() if k != "logging"}).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])
        self.closed = False

    def log_row(self, row: dict) -> None:
        """One metrics.csv row: its numeric columns at step = its round."""
        from mlflow.entities import Metric

        step = _number(row.get("round"))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(step) if step is not None else 0) for k, value in row.items()
                   if k != "round" and (v := _number(value)) is not None]
        for i in range(0, len(metrics), BATCH * 10):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH * 10])

    def finish(self, summary: dict | None) -> None:
        """The summary's numbers as ``summary.<key>`` and the run's end status (once)."""
        if self.closed:
            return
        self.closed = True
        from mlflow.entities import Metric

        summary = summary or {}
        now = int(time.time() * 1000)
        metrics = [Metric(f"summary.{k}", v, now, 0) for k, value in summary.items()
                   if (v := _number(value)) is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(summary.get("status"), "FAILED")
        try:
            self.client.set_terminated(self.run_id, status=status)
        finally:
            if self.own_store:
                release_store(self.uri)


def release_store(uri: str) -> None:
    """Close this process's cached connections to the SQLite store ``uri``: MLflow keeps one engine per
    database URI and one store per URI for the process's life, and a later run into the same run directory
    replaces the file (an engine on the old, deleted file then fails with "readonly database"). These caches
    are MLflow's internals; where a version lacks them there is nothing to release."""
    import contextlib

    with contextlib.suppress(Exception):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        for key in [k for k in SqlAlchemyStore._engine_map if k == uri]:
            SqlAlchemyStore._engine_map.pop(key).dispose()
    with contextlib.suppress(Exception):
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
