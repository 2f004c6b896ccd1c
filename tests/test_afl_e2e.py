"""AFL end to end through the real CLI, Flower and Ray, on the full Fashion-MNIST: against FedAvg on the same
100-client Dirichlet(0.1) partition, given the same wall-clock budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

FEDAVG = """
# the partition of scenarios/afl-fmnist.toml (same seed, kind, clients, alpha), FedAvg's CNN
seed = 0
rounds = {rounds}
[data]
name = "fashion-mnist"
[partition]
kind = "dirichlet"
num_clients = 100
alpha = 0.1
[model]
name = "cnn"
width = 16
[client]
epochs = 1
batch_size = 32
lr = 0.01
momentum = 0.9
[simulation]
num_cpus = 1
clients_per_node = 25
[strategy]
name = "fedavg"
"""


def fedsim(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fedsim.cli", *args], check=True, cwd=ROOT, capture_output=True)


@pytest.mark.slow
@pytest.mark.ray
def test_afl_beats_fedavg_for_the_same_wall_clock_budget(tmp_path):
    fedsim("run", "scenarios/afl-fmnist.toml", "--out", str(tmp_path / "afl"), "--quiet",
           "--set", "model.feature_dim=1024", "--set", "simulation.clients_per_node=25")
    afl = json.loads((tmp_path / "afl" / "summary.json").read_text())
    afl_rows = pd.read_csv(tmp_path / "afl" / "metrics.csv")
    assert afl["status"] == "completed" and afl["answered_clients"] == 100 and afl["dropped_clients"] == 0
    assert afl["train_samples"] == 60000
    assert afl["final_accuracy"] > AFL_FLOOR
    budget = float(afl_rows["elapsed_seconds"].iloc[-1])  # seconds from the server's start to AFL's evaluated result

    scenario = tmp_path / "fedavg.toml"
    scenario.write_text(FEDAVG.format(rounds=FEDAVG_ROUNDS))
    fedsim("run", str(scenario), "--out", str(tmp_path / "fedavg"), "--quiet")
    rows = pd.read_csv(tmp_path / "fedavg" / "metrics.csv")
    assert rows["elapsed_seconds"].iloc[-1] > budget  # FedAvg ran at least as long as AFL did
    within = rows[rows["elapsed_seconds"] <= budget]
    best_within = float(within["accuracy"].max()) if len(within) else 0.0
    assert afl["final_accuracy"] > best_within + MARGIN
    assert afl["final_accuracy"] > float(rows["accuracy"].max())  # and beats all FedAvg rounds run here


# Measured on the 2-core machine (quiet; the test took 86 s): AFL (1024 features) 0.8493 test accuracy, its result
# 13.2 s after the server started; FedAvg 0.100 at round 0 (11.2 s), 0.211 at round 1 (29.9 s), 0.453 at round 2
# (48.4 s). AFL's accuracy is deterministic (exact math, fixed seed); the floors leave room for other machines.
AFL_FLOOR = 0.83
FEDAVG_ROUNDS = 2
MARGIN = 0.1
