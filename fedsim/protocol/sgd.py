"""The gradient baselines' protocol (FedAvg, FedProx, centralized): Flower's own FedAvg / FedProx messages.

    down  ARRAYS_KEY   ArrayRecord: the global model (parameters and BatchNorm buffers)
          CONFIG_KEY   ConfigRecord {server-round[, proximal-mu]}: FedProx's mu travels here, as Flower sends it
    up    ARRAYS_KEY   ArrayRecord: the locally trained model
          METRICS_KEY  MetricRecord {num-examples, train_loss}

The keys are the ones ``flwr.serverapp.strategy.FedAvg`` uses (its defaults), so Flower's own strategies run the
server side unchanged. The server part is ``fedsim.strategies.fedavg``, the client part ``fedsim.clients.sgd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy

ARRAYS_KEY = "arrays"  # Flower FedAvg's arrayrecord_key
CONFIG_KEY = "config"  # Flower FedAvg's configrecord_key
METRICS_KEY = "metrics"  # the reply's MetricRecord
WEIGHT_KEY = "num-examples"  # Flower FedAvg's weighted_by_key
MU_KEY = "proximal-mu"  # what Flower's FedProx.configure_train puts into the train ConfigRecord
LOSS_KEY = "train_loss"


@dataclass
class FedAvgParams:
    fraction_train: float = 1.0  # fraction of nodes sampled per round (seeded)

    _parameter_constraints = {"fraction_train": [Interval(0, 1)]}

    def check(self, path: str) -> None:
        if self.fraction_train == 0:
            raise ConfigError(f"{path}.fraction_train: 0.0 trains nobody; it must lie in (0, 1]")


@dataclass
class FedProxParams(FedAvgParams):
    proximal_mu: float = 0.01  # weight of (mu / 2) ||w - w_global||^2; sent to the clients in the train config

    _parameter_constraints = {"proximal_mu": [Interval(0, None)]}


def parse_train(content: RecordDict) -> tuple[dict[str, np.ndarray], float]:
    """(global model arrays as read-only views, proximal mu) of a train message; mu is 0 where none was sent."""
    config = content.config_records.get(CONFIG_KEY) or {}
    return from_record(content[ARRAYS_KEY]), float(config.get(MU_KEY, 0.0))


def reply(arrays: dict[str, np.ndarray], num_examples: int, train_loss: float) -> RecordDict:
    """A client's answer: its model, its example count (FedAvg's weight) and its mean training loss (0 if none)."""
    loss = float(train_loss)
    return RecordDict({ARRAYS_KEY: to_record(arrays),
                       METRICS_KEY: MetricRecord({WEIGHT_KEY: int(num_examples),
                                                  LOSS_KEY: loss if math.isfinite(loss) else 0.0})})


def parse_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], int, float]:
    """(model arrays as read-only views, number of examples, training loss) of a client's reply."""
    metrics = content[METRICS_KEY]
    return from_record(content[ARRAYS_KEY]), int(metrics[WEIGHT_KEY]), float(metrics[LOSS_KEY])


def reply_weight(content: RecordDict) -> tuple[float, float]:
    """(number of examples, training loss) of a reply, without touching its arrays."""
    metrics = content[METRICS_KEY]
    return float(metrics[WEIGHT_KEY]), float(metrics.get(LOSS_KEY, 0.0))


def _check_trainable(config) -> None:  # noqa: ANN001
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for "
                          f"{config.strategy.name}")


_CLIENT = "fedsim.clients.sgd:SGDClient"

register_strategy(StrategySpec(
    name="fedavg", params=FedAvgParams, server="fedsim.strategies.fedavg:FedAvgServer", client=_CLIENT,
    check=_check_trainable, reducible=True,
    description="FedAvg (McMahan et al. 2017): local SGD epochs, example-weighted model averaging",
))
register_strategy(StrategySpec(
    name="fedprox", params=FedProxParams, server="fedsim.strategies.fedavg:FedProxServer", client=_CLIENT,
    check=_check_trainable, reducible=True,
    description="FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 on clients",
))
register_strategy(StrategySpec(
    name="centralized", params=FedAvgParams, server="fedsim.strategies.fedavg:FedAvgServer", client=_CLIENT,
    check=_check_trainable, single_client=True, reducible=True,
    description="Centralized training: one client with all the data (upper bound); partition forced to 1 client",
))
