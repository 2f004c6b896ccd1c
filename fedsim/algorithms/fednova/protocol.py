"""FedNova's protocol (Wang et al., NeurIPS 2020, arXiv 2007.07481): normalized averaging of local updates.

    down  ARRAYS_KEY   ArrayRecord: the global model x (parameters and BatchNorm buffers)
          CONFIG_KEY   ConfigRecord: the round's local training (``LocalTraining``: epochs, lr, momentum, ...)
    up    UPDATE_KEY   ArrayRecord: d = sum_i (n_i / n) d_i over the clients the reply covers, where
                       d_i = (x - y_i) / ||a_i||_1 is client i's normalized cumulative update (trainable parameters)
          BUFFERS_KEY  ArrayRecord: the example-weighted mean of the clients' buffers (BatchNorm statistics)
          METRICS_KEY  MetricRecord {num-examples, clients, train_loss, steps, norm}: n, the number of clients,
                       and the example-weighted means of the loss, of tau_i (local steps) and of ||a_i||_1

Client i runs tau_i local SGD steps from x (tau_i = epochs * ceil(n_i / batch size) grows with its data at fixed
epochs), so x - y_i = lr * sum_k a_{i,k} g_{i,k}; ||a_i||_1 = tau_i for plain SGD and
sum_{k=1..tau_i} (1 - rho^k) / (1 - rho) under heavy-ball momentum rho (the paper's momentum variant;
``momentum_steps``). The server (p_i = n_i / sum n over the answering clients):

    tau_eff = sum_i p_i ||a_i||_1,     x <- x - tau_eff * sum_i p_i d_i

With equal ||a_i||_1 this is FedAvg (x <- sum_i p_i y_i); with unequal ones it removes FedAvg's bias towards the
clients that ran more steps (the objective inconsistency). Every reply field is an example-weighted mean, so a
node serving several clients combines them exactly (``combine``). The server part is ``fedsim.strategies.fednova``,
the client part ``fedsim.clients.fednova``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedsim.algorithms.fedavg.protocol import FedAvgParams
from fedsim.averaging import average_factors, weighted_average
from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import (
    CLIENTS_KEY,
    LOSS_KEY,
    METRICS_KEY,
    WEIGHT_KEY,
    LocalTraining,
    finite,
    model_request,
    parse_model_request,
)
from fedsim.registry import StrategySpec, register_strategy

UPDATE_KEY = "update"
BUFFERS_KEY = "buffers"
STEPS_KEY = "steps"  # tau_i (example-weighted mean over the reply's clients)
NORM_KEY = "norm"  # ||a_i||_1 (example-weighted mean over the reply's clients)


@dataclass
class FedNovaParams(FedAvgParams):
    """FedNova's server: FedAvg's client sampling (``fraction_train``); the local steps come from ``[client]``."""


@dataclass
class Reply:
    """A parsed reply: example-weighted means over its clients of d_i, the buffers, tau_i and ||a_i||_1."""

    update: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    num_examples: int
    clients: int
    loss: float
    steps: float
    norm: float


def request(model: dict[str, np.ndarray], training: LocalTraining) -> RecordDict:
    """The server's message: the global model x and the round's local training."""
    return model_request(model, training.to_config())


def parse_request(content: RecordDict) -> tuple[dict[str, np.ndarray], LocalTraining]:
    """(x as read-only views, the local training to run)."""
    model, config = parse_model_request(content)
    return model, LocalTraining.from_config(config)


def reply(update: dict[str, np.ndarray], buffers: dict[str, np.ndarray], num_examples: int, clients: int,
          loss: float, steps: float, norm: float) -> RecordDict:
    return RecordDict({UPDATE_KEY: to_record(update), BUFFERS_KEY: to_record(buffers),
                       METRICS_KEY: MetricRecord({WEIGHT_KEY: int(num_examples), CLIENTS_KEY: int(clients),
                                                  LOSS_KEY: finite(loss), STEPS_KEY: float(steps),
                                                  NORM_KEY: float(norm)})})


def parse_reply(content: RecordDict) -> Reply:
    metrics = content[METRICS_KEY]
    return Reply(from_record(content[UPDATE_KEY]), from_record(content[BUFFERS_KEY]), int(metrics[WEIGHT_KEY]),
                 int(metrics[CLIENTS_KEY]), float(metrics[LOSS_KEY]), float(metrics[STEPS_KEY]),
                 float(metrics[NORM_KEY]))


def merge(parsed: Sequence[Reply]) -> Reply:
    """Replies as one: every field the example-weighted mean (p_i = n_i / sum n), so merging is exact."""
    weights = [r.num_examples for r in parsed]
    f = average_factors(len(parsed), weights)
    update = weighted_average([r.update for r in parsed], weights)
    buffers = weighted_average([r.buffers for r in parsed], weights) if parsed[0].buffers else {}
    return Reply(update, buffers, sum(weights), sum(r.clients for r in parsed),
                 float(sum(w * r.loss for w, r in zip(f, parsed))), float(sum(w * r.steps for w, r in zip(f, parsed))),
                 float(sum(w * r.norm for w, r in zip(f, parsed))))


def combine(replies: list[RecordDict]) -> RecordDict:
    """A node's ``reduce``: its clients' replies as one reply."""
    m = merge([parse_reply(r) for r in replies])
    return reply(m.update, m.buffers, m.num_examples, m.clients, m.loss, m.steps, m.norm)


def _check(config) -> None:  # noqa: ANN001
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for fednova")
    if config.client.optimizer != "sgd":
        raise ConfigError(f"client.optimizer: {config.client.optimizer!r} does not suit FedNova, whose normalizer "
                          "||a_i||_1 counts the weights SGD puts on its gradients; use 'sgd'")


register_strategy(StrategySpec(
    name="fednova", params=FedNovaParams, server="fedsim.strategies.fednova:FedNovaServer",
    client="fedsim.clients.fednova:FedNovaClient", check=_check, reducible=True,
    description="FedNova (Wang et al. 2020): local updates normalized by their steps, averaged, scaled by tau_eff",
))
