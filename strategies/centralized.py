"""Centralized training: one client holding the whole training set; the upper bound every report needs.

It is FedAvg with a single client (``partition.num_clients`` is forced to 1, iid), so the same model, optimizer,
epochs and evaluation are used and only the data distribution differs. Each round is ``client.epochs`` epochs.
"""

from __future__ import annotations

import copy

from clients.sgd import SGDClient
from fedsim.engine import StrategySpec, register_strategy
from strategies.fedavg import FedAvgParams, FedAvgServer, _check_trainable


def _one_client(tree: dict) -> dict:
    tree = copy.deepcopy(tree)
    partition = tree.setdefault("partition", {})
    partition.update({"kind": "iid", "num_clients": 1})
    tree.setdefault("simulation", {})["clients_per_node"] = 1
    return tree


register_strategy(StrategySpec(
    name="centralized", params=FedAvgParams, server=FedAvgServer, client=SGDClient, check=_check_trainable,
    prepare=_one_client,
    description="Centralized training: one client with all the data (upper bound); partition forced to 1 client",
))
