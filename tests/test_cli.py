"""The command line as a user runs it: run, validate, list, report; errors exit 2 naming the field."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.results.rundir import REQUIRED_SUMMARY_KEYS

SCENARIO = """
seed = 0
rounds = 2
[data]
name = "digits"
[partition]
kind = "iid"
num_clients = 3
[model]
name = "cnn"
width = 16
[client]
epochs = 2
lr = 0.05
[simulation]
backend = "inline"
[strategy]
name = "fedavg"

[[variants]]
label = "avg"

[[variants]]
label = "prox"
set = { "strategy.name" = "fedprox", "strategy.proximal_mu" = 0.1 }
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    scenario = root / "s.toml"
    scenario.write_text(SCENARIO)
    assert main(["run", str(scenario), "--out", str(root / "runs"), "--quiet", "--set", "rounds=1"]) == 0
    return root / "runs"


def test_run_writes_the_four_files_with_documented_keys(run_dir):
    for label in ("avg", "prox"):
        d = run_dir / label
        config = json.loads((d / "config.json").read_text())
        assert config["config"]["seed"] == 0 and config["config"]["rounds"] == 1  # --set applied
        assert config["versions"]["flwr"].startswith("1.42")
        assert set(pd.read_csv(d / "partition.csv").columns) >= {"client", "size", "class_0"}
        metrics = pd.read_csv(d / "metrics.csv")
        assert {"round", "accuracy", "loss", "bytes_up", "bytes_down", "seconds"} <= set(metrics.columns)
        summary = json.loads((d / "summary.json").read_text())
        assert all(summary.get(k) is not None for k in REQUIRED_SUMMARY_KEYS)
        assert summary["label"] == label and (d / "model.pt").exists()
    assert json.loads((run_dir / "prox" / "summary.json").read_text())["strategy"] == "fedprox"


def test_report_renders_table_and_plots(run_dir, capsys):
    assert main(["report", str(run_dir / "avg"), str(run_dir / "prox"), "--out", str(run_dir / "rep")]) == 0
    out = capsys.readouterr().out
    assert "avg" in out and "prox" in out
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        png = run_dir / "rep" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = pd.read_csv(run_dir / "rep" / "report.csv")
    assert list(table["run"]) == ["avg", "prox"]


def test_resume_skips_the_variants_already_completed_with_the_same_config(tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "runs"
    assert main(["run", str(scenario), "--out", str(out), "--only", "avg", "--set", "rounds=1", "--quiet"]) == 0
    first = (out / "avg" / "summary.json").read_text()
    (out / "prox").mkdir()  # an interrupted variant: a directory without a completed summary
    assert main(["run", str(scenario), "--out", str(out), "--set", "rounds=1", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "avg: completed earlier" in err and "prox: fedprox" in err
    assert (out / "avg" / "summary.json").read_text() == first  # untouched
    assert json.loads((out / "prox" / "summary.json").read_text())["status"] == "completed"
    # a completed run of another configuration is never overwritten by --resume
    assert main(["run", str(scenario), "--out", str(out), "--set", "rounds=2", "--resume", "--quiet"]) == 2
    assert "different configuration (variant 'avg')" in capsys.readouterr().err
    assert (out / "avg" / "summary.json").read_text() == first


def test_bad_scenario_exits_2_naming_the_field(tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    assert main(["run", str(scenario), "--set", "partition.alpha=-1", "--quiet"]) == 2
    assert "partition.alpha: -1" in capsys.readouterr().err
    assert main(["validate", str(scenario)]) == 0


def test_report_on_a_folder_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_console_script_lists_everything():
    out = subprocess.run([sys.executable, "-m", "fedsim.cli", "list"], capture_output=True, text=True, check=True)
    for name in ("fashion-mnist", "dirichlet", "class-incremental", "resnet18", "fedavg", "centralized"):
        assert name in out.stdout
