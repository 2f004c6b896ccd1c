"""Run files for a paper (issue #24): metrics.csv's per-row seconds beside the cumulative elapsed_seconds and
summary.json's setup_seconds; model_state.pt, a plain state_dict (weights_only=True) rebuilt into the scenario's
network from config.json alone; round lines on Flower's logger under the Flower app (flwr run --stream)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DIGITS_FEDAVG_2, inline_digits_scenario

from fedsim.config import load_scenario
from fedsim.engine.progress import to_flower_log
from fedsim.engine.runner import run_scenario
from fedsim.errors import FedsimError
from fedsim.results.rundir import load_model
from fedsim.scenario import test_split



@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    """One FedAvg run (digits, 2 clients, 2 rounds, inline) with the round lines sent to Flower's logger while
    fedsim keeps "flwr" at ERROR, as run_scenario does."""
    tmp = tmp_path_factory.mktemp("fedavg")
    (tmp / "s.toml").write_text(DIGITS_FEDAVG_2)
    config = load_scenario(tmp / "s.toml")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.INFO)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        with to_flower_log():
            summary = run_scenario(config, tmp / "run", label="fedavg", show_progress=False)
    finally:
        flwr_logger.removeHandler(handler)
    return config, tmp / "run", summary, records


def test_seconds_per_row_elapsed_and_setup_apart(fedavg_run):
    _, run_dir, summary, _ = fedavg_run
    m = pd.read_csv(run_dir / "metrics.csv")
    assert list(m["round"]) == [0, 1, 2]
    assert (m["seconds"] > 0).all()
    # elapsed is the running sum of the per-row seconds (each rounded to 1e-4 s)
    assert np.allclose(m["seconds"].cumsum(), m["elapsed_seconds"], atol=5e-4)
    assert summary["setup_seconds"] >= 0
    assert m["elapsed_seconds"].iloc[-1] <= summary["wall_seconds"]


def test_model_state_loads_with_weights_only_and_rebuilds_the_network(fedavg_run):
    config, run_dir, summary, _ = fedavg_run
    saved = json.loads((run_dir / "config.json").read_text())["saved_model"]
    assert saved == {"pickled": "model.pt", "state_dict": "model_state.pt", "module": "fedsim.nn.models.BlockNet",
                     "model": "cnn", "width": 8, "params": {}, "num_classes": 10, "input_shape": [1, 8, 8],
                     "scenario_model": True}
    state = torch.load(run_dir / "model_state.pt", weights_only=True)
    pickled = torch.load(run_dir / "model.pt", weights_only=False)
    assert state.keys() == pickled.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in pickled.state_dict().items())
    model = load_model(run_dir)
    test = test_split(config)
    with torch.no_grad():
        pred = model(test.x).argmax(1).numpy()
    assert float(np.mean(pred == test.labels)) == pytest.approx(summary["final_accuracy"], abs=1e-9)


def test_round_lines_reach_flowers_logger(fedavg_run):
    *_, records = fedavg_run
    lines = [r.getMessage() for r in records if r.name == "flwr.fedsim"]
    assert [ln.split("  ")[0] for ln in lines] == [f"[fedsim fedavg] round {r}/2" for r in (0, 1, 2)]
    assert all(r.levelno == logging.INFO for r in records if r.name == "flwr.fedsim")
    from flwr.common.logger import console_handler  # what `flwr run --stream` mirrors from the ServerApp

    assert console_handler in logging.getLogger("flwr").handlers


def test_a_module_that_is_not_the_scenario_network_names_its_class(tmp_path):
    (tmp_path / "s.toml").write_text(inline_digits_scenario("afl", clients=2))
    run_scenario(load_scenario(tmp_path / "s.toml"), tmp_path / "afl", show_progress=False)
    saved = json.loads((tmp_path / "afl" / "config.json").read_text())["saved_model"]
    assert saved["scenario_model"] is False
    state = torch.load(tmp_path / "afl" / "model_state.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(FedsimError, match=r"is not the scenario's network; load model\.pt"):
        load_model(tmp_path / "afl")
