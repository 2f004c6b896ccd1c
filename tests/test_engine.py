"""The engine on the inline backend (same Flower apps, in-process, messages serialized): accounting, grouping,
failures, reproducibility, interruption."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from conftest import DIGITS, scenario_config
from fedsim.engine import StrategySpec, register_strategy
from fedsim.engine.accounting import failing_clients, node_group, record_nbytes
from fedsim.engine.runner import run_scenario


def _config(tmp_path, *overrides):
    return scenario_config(DIGITS, tmp_path, *overrides)


def test_fedavg_inline_writes_run_files_and_counts_bytes(tmp_path):
    config = _config(tmp_path)
    summary = run_scenario(config, tmp_path / "run", show_progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2]  # initial evaluation + one row per round
    assert metrics["accuracy"].iloc[-1] > 0.5  # 2 rounds on digits learn something (chance = 0.1)
    # every client downloads the global model once per round, and uploads one model of the same size
    model_bytes = metrics["round_bytes_down"].iloc[1] / config.num_clients
    assert model_bytes > 4 * sum(p.numel() for p in torch.load(tmp_path / "run" / "model.pt",
                                                               weights_only=False).parameters())
    assert summary["bytes_down"] == metrics["bytes_down"].iloc[-1] == metrics["round_bytes_down"].sum()
    assert metrics["round_bytes_down"].iloc[2] == pytest.approx(model_bytes * config.num_clients, rel=1e-3)
    assert summary["bytes_up"] > 0 and summary["messages_up"] == 2 * config.num_clients  # start-up discovery is not counted
    assert summary["status"] == "completed" and summary["final_accuracy"] == metrics["accuracy"].iloc[-1]


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = run_scenario(_config(tmp_path), tmp_path / "a", show_progress=False)
    b = run_scenario(_config(tmp_path), tmp_path / "b", show_progress=False)
    run_scenario(_config(tmp_path, "seed=4"), tmp_path / "c", show_progress=False)
    cols = ["round", "accuracy", "loss", "bytes_up", "bytes_down"]
    ma, mb, mc = (pd.read_csv(tmp_path / d / "metrics.csv")[cols] for d in "abc")
    pd.testing.assert_frame_equal(ma, mb)
    assert a["final_accuracy"] == b["final_accuracy"]
    assert not ma["loss"].equals(mc["loss"])


def test_grouped_nodes_give_the_same_model_and_per_client_bytes(tmp_path):
    # one round: the group's pre-averaged model equals FedAvg over its members up to float32 round-off
    # (later rounds would amplify that round-off through SGD)
    single = run_scenario(_config(tmp_path, "rounds=1"), tmp_path / "single", show_progress=False)
    grouped = run_scenario(_config(tmp_path, "rounds=1", "simulation.clients_per_node=4"), tmp_path / "grouped",
                           show_progress=False)
    m1 = torch.load(tmp_path / "single" / "model.pt", weights_only=False).state_dict()
    m2 = torch.load(tmp_path / "grouped" / "model.pt", weights_only=False).state_dict()
    for key in m1:
        torch.testing.assert_close(m1[key].double(), m2[key].double(), atol=1e-6, rtol=1e-5)
    # 6 clients on 2 nodes: fewer messages, same per-client accounting
    assert grouped["messages_up"] == 2 and single["messages_up"] == 6
    assert grouped["bytes_up"] == single["bytes_up"]
    assert grouped["bytes_down"] == single["bytes_down"]


def test_failure_injection_drops_exactly_the_chosen_clients(tmp_path):
    config = _config(tmp_path, "simulation.failure_rate=0.34")
    summary = run_scenario(config, tmp_path / "f", show_progress=False)
    per_round = [failing_clients(config.seed, r, 6, 0.34) for r in (1, 2)]
    assert all(len(f) == 2 for f in per_round)
    assert summary["failed_client_rounds"] == 4
    metrics = pd.read_csv(tmp_path / "f" / "metrics.csv")
    assert list(metrics["failed_clients"]) == [0, 2, 4]


def test_failing_set_is_seeded_and_exact():
    a = failing_clients(0, 1, 100, 0.2)
    assert len(a) == 20 and a == failing_clients(0, 1, 100, 0.2)
    assert a != failing_clients(0, 2, 100, 0.2) and a != failing_clients(1, 1, 100, 0.2)
    assert failing_clients(0, 1, 100, 0.0) == frozenset()


def test_node_groups_cover_every_client_once():
    groups = [node_group(q, 7, 30) for q in range(5)]
    assert sorted(sum(groups, [])) == list(range(30)) and groups[-1] == [28, 29]


# -- a tiny strategy defined here: engine features independent of any algorithm ---------------------------------
@dataclass
class _Params:
    stop_after: int = 2


class _EchoClient:
    def __init__(self, params):
        self.params = params

    def train(self, content, env):
        n = len(env.indices)
        return RecordDict({"m": MetricRecord({"n": n, "pid": env.partition_id})})

    @staticmethod
    def reduce(replies):
        return RecordDict({"m": MetricRecord({"n": sum(int(r["m"]["n"]) for r in replies), "pid": -1})})


class _InterruptingServer:
    def __init__(self, params):
        self.params = params

    def run(self, ctx):
        total = 0
        for step in range(1, 10):
            for reply in ctx.stream(RecordDict(), round=step):  # folded as they arrive
                if reply.ok:
                    total += int(reply.content["m"]["n"])
            ctx.log(step, accuracy=step / 10)
            if step == self.params.stop_after:
                raise KeyboardInterrupt
        ctx.summary(final_accuracy=1.0, seen=total)


register_strategy(StrategySpec(name="test-interrupt", params=_Params, server=_InterruptingServer,
                               client=_EchoClient, reducible=True, description="test only"))


def test_interrupted_run_keeps_what_it_wrote(tmp_path):
    config = _config(tmp_path, "strategy.name=test-interrupt")
    with pytest.raises(KeyboardInterrupt):
        run_scenario(config, tmp_path / "i", show_progress=False)
    summary = json.loads((tmp_path / "i" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert list(pd.read_csv(tmp_path / "i" / "metrics.csv")["round"]) == [1, 2]
    assert (tmp_path / "i" / "config.json").exists() and (tmp_path / "i" / "partition.csv").exists()


def test_stream_sees_every_example_once_grouped(tmp_path):
    config = _config(tmp_path, "strategy.name=test-interrupt", "strategy.stop_after=99",
                     "simulation.clients_per_node=4", "rounds=1")
    summary = run_scenario(config, tmp_path / "s", show_progress=False)
    table = pd.read_csv(tmp_path / "s" / "partition.csv")
    assert summary["seen"] == 9 * table["size"].sum()  # 9 steps, every client's examples counted once per step


def test_record_nbytes_grows_with_payload():
    small = RecordDict({"m": MetricRecord({"x": [1.0] * 10})})
    big = RecordDict({"m": MetricRecord({"x": [1.0] * 1000})})
    assert record_nbytes(big) - record_nbytes(small) >= 990 * 8
