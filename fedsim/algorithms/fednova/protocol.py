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

from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.fedavg.protocol import FedAvgParams
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import (
    BUFFERS_KEY,
    UPDATE_KEY,
    UpdateReply,
    combine_update_replies,
    merge_update_replies,
    parse_training_request,
    parse_update_reply,
    training_request,
    update_reply,
)
from fedsim.registry import StrategySpec, register_strategy

__all__ = ["UPDATE_KEY", "BUFFERS_KEY", "STEPS_KEY", "NORM_KEY", "FedNovaParams", "request", "parse_request", "reply",
           "parse_reply", "merge", "combine"]

STEPS_KEY = "steps"  # tau_i (example-weighted mean over the reply's clients)
NORM_KEY = "norm"  # ||a_i||_1 (example-weighted mean over the reply's clients)


@dataclass
class FedNovaParams(FedAvgParams):
    """FedNova's server: FedAvg's client sampling (``fraction_train``); the local steps come from ``[client]``."""


EXTRA = (STEPS_KEY, NORM_KEY)

request = training_request  # the global model x and the round's local training
parse_request = parse_training_request  # (x as read-only views, the local training to run)


def reply(update: dict[str, np.ndarray], buffers: dict[str, np.ndarray], num_examples: int, clients: int,
          loss: float, steps: float, norm: float) -> RecordDict:
    return update_reply(update, buffers, num_examples, loss, clients=clients, extra={STEPS_KEY: steps, NORM_KEY: norm})


def parse_reply(content: RecordDict) -> UpdateReply:
    """The reply; ``extra`` holds tau_i (``STEPS_KEY``) and ||a_i||_1 (``NORM_KEY``)."""
    return parse_update_reply(content, EXTRA)


merge = merge_update_replies  # replies as one: every field the example-weighted mean, so merging is exact


def combine(replies: list[RecordDict]) -> RecordDict:
    """A node's ``reduce``: its clients' replies as one reply."""
    return combine_update_replies(replies, EXTRA)


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
