"""FedBuff (Nguyen et al., AISTATS 2022) on the simulated clock: the staleness weight, the buffered server step,
the event order of arrivals, one real update against the clients' own models, field-named errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_config_error_names, scenario_config

from fedsim.algorithms.fedbuff import protocol
from fedsim.clients.fedbuff import FedBuffClient
from fedsim.engine.node import ClientEnv
from fedsim.engine.runner import run_scenario
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.nn.training import state_to_arrays
from fedsim.scenario import partition_for, scenario_model


def scenario(clients: int, rounds: int, strategy: str, system: str = "[system]") -> str:
    return f"""
seed = 2
rounds = {rounds}
[data]
name = "digits"
max_train = 600
max_test = 300
[partition]
kind = "dirichlet"
num_clients = {clients}
alpha = 1.0
[model]
name = "cnn"
width = 8
[client]
epochs = 1
batch_size = 32
lr = 0.05
[simulation]
backend = "inline"
[strategy]
name = "fedbuff"
{strategy}
{system}
"""


def test_staleness_weight_is_the_papers_formula():
    for tau in range(0, 50):
        assert protocol.staleness_weight(tau) == 1.0 / math.sqrt(1.0 + tau)
        assert protocol.staleness_weight(tau, "none") == 1.0
    assert protocol.staleness_weight(3) == 0.5
    with pytest.raises(ValueError, match="staleness -1 < 0"):
        protocol.staleness_weight(-1)


def test_server_step_by_hand():
    rng = np.random.default_rng(0)
    x = {"w": rng.standard_normal((3, 4)).astype(np.float32), "bn.mean": np.zeros(4, np.float32),
         "bn.count": np.array(7, np.int64)}
    updates = [protocol.UpdateReply({"w": rng.standard_normal((3, 4)).astype(np.float32)},
                                    {"bn.mean": np.full(4, float(i), np.float32), "bn.count": np.array(8 + i, np.int64)},
                                    10, 1, 0.0) for i in range(3)]
    taus, lr = [0, 1, 3], 0.7
    out = protocol.server_step(x, updates, taus, lr)
    step = sum(np.asarray(u.update["w"], np.float64) / math.sqrt(1 + t) for u, t in zip(updates, taus)) / 3
    np.testing.assert_array_equal(out["w"], (x["w"].astype(np.float64) - lr * step).astype(np.float32))
    np.testing.assert_array_equal(out["bn.mean"], np.full(4, 1.0, np.float32))  # plain mean of the buffers
    assert out["bn.count"].dtype == np.int64 and int(out["bn.count"]) == 9


def test_one_update_of_fresh_clients_is_the_mean_of_their_models(tmp_path):
    # K = C = N: every client starts from x_0 at time 0 (staleness 0), eta_g = 1: x_1 = mean of the local models
    config = scenario_config(scenario(3, 1, "buffer_size = 3\nconcurrency = 3"), tmp_path)
    summary = run_scenario(config, tmp_path / "run", show_progress=False)
    assert summary["server_updates"] == 1 and summary["max_staleness"] == 0
    x0 = state_to_arrays(scenario_model(config, 10, (1, 8, 8)))
    training = LocalTraining.from_settings(config.client)
    locals_ = []
    for pid, indices in enumerate(partition_for(config)):
        env = ClientEnv(config, pid, 1, indices)
        reply = protocol.parse_reply(FedBuffClient(config.strategy.params).train(protocol.request(x0, training), env))
        locals_.append({k: x0[k].astype(np.float64) - np.asarray(v, np.float64) for k, v in reply.update.items()})
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False).state_dict()
    for key in locals_[0]:
        np.testing.assert_allclose(saved[key].numpy(), np.mean([m[key] for m in locals_], axis=0), atol=1e-6)


def test_arrivals_follow_simulated_time_and_stale_updates_are_counted(tmp_path):
    # K = 1, two clients: client 0 is fast and trains three times while the slow client 1 trains once, so client
    # 1's update arrives fourth, 3 versions stale; bandwidths so high that time is compute alone (plus ~1e-6 s)
    base = scenario_config(scenario(2, 4, "buffer_size = 1\nconcurrency = 2"), tmp_path)
    n0, n1 = (len(p) for p in partition_for(base))
    t0 = 1.0
    s0, s1 = n0 / t0, n1 / (3.5 * t0)
    trace = tmp_path / "devices.csv"
    trace.write_text(f"client,speed,download_mbps,upload_mbps\n0,{s0},1e9,1e9\n1,{s1},1e9,1e9\n")
    config = scenario_config(scenario(2, 4, "buffer_size = 1\nconcurrency = 2", f'[system]\ntrace = "{trace}"'),
                             tmp_path)
    summary = run_scenario(config, tmp_path / "run", show_progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    np.testing.assert_allclose(metrics["sim_seconds"], [0.0, 1.0, 2.0, 3.0, 3.5], atol=1e-3)
    assert summary["max_staleness"] == 3 and summary["mean_staleness"] == pytest.approx(3 / 4)
    assert summary["server_updates"] == 4 and metrics["accuracy"].iloc[-1] > metrics["accuracy"].iloc[0]


@pytest.mark.parametrize(("strategy", "system", "field", "fragment"), [
    ("concurrency = 9", "[system]", "strategy.concurrency", "must be <= partition.num_clients"),
    ("", "[system]\nover_selection = 1.3", "system.over_selection", "does not suit fedbuff"),
    ('staleness = "hinge"', "[system]", "strategy.staleness", "sqrt"),
    ("buffer_size = 0", "[system]", "strategy.buffer_size", ">= 1"),
])
def test_bad_settings_are_named(tmp_path, strategy, system, field, fragment):
    assert_config_error_names(field, fragment, lambda: scenario_config(scenario(3, 1, strategy, system), tmp_path))
