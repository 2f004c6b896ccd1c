"""Accuracy on each client's label mix (fedsim.results.client_metrics): the formula against a direct re-weighted count, and
what a FedAvg run records (metrics columns, summary, against the saved model re-evaluated by hand)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DIGITS, scenario_config
from fedsim.results.client_metrics import client_accuracies, client_accuracy_summary, label_counts
import fedsim.scenario as engine_client
from fedsim.engine.runner import run_scenario
from fedsim.nn.training import evaluate, per_class_accuracy


def test_label_counts_and_hand_computed_client_accuracies():
    labels = np.array([0, 0, 1, 2, 2, 2, 1])
    counts = label_counts([np.array([0, 1]), np.array([0, 2]), np.array([3, 4, 5, 5]), np.array([], int)], labels, 3)
    np.testing.assert_array_equal(counts, [[2, 0, 0], [1, 1, 0], [0, 0, 4], [0, 0, 0]])
    acc = client_accuracies(np.array([1.0, 0.0, 0.5]), counts)
    np.testing.assert_array_equal(acc[:3], [1.0, 0.5, 0.5])
    assert np.isnan(acc[3])  # an empty client has no label mix
    summary = client_accuracy_summary(np.array([1.0, 0.0, 0.5]), counts)
    assert summary == pytest.approx({"client_acc_mean": 2 / 3, "client_acc_min": 0.5,
                                     "client_acc_std": np.std([1.0, 0.5, 0.5])})


def test_classes_missing_from_the_test_set_are_left_out_and_shares_renormalized():
    counts = np.array([[3, 1, 0], [0, 0, 5], [1, 1, 1]])
    acc = client_accuracies(np.array([0.2, np.nan, 0.8]), counts)
    assert acc[0] == pytest.approx(0.2)  # class 1 unknown: client 0 is all class 0
    assert acc[1] == pytest.approx(0.8)
    assert acc[2] == pytest.approx(0.5)
    assert np.isnan(client_accuracies(np.array([np.nan, np.nan, 0.3]), np.array([[1, 2, 0]]))[0])
    assert client_accuracy_summary(np.array([0.5]), np.zeros((3, 1))) == {}


def test_equals_the_test_accuracy_reweighted_to_each_clients_label_mix():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    pred = np.where(rng.random(400) < 0.3 + 0.12 * y, y, (y + 1) % 5)  # class-dependent accuracy
    counts = rng.integers(0, 30, (6, 5)) * (rng.random((6, 5)) < 0.5)
    counts[0] = [10, 0, 0, 0, 0]
    got = client_accuracies(per_class_accuracy(pred, y, 5), counts)
    n_c = np.bincount(y, minlength=5)
    for k in range(6):
        if counts[k].sum() == 0:
            assert np.isnan(got[k])
            continue
        w = counts[k][y] / counts[k].sum() / n_c[y]  # every test example weighted by its class's share for client k
        assert got[k] == pytest.approx(float(np.sum(w * (pred == y))), abs=1e-12)


def test_fedavg_run_records_the_worst_client_from_the_final_model(tmp_path):
    config = scenario_config(DIGITS, tmp_path, "partition.alpha=0.2", "client.epochs=1")
    summary = run_scenario(config, tmp_path / "run", show_progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert {"client_acc_mean", "client_acc_min", "client_acc_std"} <= set(metrics.columns)
    assert (metrics["client_acc_min"] <= metrics["client_acc_mean"] + 1e-12).all()
    # recompute from the saved model and partition.csv
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    test = engine_client.test_split(config)
    res = evaluate(model, test.x, test.y)
    counts = pd.read_csv(tmp_path / "run" / "partition.csv").filter(regex=r"^class_\d+$").to_numpy()
    expected = client_accuracies(res["class_accuracy"], counts)
    assert summary["worst_client_accuracy"] == pytest.approx(np.nanmin(expected), abs=1e-6)
    assert summary["worst_client_accuracy"] < summary["final_accuracy"]  # label skew: someone is served worse
    assert summary["client_accuracy_std"] == pytest.approx(np.nanstd(expected), abs=1e-6)
