"""SCAFFOLD's protocol (Karimireddy et al., ICML 2020, arXiv 1910.06378): the model and the control variates.

    down  ARRAYS_KEY   ArrayRecord: the global model x (parameters and BatchNorm buffers)
          CONFIG_KEY   ConfigRecord: the round's local training (``LocalTraining``: epochs, lr, ...)
          CONTROL_KEY  ArrayRecord: the server control variate c, one array per trainable parameter
    up    ARRAYS_KEY   ArrayRecord: the mean of the local models y_i of the clients the reply covers
          CONTROL_KEY  ArrayRecord: the sum of their control updates c_i^+ - c_i
          METRICS_KEY  MetricRecord {num-examples, clients, train_loss}

Each client keeps its own control variate c_i in its state (``STATE_KEY``, float64), from zero. The server
averages the y_i uniformly over the sampled clients that answered (Algorithm 1: (1/|S|) sum), and adds
(1/N) sum of the control updates to c. Both are a mean over clients and a sum, so a node serving several clients
combines their replies exactly (``combine``: the mean weighted by the number of clients each reply covers).
The model travels in the shared wire form of ``fedsim.frameworks.model_rounds_protocol``; the spec declares no
model codec, so ``simulation.byzantine_fraction`` is refused (a byzantine client would also have to forge its
control update). The server part is ``fedsim.strategies.scaffold``, the client part ``fedsim.clients.scaffold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.fedavg.protocol import FedAvgParams
from fedsim.averaging import average_factors, weighted_average
from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import (
    LocalTraining,
    model_reply,
    model_request,
    parse_model_reply,
    parse_model_request,
)
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

CONTROL_KEY = "control"
STATE_KEY = "scaffold.control"  # the client's own c_i in env.state
CONTROL_UPDATES = ("II", "I")


@dataclass
class ScaffoldParams(FedAvgParams):
    server_learning_rate: float = 1.0  # eta_g: x <- x + eta_g * mean(y_i - x)
    # II: c_i+ = c_i - c + (x - y_i) / (K eta_l) (the paper's cheaper option, used in its experiments);
    # I: c_i+ = the gradient of the client's loss at x, over its whole partition (one extra pass)
    control_update: str = "II"

    _parameter_constraints = {"server_learning_rate": [Interval(0, None, closed="neither")],
                              "control_update": [Options(CONTROL_UPDATES)]}


@dataclass
class Reply:
    """A parsed reply: the mean model of its clients, the sum of their control updates, examples, clients, loss."""

    model: dict[str, np.ndarray]
    control: dict[str, np.ndarray]
    num_examples: int
    clients: int
    loss: float


def request(model: dict[str, np.ndarray], control: dict[str, np.ndarray], training: LocalTraining) -> RecordDict:
    """The server's message: the global model x, the round's local training and the control variate c."""
    return model_request(model, training.to_config(), {CONTROL_KEY: to_record(control)})


def parse_request(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], LocalTraining]:
    """(x, c) as read-only views, and the local training to run."""
    model, config = parse_model_request(content)
    return model, from_record(content[CONTROL_KEY]), LocalTraining.from_config(config)


def reply(model: dict[str, np.ndarray], control: dict[str, np.ndarray], num_examples: int, clients: int,
          loss: float) -> RecordDict:
    """The mean model of the reply's clients, the sum of their control updates, examples, clients, loss."""
    return model_reply(model, num_examples, loss, clients=clients, extra={CONTROL_KEY: to_record(control)})


def parse_reply(content: RecordDict) -> Reply:
    r = parse_model_reply(content)
    return Reply(r.arrays, from_record(content[CONTROL_KEY]), r.num_examples, r.clients, r.loss)


def merge(parsed: Sequence[Reply]) -> Reply:
    """Replies as one: models averaged over clients, control updates summed, loss weighted by examples."""
    model = weighted_average([r.model for r in parsed], [r.clients for r in parsed])
    first = parsed[0].control
    control = {k: np.sum([np.asarray(r.control[k], dtype=np.float64) for r in parsed], axis=0).astype(first[k].dtype)
               for k in first}
    factors = average_factors(len(parsed), [r.num_examples for r in parsed])
    loss = float(sum(f * r.loss for f, r in zip(factors, parsed)))
    return Reply(model, control, sum(r.num_examples for r in parsed), sum(r.clients for r in parsed), loss)


def combine(replies: list[RecordDict]) -> RecordDict:
    """A node's ``reduce``: its clients' replies as one reply."""
    m = merge([parse_reply(r) for r in replies])
    return reply(m.model, m.control, m.num_examples, m.clients, m.loss)


def _check(config) -> None:  # noqa: ANN001
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for scaffold")
    if config.client.optimizer != "sgd" and config.strategy.params.control_update == "II":
        raise ConfigError(f"client.optimizer: {config.client.optimizer!r} does not suit SCAFFOLD's option II, "
                          "which reads the average corrected gradient off the SGD steps; use 'sgd' or "
                          "strategy.control_update = 'I'")


register_strategy(StrategySpec(
    name="scaffold", params=ScaffoldParams, server="fedsim.strategies.scaffold:ScaffoldServer",
    client="fedsim.clients.scaffold:ScaffoldClient", check=_check, reducible=True,
    description="SCAFFOLD (Karimireddy et al. 2020): local steps corrected by control variates c - c_i (client "
                "state)",
))
