"""FedBuff's protocol (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022,
arXiv 2106.06639): the messages, the staleness weight and the buffered server step.

    down  ARRAYS_KEY   ArrayRecord: the global model x (parameters and buffers)
          CONFIG_KEY   ConfigRecord: the local training (``LocalTraining``: epochs, batch size, lr, ...)
    up    UPDATE_KEY   ArrayRecord: Delta_i = x - y_i on the trainable parameters (y_i: the client's trained model)
          BUFFERS_KEY  ArrayRecord: y_i's buffers (BatchNorm running statistics)
          METRICS_KEY  MetricRecord {num-examples, clients, train_loss} (``update_reply``, one client per reply)

Server (the paper's Algorithm 1): each arriving update, computed from the model of version v_i, is weighted by
s(tau_i) = 1 / sqrt(1 + tau_i), tau_i = (server version at arrival) - v_i, and summed into a buffer; after K
arrivals, x <- x - eta_g * (1/K) sum_i s(tau_i) Delta_i and the version advances. The buffers (not learned) take
the plain mean of the K clients' (eta_g and s(tau) would move a running variance below zero). This module imports
no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.averaging import weighted_average
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import (
    BUFFERS_KEY,
    UPDATE_KEY,
    UpdateReply,
    parse_training_request,
    parse_update_reply,
    training_request,
    update_reply,
)
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

__all__ = ["UPDATE_KEY", "BUFFERS_KEY", "STALENESS", "FedBuffParams", "staleness_weight", "request", "parse_request",
           "reply", "parse_reply", "server_step", "UpdateReply"]

STALENESS = ("sqrt", "none")


@dataclass
class FedBuffParams:
    """FedBuff's server. A scenario's ``rounds`` counts server updates (one per K arrivals). It runs on the
    simulated clock: without a ``[system]`` section, on the default fleet (``fedsim.config.SystemConfig()``)."""

    buffer_size: int = 10  # K, arrivals per server update (the paper's main setting)
    concurrency: int | None = None  # clients training at any time (each arrival starts a new one); None: all
    server_lr: float = 1.0  # eta_g
    staleness: str = "sqrt"  # "sqrt": s(tau) = 1 / sqrt(1 + tau) (the paper's); "none": s = 1

    _parameter_constraints = {"buffer_size": [Interval(1, None, integer=True)],
                              "concurrency": [Interval(1, None, integer=True), None],
                              "server_lr": [Interval(0, None, closed="neither")],
                              "staleness": [Options(STALENESS)]}


def staleness_weight(tau: int, kind: str = "sqrt") -> float:
    """s(tau): 1 / sqrt(1 + tau) (FedBuff's polynomial staleness scaling), or 1."""
    if tau < 0:
        raise ValueError(f"staleness {tau} < 0: an update cannot come from a later model")
    return 1.0 / math.sqrt(1.0 + tau) if kind == "sqrt" else 1.0


request = training_request  # the global model x and the round's local training
parse_request = parse_training_request  # (x as read-only views, the local training to run)


def reply(delta: dict[str, np.ndarray], buffers: dict[str, np.ndarray], num_examples: int,
          loss: float) -> RecordDict:
    """A client's Delta_i, buffers, examples and training loss."""
    return update_reply(delta, buffers, num_examples, loss)


parse_reply = parse_update_reply  # its ``update`` is Delta_i


def server_step(model: dict[str, np.ndarray], updates: Sequence[UpdateReply], staleness: Sequence[int],
                server_lr: float, kind: str = "sqrt") -> dict[str, np.ndarray]:
    """x - eta_g * (1/K) sum_i s(tau_i) Delta_i on the trainable parameters (float64, back in their dtype); the
    buffers the plain mean of the updates' (integer counters rounded)."""
    weights = [staleness_weight(int(t), kind) for t in staleness]
    out = dict(model)
    for key in updates[0].update:
        x = np.asarray(model[key], dtype=np.float64)
        step = sum(w * np.asarray(u.update[key], dtype=np.float64) for w, u in zip(weights, updates)) / len(updates)
        out[key] = (x - server_lr * step).astype(np.asarray(model[key]).dtype)
    if updates[0].buffers:
        mean = weighted_average([u.buffers for u in updates])
        for key, value in mean.items():
            dtype = np.asarray(model[key]).dtype
            out[key] = np.asarray(value if np.issubdtype(dtype, np.floating) else np.rint(value), dtype=dtype)
    return out


def _check(config) -> None:  # noqa: ANN001
    p = config.strategy.params
    if config.system is not None and config.system.over_selection != 1.0:
        raise ConfigError(f"system.over_selection: {config.system.over_selection} does not suit fedbuff, which "
                          "keeps every arrival (concurrency sets how many train); use 1")
    if p.concurrency is not None and p.concurrency > config.num_clients:
        raise ConfigError(f"strategy.concurrency: {p.concurrency} clients cannot train at once among "
                          f"{config.num_clients}; it must be <= partition.num_clients")
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for fedbuff")


register_strategy(StrategySpec(
    name="fedbuff", params=FedBuffParams, server="fedsim.strategies.fedbuff:FedBuffServer",
    client="fedsim.clients.fedbuff:FedBuffClient", check=_check,
    description="FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation, staleness 1/sqrt(1+tau), "
                "on the simulated clock",
))
