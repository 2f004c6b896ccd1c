"""SCAFFOLD and FedDyn against their update rules written out by hand.

A tiny scenario (3 clients of a digits slice, a width-8 MLP without BatchNorm, full-batch steps, plain SGD) runs
two rounds through the engine; the same two rounds are then computed here, step by step, from the papers'
equations (gradients by autograd in float64, nothing from fedsim's training loop), and the saved global model
must match to 1e-6. Round 2 depends on the client state kept from round 1 (c_i, g_k), so a client that forgot its
state, or a server that mixed up c or h, fails the comparison. Grouped nodes (one node for all three clients)
must give the same model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import scenario_config
from fedsim.clients.scaffold import momentum_distance
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError
from fedsim.scenario import ScenarioView, partition_for, train_split

TINY = """
seed = 1
rounds = 2
[data]
name = "digits"
max_train = 120
max_test = 60
[partition]
kind = "dirichlet"
num_clients = 3
alpha = 1.0
[model]
name = "mlp"
width = 8
[client]
epochs = 3
batch_size = 1000
lr = 0.1
momentum = 0.0
[simulation]
backend = "inline"
[strategy]
name = "scaffold"
"""


def _engine(tmp_path, label, *overrides):
    config = scenario_config(TINY, tmp_path, *overrides, filename=f"{label}.toml")
    run_scenario(config, tmp_path / label, show_progress=False)
    model = torch.load(tmp_path / label / "model.pt", weights_only=False)
    return config, {k: v.detach().double() for k, v in model.named_parameters()}


def _setup(config):
    net = ScenarioView(config).initial_model().double()
    x = {k: v.detach().clone() for k, v in net.named_parameters()}
    train = train_split(config)
    data = []
    for idx in partition_for(config):
        part = train.subset(idx)
        assert len(part) > 0
        data.append((part.x.double(), part.y))
    return net, x, data


def _grad(net: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """grad of the mean cross-entropy of the client's whole partition at ``params``."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = nn.functional.cross_entropy(functional_call(net, leaves, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def _compare(got: dict, want: dict) -> None:
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


def scaffold_by_hand(config, option: str) -> dict:
    """Algorithm 1 of Karimireddy et al. (2020) with eta_g = 1 and all clients sampled."""
    net, x, data = _setup(config)
    lr, steps, n = config.client.lr, config.client.epochs, len(data)
    zeros = {k: torch.zeros_like(v) for k, v in x.items()}
    c, c_i = dict(zeros), [dict(zeros) for _ in data]
    for _ in range(config.rounds):
        ys, dcs = [], []
        for k, (xs, ys_k) in enumerate(data):
            y = {key: v.clone() for key, v in x.items()}
            for _ in range(steps):
                g = _grad(net, y, xs, ys_k)
                y = {key: y[key] - lr * (g[key] + c[key] - c_i[k][key]) for key in y}
            if option == "II":
                new = {key: c_i[k][key] - c[key] + (x[key] - y[key]) / (steps * lr) for key in y}
            else:
                new = _grad(net, x, xs, ys_k)
            dcs.append({key: new[key] - c_i[k][key] for key in y})
            c_i[k] = new
            ys.append(y)
        x = {key: sum(y[key] for y in ys) / len(ys) for key in x}
        c = {key: c[key] + sum(d[key] for d in dcs) / n for key in c}
    return x


def feddyn_by_hand(config, alpha: float) -> dict:
    """Algorithm 1 of Acar et al. (2021), all clients sampled, local problem solved by full-batch GD steps."""
    net, x, data = _setup(config)
    lr, steps, m = config.client.lr, config.client.epochs, len(data)
    zeros = {k: torch.zeros_like(v) for k, v in x.items()}
    h, g = dict(zeros), [dict(zeros) for _ in data]
    for _ in range(config.rounds):
        thetas = []
        for k, (xs, ys_k) in enumerate(data):
            theta = {key: v.clone() for key, v in x.items()}
            for _ in range(steps):
                grad = _grad(net, theta, xs, ys_k)
                theta = {key: theta[key] - lr * (grad[key] - g[k][key] + alpha * (theta[key] - x[key]))
                         for key in theta}
            g[k] = {key: g[k][key] - alpha * (theta[key] - x[key]) for key in theta}
            thetas.append(theta)
        h = {key: h[key] - alpha / m * sum(t[key] - x[key] for t in thetas) for key in h}
        x = {key: sum(t[key] for t in thetas) / len(thetas) - h[key] / alpha for key in x}
    return x


@pytest.mark.parametrize("option", ["II", "I"])
def test_scaffold_matches_the_update_rule_written_by_hand(tmp_path, option):
    config, got = _engine(tmp_path, f"scaffold-{option}", f"strategy.control_update={option}")
    want = scaffold_by_hand(config, option)
    _compare(got, want)
    # the control variates matter: plain FedAvg on the same clients ends elsewhere
    _, fedavg = _engine(tmp_path, "fedavg", "strategy.name=fedavg")
    assert max(float((fedavg[k] - want[k]).abs().max()) for k in want) > 1e-4


def test_scaffold_grouped_nodes_give_the_same_model(tmp_path):
    config, got = _engine(tmp_path, "scaffold-grouped", "simulation.clients_per_node=3")
    _compare(got, scaffold_by_hand(config, "II"))


def test_feddyn_matches_the_update_rule_written_by_hand(tmp_path):
    config, got = _engine(tmp_path, "feddyn", "strategy.name=feddyn", "strategy.alpha=0.1")
    _compare(got, feddyn_by_hand(config, 0.1))
    config, grouped = _engine(tmp_path, "feddyn-grouped", "strategy.name=feddyn", "strategy.alpha=0.1",
                              "simulation.clients_per_node=3")
    _compare(grouped, got)


@pytest.mark.parametrize("momentum, steps", [(0.0, 5), (0.9, 1), (0.9, 7), (0.5, 3)])
def test_momentum_distance_is_how_far_heavy_ball_sgd_moves_under_a_constant_gradient(momentum, steps):
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        w.sum().backward()  # gradient 1
        opt.step()
    assert -float(w.detach()) == pytest.approx(momentum_distance(0.1, momentum, steps), rel=1e-6)


def test_scaffold_option_ii_refuses_adam(tmp_path):
    with pytest.raises(ConfigError, match=r"^client\.optimizer:"):
        scenario_config(TINY, tmp_path, "client.optimizer=adam")
    scenario_config(TINY, tmp_path, "client.optimizer=adam", "strategy.control_update=I", filename="ok.toml")


def test_stateful_parameters_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"^strategy\.alpha:"):
        scenario_config(TINY, tmp_path, "strategy.name=feddyn", "strategy.alpha=0")
    with pytest.raises(ConfigError, match=r"^strategy\.control_update:"):
        scenario_config(TINY, tmp_path, "strategy.control_update=III")
    with pytest.raises(ConfigError, match=r"^strategy\.server_learning_rate:"):
        scenario_config(TINY, tmp_path, "strategy.server_learning_rate=-1")


def test_partial_participation_samples_the_same_clients_in_every_run(tmp_path):
    from fedsim.frameworks.model_rounds import ModelRoundsServer

    config = scenario_config(TINY, tmp_path, "partition.num_clients=6", "strategy.fraction_train=0.5")
    server = ModelRoundsServer(config.strategy.params)
    view = ScenarioView(config)
    view.clock = None  # what ServerContext holds without a [system] section (the sample hook reads it)
    rounds = [server.sample(view, r) for r in (1, 2, 3)]
    assert all(len(s) == 3 for s in rounds) and rounds == [server.sample(view, r) for r in (1, 2, 3)]
    assert len({tuple(s) for s in rounds}) > 1
    assert np.all(np.diff(rounds[0]) > 0)
