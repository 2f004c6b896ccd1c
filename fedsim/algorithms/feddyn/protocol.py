"""FedDyn's protocol (Acar et al., ICLR 2021, arXiv 2111.04263): the model down, the local models up.

    down  ARRAYS_KEY   ArrayRecord: the server model theta^{t-1} (parameters and BatchNorm buffers)
          CONFIG_KEY   ConfigRecord {alpha, local-epochs, local-lr, ...}: the weight of the dynamic regularizer
                       and the round's local training (``LocalTraining``); the client uses what it reads
    up    ARRAYS_KEY   ArrayRecord: the mean of the local models theta_k^t of the clients the reply covers
          METRICS_KEY  MetricRecord {num-examples, clients, train_loss}

Each client keeps, in its state (``STATE_KEY``, float64, from zero), g_k = grad L_k(theta_k^{t-1}), the gradient
of its loss at its previous local model, and minimizes L_k(theta) - <g_k, theta> + (alpha/2) ||theta -
theta^{t-1}||^2. The server keeps h and updates h <- h - (alpha/m) sum_k (theta_k^t - theta^{t-1}) (m: all
clients), theta^t = mean_k theta_k^t - h / alpha (Algorithm 1). A reply's model is a mean over clients, so a node
serving several combines them exactly. The wire form is ``fedsim.frameworks.model_rounds_protocol``'s. The server
part is ``fedsim.strategies.feddyn``, the client part ``fedsim.clients.feddyn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.fedavg.protocol import FedAvgParams
from fedsim.averaging import average_factors, weighted_average
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import (
    LocalTraining,
    model_reply,
    model_request,
    parse_model_reply,
    parse_model_request,
)
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy

ALPHA_KEY = "alpha"
STATE_KEY = "feddyn.gradient"  # the client's own g_k in env.state


@dataclass
class FedDynParams(FedAvgParams):
    alpha: float = 0.01  # the official code's default (the paper searches 0.1, 0.01, 0.001)

    _parameter_constraints = {"alpha": [Interval(0, None, closed="neither")]}


@dataclass
class Reply:
    model: dict[str, np.ndarray]
    num_examples: int
    clients: int
    loss: float


def request(model: dict[str, np.ndarray], alpha: float, training: LocalTraining) -> RecordDict:
    """The server's message: theta^{t-1}, alpha and the round's local training."""
    return model_request(model, {ALPHA_KEY: float(alpha), **training.to_config()})


def parse_request(content: RecordDict) -> tuple[dict[str, np.ndarray], float, LocalTraining]:
    """(theta^{t-1} as read-only views, alpha, the local training to run)."""
    model, config = parse_model_request(content)
    return model, float(config[ALPHA_KEY]), LocalTraining.from_config(config)


def reply(model: dict[str, np.ndarray], num_examples: int, clients: int, loss: float) -> RecordDict:
    """The mean model of the reply's clients, their examples, how many they are, their mean training loss."""
    return model_reply(model, num_examples, loss, clients=clients)


def parse_reply(content: RecordDict) -> Reply:
    r = parse_model_reply(content)
    return Reply(r.arrays, r.num_examples, r.clients, r.loss)


def merge(parsed: Sequence[Reply]) -> Reply:
    """Replies as one: models averaged over clients, loss weighted by examples."""
    model = weighted_average([r.model for r in parsed], [r.clients for r in parsed])
    factors = average_factors(len(parsed), [r.num_examples for r in parsed])
    loss = float(sum(f * r.loss for f, r in zip(factors, parsed)))
    return Reply(model, sum(r.num_examples for r in parsed), sum(r.clients for r in parsed), loss)


def combine(replies: list[RecordDict]) -> RecordDict:
    """A node's ``reduce``."""
    m = merge([parse_reply(r) for r in replies])
    return reply(m.model, m.num_examples, m.clients, m.loss)


def _check(config) -> None:  # noqa: ANN001
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for feddyn")


register_strategy(StrategySpec(
    name="feddyn", params=FedDynParams, server="fedsim.strategies.feddyn:FedDynServer",
    client="fedsim.clients.feddyn:FedDynClient", check=_check, reducible=True,
    description="FedDyn (Acar et al. 2021): local dynamic regularizer from the client's state, server correction",
))
