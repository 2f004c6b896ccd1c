"""FedNova (Wang et al., NeurIPS 2020) against what the paper promises.

- With equal local steps tau_i FedNova's update x - tau_eff sum_i p_i (x - y_i) / tau_i is FedAvg's
  sum_i p_i y_i: the saved models agree to float round-off.
- With unequal steps (quantity skew at fixed epochs) tau_eff = sum_i p_i tau_i, and the model after one round is
  the rule written by hand over the local models y_i, which here come from FedAvg's own client part (same seeds,
  same local SGD), so nothing of FedNova's client is trusted; it differs from FedAvg's average.
- A node serving all clients gives the same model (replies are example-weighted means, combined exactly).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import scenario_config
from test_stateful_baselines import TINY  # 3 digits clients, width-8 MLP, full-batch plain SGD
from fedsim.algorithms.fedavg import protocol as sgd_protocol
from fedsim.algorithms.fednova import protocol
from fedsim.clients.sgd import SGDClient
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError
from fedsim.scenario import partition_for
from fedsim.strategies.fednova import FedNovaServer

# quantity skew and small batches: the clients run different numbers of local steps
UNEQUAL = ["partition.kind=quantity", "partition.quantity_alpha=0.5", "partition.min_partition_size=5",
           "client.batch_size=8", "client.epochs=2"]


def _run(tmp_path, label, *overrides):
    config = scenario_config(TINY, tmp_path, "strategy.name=fednova", *overrides, filename=f"{label}.toml")
    summary = run_scenario(config, tmp_path / label, show_progress=False)
    model = torch.load(tmp_path / label / "model.pt", weights_only=False)
    metrics = pd.read_csv(tmp_path / label / "metrics.csv")
    return config, summary, {k: v.detach().double() for k, v in model.state_dict().items()}, metrics


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_with_equal_steps_fednova_is_fedavg(tmp_path):
    # full-batch steps: every client runs tau_i = epochs = 3 steps, whatever its size
    config, summary, nova, metrics = _run(tmp_path, "fednova")
    assert len({len(p) for p in partition_for(config)}) > 1  # the clients' weights p_i still differ
    _, _, fedavg, _ = _run(tmp_path, "fedavg", "strategy.name=fedavg")
    assert _max_diff(nova, fedavg) < 1e-6  # measured 3e-8 after two rounds (float32 round-off)
    assert list(metrics["tau_eff"].dropna()) == [3.0, 3.0] and summary["mean_tau_eff"] == 3.0


def test_tau_eff_and_the_update_on_unequal_clients(tmp_path, monkeypatch):
    seen: dict[int, tuple[dict, dict, int]] = {}  # pid -> (received x, local model y_i, n_i), FedAvg's client
    train = SGDClient.train

    def spying(self, content, env):
        out = train(self, content, env)
        received = {k: np.array(v) for k, v in sgd_protocol.parse_train(content)[0].items()}
        sent, n, _ = sgd_protocol.parse_reply(out)
        seen[env.partition_id] = (received, {k: np.array(v) for k, v in sent.items()}, n)
        return out

    monkeypatch.setattr(SGDClient, "train", spying)
    _, _, fedavg, _ = _run(tmp_path, "fedavg", "rounds=1", "strategy.name=fedavg", *UNEQUAL)
    config, summary, nova, metrics = _run(tmp_path, "fednova", "rounds=1", *UNEQUAL)

    sizes = [len(p) for p in partition_for(config)]
    tau = [config.client.epochs * math.ceil(n / config.client.batch_size) for n in sizes]
    assert len(set(tau)) == len(tau), tau  # unequal steps
    seen = [seen[pid] for pid in sorted(seen)]
    assert [n for *_, n in seen] == sizes
    p = np.array(sizes, dtype=np.float64) / sum(sizes)
    tau_eff = float(np.dot(p, tau))
    assert metrics["tau_eff"].iloc[-1] == pytest.approx(tau_eff, rel=1e-12)
    assert summary["mean_tau_eff"] == pytest.approx(tau_eff, rel=1e-12)
    assert not tau_eff == pytest.approx(np.mean(tau))  # example-weighted, not the plain mean

    x = seen[0][0]
    want = {k: x[k].astype(np.float64) - tau_eff * sum(
        p_i * (x[k].astype(np.float64) - y[k].astype(np.float64)) / t for p_i, (_, y, _), t in zip(p, seen, tau))
        for k in x}
    for key, value in want.items():
        np.testing.assert_allclose(nova[key].numpy(), value, atol=1e-6, rtol=0, err_msg=key)
    assert _max_diff(nova, fedavg) > 1e-3  # FedAvg's average leans towards the clients that ran more steps


def test_grouped_nodes_give_the_same_model(tmp_path):
    _, single_summary, single, _ = _run(tmp_path, "single", *UNEQUAL)
    _, grouped_summary, grouped, _ = _run(tmp_path, "grouped", *UNEQUAL, "simulation.clients_per_node=3")
    assert _max_diff(single, grouped) < 1e-6
    assert grouped_summary["mean_tau_eff"] == pytest.approx(single_summary["mean_tau_eff"], rel=1e-12)
    assert grouped_summary["bytes_up"] == single_summary["bytes_up"]


def test_the_server_step_by_hand():
    # two clients: n = (1, 3), tau = (2, 6), d = (1, -1) on one parameter; tau_eff = 0.25 * 2 + 0.75 * 6 = 5
    replies = [protocol.reply({"w": np.array([1.0], np.float32)}, {}, 1, 1, 0.0, 2, 2.0),
               protocol.reply({"w": np.array([-1.0], np.float32)}, {}, 3, 1, 0.0, 6, 6.0)]
    server = FedNovaServer(protocol.FedNovaParams())
    server.parameters, server.round, server.tau_eff = ["w"], 1, {}
    out = server.aggregate({"w": np.array([10.0], np.float32)}, replies)
    assert server.tau_eff == {1: 5.0}
    assert out["w"].tolist() == [10.0 - 5.0 * (0.25 * 1.0 + 0.75 * -1.0)] and out["w"].dtype == np.float32
    merged = protocol.parse_reply(protocol.combine(replies))  # one node's pre-combined reply: the same means
    assert (merged.num_examples, merged.clients, merged.extra[protocol.NORM_KEY],
            merged.extra[protocol.STEPS_KEY]) == (4, 2, 5.0, 5.0)


def test_fednova_refuses_adam(tmp_path):
    with pytest.raises(ConfigError, match=r"^client\.optimizer:"):
        scenario_config(TINY, tmp_path, "strategy.name=fednova", "client.optimizer=adam")
