"""clients.csv: the per-round, per-client table the engine writes for every federated strategy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsim.config import config_from_dict
from fedsim.engine.node import EXAMPLES_METRIC, TRAIN_LOSS_METRIC, reported_metrics
from fedsim.engine.runner import run_scenario
from fedsim.frameworks.model_rounds_protocol import LOSS_KEY, WEIGHT_KEY
from fedsim.results.client_metrics import CLIENT_COLUMNS, ClientLedger
from fedsim.scenario import partition_for


def test_node_reads_flower_s_metric_keys_from_any_record():
    assert (EXAMPLES_METRIC, TRAIN_LOSS_METRIC) == (WEIGHT_KEY, LOSS_KEY)  # the protocols' own keys
    reply = RecordDict({"model.3": ArrayRecord(), "meta.3": MetricRecord({"num-examples": 17, "train_loss": 0.5})})
    assert reported_metrics(reply) == (17, 0.5)
    examples, loss = reported_metrics(RecordDict({"afl.metrics": MetricRecord({"num-examples": 9})}))
    assert examples == 9 and math.isnan(loss)  # analytic: no train loss
    examples, loss = reported_metrics(RecordDict({"metrics": MetricRecord({"num-examples": 0, "train_loss": 0.0})}))
    assert examples == 0 and math.isnan(loss)  # an empty client's 0.0 is no loss
    examples, loss = reported_metrics(RecordDict({"stats": ArrayRecord()}))
    assert examples == -1 and math.isnan(loss)


def test_ledger_rows_and_cached_rendering():
    ledger = ClientLedger()
    ledger.measured(0, "label_mix_accuracy", np.array([0.5, np.nan]))
    ledger.sent(1, [0, 1], 100)
    ledger.replied(1, {"partition_ids": [0], "failed_ids": [1], "client_bytes": [40], "client_examples": [7],
                       "client_train_loss": [1.25]})
    ledger.sent(2, [1], 100)
    ledger.lost(2, [1], silent=True)
    first = ledger.csv()
    assert first == ledger.frame().to_csv(index=False)
    table = ledger.frame()
    assert list(table.columns) == CLIENT_COLUMNS + ["label_mix_accuracy"]
    assert table[["round", "client"]].values.tolist() == [[0, 0], [1, 0], [1, 1], [2, 1]]
    row = table.iloc[1]
    assert (row.selected, row.samples, row.train_loss, row.bytes_up, row.bytes_down, row.failed) == \
        (True, 7, 1.25, 40, 100, False)
    assert table.iloc[2].failed and not table.iloc[2].silent and pd.isna(table.iloc[2].samples)
    assert table.iloc[3].failed and table.iloc[3].silent
    ledger.measured(2, "local_accuracy", np.array([np.nan, 0.25]))  # a new column: every round rendered again
    ledger.measured(2, "local_accuracy", np.array([np.nan, 0.75]), only_missing=True)  # kept: measured already
    assert ledger.csv(test_samples=[3, 4]) == ledger.frame(test_samples=[3, 4]).to_csv(index=False)
    assert ledger.frame()["local_accuracy"].iloc[-1] == 0.25


def _fedavg(tmp_path, name: str, **simulation):
    config = config_from_dict({
        "seed": 4, "rounds": 2,
        "data": {"name": "digits", "max_train": 400, "max_test": 200},
        "partition": {"kind": "dirichlet", "num_clients": 4, "alpha": 1.0},
        "model": {"name": "cnn", "width": 8}, "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "simulation": {"backend": "inline", "failure_rate": 0.25, **simulation}, "strategy": {"name": "fedavg"},
    })
    summary = run_scenario(config, tmp_path / name, show_progress=False)
    return config, summary, pd.read_csv(tmp_path / name / "clients.csv")


def test_fedavg_clients_csv_adds_up_to_the_run_and_is_the_same_on_grouped_nodes(tmp_path):
    config, summary, table = _fedavg(tmp_path, "single")
    parts = partition_for(config)
    assert list(table.columns) == CLIENT_COLUMNS + ["label_mix_accuracy"]  # mode "global": no local columns
    assert table[["round", "client"]].values.tolist() == [[r, k] for r in range(3) for k in range(4)]
    sent = table[table["round"] >= 1]
    assert sent["selected"].all() and not table[table["round"] == 0]["selected"].any()
    assert sent["bytes_up"].sum() == summary["bytes_up"] and sent["bytes_down"].sum() == summary["bytes_down"]
    assert sent["failed"].sum() == summary["failed_client_rounds"] == 2  # one injected failure per round
    ok, failed = sent[~sent["failed"]], sent[sent["failed"]]
    assert ok["samples"].tolist() == [len(parts[k]) for k in ok["client"]]
    assert ok["train_loss"].gt(0).all() and failed["samples"].isna().all() and (failed["bytes_up"] == 0).all()
    metrics = pd.read_csv(tmp_path / "single" / "metrics.csv")
    for r in range(3):  # the per-client values behind metrics.csv's mean and worst client
        acc = table[table["round"] == r]["label_mix_accuracy"]
        assert acc.mean() == pytest.approx(metrics["client_acc_mean"].iloc[r], abs=1e-12)
        assert acc.min() == pytest.approx(metrics["client_acc_min"].iloc[r], abs=1e-12)

    _, _, grouped = _fedavg(tmp_path, "grouped", clients_per_node=2)
    exact = [c for c in table.columns if c not in ("train_loss", "label_mix_accuracy")]
    pd.testing.assert_frame_equal(grouped[exact], table[exact])
    np.testing.assert_allclose(grouped["train_loss"], table["train_loss"], rtol=1e-5)


def test_afl_clients_csv_is_the_engine_s(tmp_path):
    config = config_from_dict({
        "seed": 0, "data": {"name": "digits", "max_train": 300, "max_test": 100},
        "partition": {"kind": "dirichlet", "num_clients": 5, "alpha": 0.5},
        "model": {"feature_map": "random", "feature_dim": 64},
        "simulation": {"backend": "inline", "failure_rate": 0.2}, "strategy": {"name": "afl"},
    })
    summary = run_scenario(config, tmp_path / "afl", show_progress=False)
    table = pd.read_csv(tmp_path / "afl" / "clients.csv")
    parts = partition_for(config)
    assert table["round"].eq(1).all() and table["client"].tolist() == list(range(5))
    answered = table[~table["failed"]]
    assert answered["client"].tolist() == sorted(set(range(5)) - set(summary["dropped_client_ids"]))
    assert answered["samples"].tolist() == [len(parts[k]) for k in answered["client"]]
    assert table["train_loss"].isna().all()  # statistics, no training loss
    assert table["bytes_up"].sum() == summary["bytes_up"]
    assert json.loads((tmp_path / "afl" / "summary.json").read_text())["answered_clients"] == len(answered)


def test_clients_the_simulated_clock_drops_are_failed_rows(tmp_path):
    """[system] deadline: the two slow phones answer (their bytes count) but miss the deadline; clients.csv marks
    them failed, as metrics.csv counts them (issue #26's clock)."""
    from test_system import digits, write_trace

    from conftest import scenario_config

    trace = write_trace(tmp_path)  # clients 0 and 3: 2-2.5 samples/s, about a minute of local training
    config = scenario_config(digits(system=f'[system]\ntrace = "{trace}"\ndeadline_s = 20'), tmp_path)
    summary = run_scenario(config, tmp_path / "deadline", show_progress=False)
    table = pd.read_csv(tmp_path / "deadline" / "clients.csv")
    sent = table[table["round"] == 1]
    assert sent.loc[sent["failed"], "client"].tolist() == [0, 3] and not sent["silent"].any()
    assert sent["failed"].sum() == summary["failed_client_rounds"] == 2
    assert (sent["bytes_up"] > 0).all() and sent["bytes_up"].sum() == summary["bytes_up"]
