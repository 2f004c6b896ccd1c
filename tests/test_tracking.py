"""Optional MLflow tracking (issue #24), read back through MLflow's own client: every metrics.csv row at its
round, the scenario as parameters, the summary and the end status; the run directory's own SQLite store by
default, a named store when logging.mlflow_tracking_uri is given; off by default; a field error without the
package. Skipped where the mlflow extra is not installed (TensorBoard's read-back: tests/test_tensorboard.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import DIGITS_FEDAVG_2

from fedsim.cli import main
from fedsim.config import load_scenario
from fedsim.errors import ConfigError



def _read(uri: str, experiment: str = "fedsim"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def test_mlflow_holds_every_metrics_row_params_and_summary(tmp_path):
    pytest.importorskip("mlflow")
    scenario = tmp_path / "s.toml"
    scenario.write_text(DIGITS_FEDAVG_2 + "[logging]\nmlflow = true\n")
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", "seed=3"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    summary = json.loads((out / "summary.json").read_text())
    client, runs = _read(f"sqlite:///{out / 'mlflow.db'}")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "fedavg"
    assert run.data.tags["fedsim.run_dir"] == str(out.resolve()) and run.data.tags["fedsim.seed"] == "3"
    assert run.data.params["data.name"] == "digits" and run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["rounds"] == "2" and "logging.mlflow" not in run.data.params
    for column in ("accuracy", "loss", "bytes_up", "seconds"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
        assert [s for s, _ in history] == list(metrics["round"])
        assert [v for _, v in history] == pytest.approx(list(metrics[column]), rel=1e-9)
    assert run.data.metrics["summary.final_accuracy"] == pytest.approx(summary["final_accuracy"], rel=1e-12)
    assert json.loads((out / "config.json").read_text())["config"]["logging"] == {"mlflow": True}


@pytest.mark.slow  # MLflow builds each new SQLite store through its migrations (~10 s each)
def test_a_new_run_in_the_same_directory_replaces_its_store(tmp_path):
    pytest.importorskip("mlflow")
    scenario = tmp_path / "s.toml"
    scenario.write_text(DIGITS_FEDAVG_2.replace("rounds = 2", "rounds = 1") + "[logging]\nmlflow = true\n")
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    _read(f"sqlite:///{out / 'mlflow.db'}")  # this process holds the first store open, as a notebook would
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", "rounds=2", "--overwrite"]) == 0
    client, runs = _read(f"sqlite:///{out / 'mlflow.db'}")
    assert len(runs) == 1 and sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "accuracy")
                                     ) == [0, 1, 2]


@pytest.mark.slow
def test_a_named_store_collects_runs_and_the_flag_turns_it_on(tmp_path):
    pytest.importorskip("mlflow")
    scenario = tmp_path / "s.toml"
    store = tmp_path / "all.db"
    scenario.write_text(DIGITS_FEDAVG_2.replace("rounds = 2", "rounds = 1") + f"[logging]\n"
                        f"mlflow_tracking_uri = \"sqlite:///{store}\"\nmlflow_experiment = \"paper\"\n")
    assert main(["run", str(scenario), "--out", str(tmp_path / "off"), "--quiet"]) == 0
    assert not store.exists() and not (tmp_path / "off" / "mlflow.db").exists()  # mlflow is off by default
    for name in ("a", "b"):
        assert main(["run", str(scenario), "--out", str(tmp_path / name), "--quiet", "--mlflow"]) == 0
    assert not (tmp_path / "a" / "mlflow.db").exists()
    _, runs = _read(f"sqlite:///{store}", "paper")
    assert sorted(r.data.tags["fedsim.run_dir"] for r in runs) == [str((tmp_path / n).resolve()) for n in "ab"]


def test_missing_package_is_a_field_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    scenario = tmp_path / "s.toml"
    scenario.write_text(DIGITS_FEDAVG_2 + "[logging]\nmlflow = true\n")
    with pytest.raises(ConfigError, match=r"logging\.mlflow: true needs the mlflow package.*fedsim\[mlflow\]"):
        load_scenario(scenario)
    scenario.write_text(DIGITS_FEDAVG_2 + "[logging]\nmlflow_experiment = \" \"\n")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"logging\.mlflow_experiment: an empty name"):
        load_scenario(scenario)
