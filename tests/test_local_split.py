"""Local test splits (partition.test_fraction) and personalized evaluation (evaluation.mode), against hand counts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import assert_config_error_names
from fedsim.config import config_from_dict
from fedsim.data.local_split import split_client, test_size
from fedsim.engine.runner import run_scenario
from fedsim.engine.server import AccountingGrid, ServerContext
from fedsim.results.report import comparison_table, load_grouped
from fedsim.results.rundir import RunRecorder
from fedsim.scenario import _client_partition, local_test_partition, partition_for, train_split


def test_held_out_sizes_follow_the_documented_rule():
    assert [test_size(n, 0.2) for n in (0, 1, 2, 5, 10, 11)] == [0, 0, 1, 1, 2, 3]  # ceil(0.2 n), <= n - 1
    assert test_size(4, 0.9) == 3 and test_size(10, 0.0) == 0


def test_split_client_stratifies_where_it_can_and_falls_back_to_a_plain_split():
    labels = np.array([0] * 6 + [1] * 4 + [0, 0, 1] + [2])  # indices 0..9: client A; 10..12: client B; 13: C
    train, test, stratified = split_client(np.arange(10), labels, 0.2, seed=3)
    assert stratified and len(test) == 2 and len(train) == 8
    assert sorted(labels[test]) == [0, 1]  # one of each class: 2 held out over 2 classes
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(10))
    # client B: class 1 has a single sample, so no stratification; ceil(0.2 * 3) = 1 held out
    train, test, stratified = split_client(np.arange(10, 13), labels, 0.2, seed=3)
    assert not stratified and len(test) == 1 and len(train) == 2
    assert not set(train) & set(test) and set(train) | set(test) == {10, 11, 12}
    # client C: one sample, nothing held out (it keeps one sample to train on)
    train, test, _ = split_client(np.array([13]), labels, 0.2, seed=3)
    assert train.tolist() == [13] and test.size == 0
    # seeded: the same seed the same split, another seed (here) another one
    again = split_client(np.arange(10), labels, 0.5, seed=3)[1]
    assert np.array_equal(again, split_client(np.arange(10), labels, 0.5, seed=3)[1])
    assert any(not np.array_equal(again, split_client(np.arange(10), labels, 0.5, seed=s)[1]) for s in range(4, 9))


def test_bad_settings_name_their_field():
    assert_config_error_names("evaluation.mode", "choose one of 'global', 'local', 'both'",
                              lambda: config_from_dict({"evaluation": {"mode": "personal"}}))
    assert_config_error_names("evaluation.mode", "partition.test_fraction is 0",
                              lambda: config_from_dict({"evaluation": {"mode": "local"}}))
    assert_config_error_names("evaluation.mode", "partition.test_fraction is 0",
                              lambda: config_from_dict({"evaluation": {"mode": "both"}}))
    for bad in (1.0, -0.1):
        assert_config_error_names("partition.test_fraction", "it must lie in [0, 1)",
                                  lambda: config_from_dict({"partition": {"test_fraction": bad}}))


def _tiny_npz(path):
    """3 writers: client 0 holds labels 0,0,0,0,0,0,1,1,1,1; client 1 five 1s; client 2 the labels 0, 0, 2."""
    y = np.array([0] * 6 + [1] * 4 + [1] * 5 + [0, 0, 2])
    groups = np.array([0] * 10 + [1] * 5 + [2] * 3)
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1) / len(y)
    np.savez(path, x_train=x, y_train=y, x_test=x[:3], y_test=np.array([0, 1, 2]), groups_train=groups)
    return y


def _tiny_config(path, mode: str = "local"):
    return config_from_dict({
        "data": {"name": "npz", "path": str(path)},
        "partition": {"kind": "natural", "by": "groups", "num_clients": 3, "test_fraction": 0.2},
        "evaluation": {"mode": mode}, "simulation": {"backend": "inline"}, "model": {"name": "mlp"},
    })


class ConstantClass(nn.Module):
    """Predicts class 0 for every input (scores (1, 0, 0))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0, 0.0]]).repeat(x.shape[0], 1)


def test_local_accuracy_of_a_constant_model_by_hand(tmp_path):
    labels = _tiny_npz(tmp_path / "tiny.npz")
    config = _tiny_config(tmp_path / "tiny.npz")
    train, test = partition_for(config), local_test_partition(config)
    # sizes by hand: ceil(0.2 * 10) = 2, ceil(0.2 * 5) = 1, ceil(0.2 * 3) = 1
    assert [len(t) for t in test] == [2, 1, 1] and [len(t) for t in train] == [8, 4, 2]
    for k, (tr, te) in enumerate(zip(train, test)):  # disjoint, together the writer's samples
        assert not set(tr) & set(te)
        assert sorted(np.concatenate([tr, te])) == list(np.flatnonzero(np.array([0] * 10 + [1] * 5 + [2] * 3) == k))
    assert sorted(labels[test[0]]) == [0, 1]  # client 0 stratified: one 0 and one 1
    assert labels[test[1]].tolist() == [1]
    # "always class 0": client 0 gets 1 of 2 right, client 1 none, client 2 one iff it held out a 0
    c2 = float(labels[test[2]][0] == 0)
    expected = np.array([0.5, 0.0, c2])

    ctx = ServerContext(config, AccountingGrid(None, 1), RunRecorder(tmp_path / "run"))
    np.testing.assert_array_equal(ctx.local_accuracies(ConstantClass()), expected)
    row = ctx.log(0, accuracy=1 / 3, **ctx.client_accuracy(None, model=ConstantClass()))
    assert row["local_acc_mean"] == pytest.approx(expected.mean(), abs=1e-15)
    assert row["local_acc_min"] == 0.0 and row["local_acc_std"] == pytest.approx(expected.std(), abs=1e-15)
    assert "client_acc_mean" not in row  # mode "local": no label-mix estimate
    ctx.save_model(ConstantClass())
    assert ctx.extra_summary["local_accuracy"] == pytest.approx(expected.mean(), abs=1e-15)
    assert ctx.extra_summary["worst_local_accuracy"] == 0.0
    table = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert table["client"].tolist() == [0, 1, 2] and table["round"].tolist() == [0, 0, 0]
    assert table["test_samples"].tolist() == [2, 1, 1] and table["local_accuracy"].tolist() == expected.tolist()
    assert "label_mix_accuracy" not in table


def test_fedavg_with_local_test_splits(tmp_path):
    """Clients train only on their training side (the replies' samples), every evaluated round measures the
    global model on each client's held-out data, and model.pt reproduces the last round's per-client values."""
    config = config_from_dict({
        "seed": 2, "rounds": 2,
        "data": {"name": "digits", "max_train": 600, "max_test": 300},
        "partition": {"kind": "dirichlet", "num_clients": 4, "alpha": 1.0, "test_fraction": 0.25},
        "model": {"name": "cnn", "width": 8}, "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"mode": "both"}, "simulation": {"backend": "inline"}, "strategy": {"name": "fedavg"},
    })
    summary = run_scenario(config, tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    metrics = pd.read_csv(run / "metrics.csv")
    clients = pd.read_csv(run / "clients.csv")
    train, test = partition_for(config), local_test_partition(config)
    full = _client_partition(config)  # the partition before the local test data is held out
    for k in range(4):
        assert len(test[k]) == test_size(len(full[k]), 0.25) and len(train[k]) + len(test[k]) == len(full[k])
    trained = clients[clients["round"] >= 1]
    assert trained["samples"].tolist() == [len(train[k]) for k in range(4)] * 2  # the held-out rows not trained on
    assert trained["train_loss"].notna().all() and clients["test_samples"].tolist() == [len(t) for t in test] * 3
    assert {"local_acc_mean", "local_acc_min", "local_acc_std", "client_acc_mean"} <= set(metrics.columns)
    last = clients[clients["round"] == 2].sort_values("client")
    np.testing.assert_allclose(metrics["local_acc_mean"].iloc[-1], last["local_accuracy"].mean(), atol=1e-12)
    assert summary["local_accuracy"] == pytest.approx(last["local_accuracy"].mean(), abs=1e-12)
    assert summary["worst_local_accuracy"] == last["local_accuracy"].min()
    model = torch.load(run / "model.pt", weights_only=False).eval()
    data = train_split(config)
    with torch.inference_mode():
        by_hand = [float((model(data.x[t]).argmax(1).numpy() == data.labels[t]).mean()) for t in test]
    np.testing.assert_allclose(last["local_accuracy"].to_numpy(), by_hand, atol=1e-12)
    assert json.loads((run / "summary.json").read_text())["local_accuracy_std"] == pytest.approx(np.std(by_hand))
    table = comparison_table(load_grouped([run]))  # fedsim report's per-run table
    assert table["local acc"].tolist() == [summary["local_accuracy"]]
    assert table["worst local"].tolist() == [summary["worst_local_accuracy"]]
