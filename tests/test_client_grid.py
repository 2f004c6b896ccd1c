"""Flower's strategies on nodes serving several clients (fedsim.engine.client_grid): clients are sampled, not
nodes, and the run is the one with a node per client, bit for bit, also for the strategies whose client part has
no reduce (each client's reply reaches the aggregation as it was sent)."""

import pandas as pd
import pytest

from conftest import DIGITS, scenario_config
from fedsim.engine.runner import run_scenario

# 12 clients, half sampled a round: with 4 clients per node Flower would otherwise sample 1-2 of 3 nodes
SAMPLED = DIGITS.replace("num_clients = 6", "num_clients = 12").replace("epochs = 3", "epochs = 1") \
    + "fraction_train = 0.5\n"


def _run(tmp_path, label, *overrides):  # noqa: ANN001, ANN202
    config = scenario_config(SAMPLED, tmp_path, "simulation.failure_rate=0.2", *overrides)
    summary = run_scenario(config, tmp_path / label, show_progress=False)
    return (summary, pd.read_csv(tmp_path / label / "metrics.csv"),
            pd.read_csv(tmp_path / label / "clients.csv"))


# reducible (a node could pre-average) and not (the robust rules, q-FedAvg, DP: each client's own reply counts)
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "krum", "fedmedian", "qfedavg", "fedavg-dp-client"])
def test_grouped_nodes_sample_clients_and_equal_one_node_per_client(tmp_path, strategy):
    ref, ref_metrics, ref_clients = _run(tmp_path, "single", f"strategy.name={strategy!r}")
    summary, metrics, clients = _run(tmp_path, "grouped", f"strategy.name={strategy!r}",
                                     "simulation.clients_per_node=4")
    assert list(metrics["accuracy"]) == list(ref_metrics["accuracy"])  # the same arrays summed in the same order
    sent = clients[clients["selected"]]
    assert sorted(sent.groupby("round")["client"].count().unique()) == [6]  # 6 of 12 clients, not 1-2 nodes
    assert sent[["round", "client", "failed"]].values.tolist() == \
        ref_clients[ref_clients["selected"]][["round", "client", "failed"]].values.tolist()
    for key in ("bytes_up", "bytes_down", "failed_client_rounds"):
        assert summary[key] == ref[key], key
