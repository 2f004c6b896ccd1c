"""The gradient baselines' protocol: FedProx's mu reaches the clients in the message Flower's FedProx sends, and the
clients train with exactly that mu (not with a value read from their own settings)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

import fedsim.clients.sgd as sgd_client
from conftest import DIGITS, scenario_config
from fedsim.clients.sgd import SGDClient
from fedsim.engine.runner import run_scenario
from fedsim.algorithms.fedavg import protocol
from fedsim.strategies.fedavg import FedProxServer


def _run(tmp_path, label, *overrides):
    config = scenario_config(DIGITS, tmp_path, "rounds=1", *overrides)
    summary = run_scenario(config, tmp_path / label, show_progress=False)
    return summary, torch.load(tmp_path / label / "model.pt", weights_only=False).state_dict()


@pytest.fixture
def spy(monkeypatch):
    """Records, per client call, the mu in the received train config and the mu the client trained with."""
    seen = {"sent": [], "used": []}
    train, train_epochs = SGDClient.train, sgd_client.train_epochs

    def spying_train(self, content, env):
        config = content.config_records.get(protocol.CONFIG_KEY) or {}
        seen["sent"].append(float(config[protocol.MU_KEY]) if protocol.MU_KEY in config else None)
        return train(self, content, env)

    def spying_epochs(*args, **kwargs):
        seen["used"].append(kwargs["proximal_mu"])
        return train_epochs(*args, **kwargs)

    monkeypatch.setattr(SGDClient, "train", spying_train)
    monkeypatch.setattr(sgd_client, "train_epochs", spying_epochs)
    return seen


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_fedprox_mu_travels_in_the_message_and_changes_the_result(tmp_path, spy):
    _, fedavg = _run(tmp_path, "fedavg")
    assert spy["sent"] == [None] * 6 and spy["used"] == [0.0] * 6  # FedAvg sends no mu: plain local SGD
    spy["sent"].clear(), spy["used"].clear()

    _, prox0 = _run(tmp_path, "prox0", "strategy.name=fedprox", "strategy.proximal_mu=0.0")
    assert spy["sent"] == spy["used"] == [0.0] * 6
    assert _same(prox0, fedavg)  # mu = 0 is FedAvg exactly
    spy["sent"].clear(), spy["used"].clear()

    _, prox = _run(tmp_path, "prox", "strategy.name=fedprox", "strategy.proximal_mu=5.0")
    assert spy["sent"] == spy["used"] == [5.0] * 6
    assert not _same(prox, prox0)  # a strong pull towards the global model changes what the clients learn


def test_clients_use_the_mu_the_server_sent_not_their_own_settings(tmp_path, spy, monkeypatch):
    # the server sends 0.25 while the scenario (which every client also sees) says 5.0
    monkeypatch.setattr(FedProxServer, "strategy_options", lambda self: {"proximal_mu": 0.25})
    _run(tmp_path, "sent", "strategy.name=fedprox", "strategy.proximal_mu=5.0")
    assert spy["sent"] == spy["used"] == [0.25] * 6


def test_parse_train_reads_flower_fedprox_config():
    arrays = {"w": torch.ones(2).numpy()}
    content = RecordDict({protocol.ARRAYS_KEY: protocol.reply(arrays, 3, 0.5)[protocol.ARRAYS_KEY],
                          protocol.CONFIG_KEY: ConfigRecord({"server-round": 1, protocol.MU_KEY: 0.3})})
    got, mu = protocol.parse_train(content)
    assert mu == 0.3 and got["w"].tolist() == [1.0, 1.0]
    del content[protocol.CONFIG_KEY]
    assert protocol.parse_train(content)[1] == 0.0
