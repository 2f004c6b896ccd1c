"""Optional TensorBoard logging (issue #12): every metrics.csv row as scalars in run_dir/tensorboard/, off by
default, read back from the event file."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import DIGITS_FEDAVG_2

from fedsim.cli import main
from fedsim.config import load_scenario



def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_every_metrics_row(tmp_path):
    pytest.importorskip("tensorboard")
    scenario = tmp_path / "s.toml"
    scenario.write_text(DIGITS_FEDAVG_2 + "[logging]\ntensorboard = true\n")
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    scalars = _scalars(out)
    for column in ("accuracy", "loss", "bytes_up"):
        assert [s for s, _ in scalars[column]] == list(metrics["round"])
        assert [v for _, v in scalars[column]] == pytest.approx(list(metrics[column]), rel=1e-6)
    assert json.loads((out / "config.json").read_text())["config"]["logging"] == {"tensorboard": True}
    # run again in the same directory: one event file, the new run's
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", "rounds=1", "--overwrite"]) == 0
    assert [s for s, _ in _scalars(out)["accuracy"]] == list(pd.read_csv(out / "metrics.csv")["round"]) == [0, 1]


def test_cli_flag_and_off_by_default(tmp_path):
    pytest.importorskip("tensorboard")
    scenario = tmp_path / "s.toml"
    scenario.write_text(DIGITS_FEDAVG_2)
    config = load_scenario(scenario)
    assert config.logging.tensorboard is False and "logging" not in config.to_dict()  # config.json unchanged
    assert main(["run", str(scenario), "--out", str(tmp_path / "off"), "--quiet", "--set", "rounds=1"]) == 0
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert main(["run", str(scenario), "--out", str(tmp_path / "on"), "--quiet", "--set", "rounds=1",
                 "--tensorboard"]) == 0
    assert [s for s, _ in _scalars(tmp_path / "on")["accuracy"]] == [0, 1]
    # the same directory without the flag (the same configuration: tracking changes no result): the event files
    # go, no foreign-file refusal
    assert main(["run", str(scenario), "--out", str(tmp_path / "on"), "--quiet", "--set", "rounds=1"]) == 0
    assert not (tmp_path / "on" / "tensorboard").exists()


def test_missing_package_is_a_field_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    scenario = tmp_path / "s.toml"
    scenario.write_text(DIGITS_FEDAVG_2 + "[logging]\ntensorboard = true\n")
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"logging\.tensorboard: true needs the tensorboard package"):
        load_scenario(scenario)
