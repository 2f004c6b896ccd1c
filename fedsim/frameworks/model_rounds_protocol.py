"""The wire form of "a model in a message", shared by every strategy that trains a model over rounds.

    down  ARRAYS_KEY   ArrayRecord: the global model (parameters and BatchNorm buffers)
          CONFIG_KEY   ConfigRecord: the round's local training (``LocalTraining``: epochs, batch size, learning
                       rate, momentum, weight decay, optimizer) and whatever the algorithm adds (FedProx's mu, ...)
    up    ARRAYS_KEY   ArrayRecord: the client's model (or what the algorithm sends in its place)
          METRICS_KEY  MetricRecord {num-examples, train_loss[, clients]}

or, for the algorithms whose clients send what local training moved instead of the model (FedNova, FedBuff,
plug-ins such as FedExP; ``update_reply``):

    up    UPDATE_KEY   ArrayRecord: the update on the trainable parameters (its sign and scale the algorithm's)
          BUFFERS_KEY  ArrayRecord: the buffers (BatchNorm statistics), which SGD does not move
          METRICS_KEY  MetricRecord {num-examples, clients, train_loss, <the algorithm's per-client numbers>}

The keys are the defaults of Flower's ``flwr.serverapp.strategy.FedAvg`` (``arrayrecord_key``,
``configrecord_key``, ``weighted_by_key``), so Flower's own strategies and fedsim's model-rounds loop
(``fedsim.frameworks.model_rounds``) speak the same messages. Everything a client needs for a round travels in the
request: a client part reads ``LocalTraining.from_config`` and never the scenario's ``[client]`` table, so the server
decides what each round asks for.

``MODEL_CODEC`` is how the engine reads and writes the model in such a reply (``StrategySpec.model_codec``; the
byzantine clients of ``simulation.byzantine_fraction`` rewrite it). This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim.averaging import average_factors, weighted_average
from fedsim.codec import from_record, to_record

__all__ = ["ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "WEIGHT_KEY", "LOSS_KEY", "CLIENTS_KEY", "LocalTraining",
           "ModelReply", "model_request", "parse_model_request", "model_reply", "parse_model_reply", "reply_weight",
           "finite", "momentum_steps", "ArraysCodec", "MODEL_CODEC", "UPDATE_KEY", "BUFFERS_KEY", "training_request",
           "parse_training_request", "UpdateReply", "update_reply", "parse_update_reply", "merge_update_replies",
           "combine_update_replies"]

ARRAYS_KEY = "arrays"  # Flower FedAvg's arrayrecord_key
CONFIG_KEY = "config"  # Flower FedAvg's configrecord_key
METRICS_KEY = "metrics"  # the reply's MetricRecord
WEIGHT_KEY = "num-examples"  # Flower FedAvg's weighted_by_key
LOSS_KEY = "train_loss"  # Flower's QFedAvg train_loss_key
CLIENTS_KEY = "clients"  # how many clients a (pre-combined) reply covers
UPDATE_KEY = "update"  # an update reply's ArrayRecord of the trainable parameters
BUFFERS_KEY = "buffers"  # an update reply's ArrayRecord of the buffers

_PREFIX = "local-"  # LocalTraining's keys in the train ConfigRecord: local-epochs, local-lr, ...


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local SGD is, as the server asks for it (``fedsim.nn.training.train_epochs``'s arguments).

    The server builds it from the scenario (``from_settings(config.client)``), the request carries it
    (``to_config``), the client reads it back (``from_config``) and trains with ``train_kwargs()``.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"

    @classmethod
    def from_settings(cls, client: Any) -> LocalTraining:
        """From the scenario's ``[client]`` table (``fedsim.config.ClientConfig``); values kept as they are."""
        return cls(client.epochs, client.batch_size, client.lr, client.momentum, client.weight_decay,
                   client.optimizer)

    def to_config(self) -> dict[str, int | float | str]:
        """The ConfigRecord entries (``local-epochs``, ``local-batch-size``, ...) a request carries."""
        return {_PREFIX + name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> LocalTraining:
        """Back from a request's ConfigRecord; a request without them is a server that forgot to send them."""
        names = [f for f in cls.__dataclass_fields__]
        missing = [_PREFIX + n.replace("_", "-") for n in names if _PREFIX + n.replace("_", "-") not in record]
        if missing:
            raise KeyError(f"the train request carries no local training settings ({', '.join(missing)}); the "
                           "server part must send LocalTraining.to_config() in its ConfigRecord")
        v = {n: record[_PREFIX + n.replace("_", "-")] for n in names}
        return cls(int(v["epochs"]), int(v["batch_size"]), float(v["lr"]), float(v["momentum"]),
                   float(v["weight_decay"]), str(v["optimizer"]))

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``fedsim.nn.training.train_epochs``."""
        return asdict(self)


def momentum_steps(steps: int, momentum: float) -> float:
    """How far ``steps`` heavy-ball SGD steps (torch's SGD, no dampening, fresh buffer) move under a constant unit
    gradient, in units of the learning rate: sum_{k=1..K} (1 - beta^k) / (1 - beta), K for plain SGD.

    It is ||a||_1 of the weights a local run puts on its gradients, x - y = lr * sum_k a_k g_k (FedNova's
    normalizer, Wang et al. 2020) and, times lr, SCAFFOLD's K eta_l under momentum.
    """
    if momentum == 0:
        return float(steps)
    k = np.arange(1, steps + 1, dtype=np.float64)
    return float(np.sum((1.0 - momentum ** k) / (1.0 - momentum)))


@dataclass
class ModelReply:
    """A parsed model reply: arrays (read-only views), examples, mean training loss, clients covered."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    loss: float
    clients: int = 1


def finite(value: float) -> float:
    """``value`` as a float, 0 where it is not finite (a client that trained nothing reports NaN)."""
    value = float(value)
    return value if math.isfinite(value) else 0.0


def model_request(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> RecordDict:
    """The server's message: the model, the ConfigRecord ``config`` (when given), then ``extra`` records."""
    content = RecordDict({ARRAYS_KEY: to_record(dict(arrays))})
    if config is not None:
        content[CONFIG_KEY] = ConfigRecord(dict(config))
    for key, record in (extra or {}).items():
        content[key] = record
    return content


def parse_model_request(content: RecordDict) -> tuple[dict[str, np.ndarray], ConfigRecord]:
    """(model arrays as read-only views, the ConfigRecord; empty where none was sent)."""
    return from_record(content[ARRAYS_KEY]), content.config_records.get(CONFIG_KEY) or ConfigRecord()


def model_reply(arrays: Mapping[str, np.ndarray], num_examples: int, loss: float, *, clients: int | None = None,
                metrics: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None) -> RecordDict:
    """A client's answer: its model, example count (FedAvg's weight), mean training loss (0 if not finite), the
    clients it covers (where the algorithm combines replies), further ``metrics`` and ``extra`` records."""
    values: dict[str, int | float] = {WEIGHT_KEY: int(num_examples)}
    if clients is not None:
        values[CLIENTS_KEY] = int(clients)
    values[LOSS_KEY] = finite(loss)
    values.update(metrics or {})
    content = RecordDict({ARRAYS_KEY: to_record(dict(arrays))})
    for key, record in (extra or {}).items():
        content[key] = record
    content[METRICS_KEY] = MetricRecord(values)
    return content


def parse_model_reply(content: RecordDict) -> ModelReply:
    """A reply of ``model_reply``, its arrays as read-only views."""
    metrics = content[METRICS_KEY]
    return ModelReply(from_record(content[ARRAYS_KEY]), int(metrics[WEIGHT_KEY]), float(metrics[LOSS_KEY]),
                      int(metrics.get(CLIENTS_KEY, 1)))


def training_request(model: Mapping[str, np.ndarray], training: LocalTraining) -> RecordDict:
    """The server's message of a round of local training: the global model and ``training``."""
    return model_request(model, training.to_config())


def parse_training_request(content: RecordDict) -> tuple[dict[str, np.ndarray], LocalTraining]:
    """(the global model as read-only views, the local training to run) of a ``training_request``."""
    model, config = parse_model_request(content)
    return model, LocalTraining.from_config(config)


@dataclass
class UpdateReply:
    """A parsed ``update_reply``: example-weighted means over the clients it covers of the update, the buffers,
    the training loss and the algorithm's per-client numbers (``extra``: FedNova's steps and norm, ...)."""

    update: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    num_examples: int
    clients: int
    loss: float
    extra: dict[str, float] = field(default_factory=dict)


def update_reply(update: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray], num_examples: int,
                 loss: float, *, clients: int = 1, extra: Mapping[str, float] | None = None) -> RecordDict:
    """A client's (or a node's combined) update: see the module docstring. A loss that is not finite is sent as 0."""
    values: dict[str, int | float] = {WEIGHT_KEY: int(num_examples), CLIENTS_KEY: int(clients), LOSS_KEY: finite(loss)}
    values.update({key: float(value) for key, value in (extra or {}).items()})
    return RecordDict({UPDATE_KEY: to_record(dict(update)), BUFFERS_KEY: to_record(dict(buffers)),
                       METRICS_KEY: MetricRecord(values)})


def parse_update_reply(content: RecordDict, extra: Sequence[str] = ()) -> UpdateReply:
    """An ``update_reply`` with the per-client numbers named in ``extra`` (a missing one is a KeyError)."""
    metrics = content[METRICS_KEY]
    return UpdateReply(from_record(content[UPDATE_KEY]), from_record(content[BUFFERS_KEY]), int(metrics[WEIGHT_KEY]),
                       int(metrics[CLIENTS_KEY]), float(metrics[LOSS_KEY]),
                       {key: float(metrics[key]) for key in extra})


def merge_update_replies(parsed: Sequence[UpdateReply]) -> UpdateReply:
    """Replies as one: every field the example-weighted mean (p_i = n_i / sum n), so merging is exact (merging
    merged replies equals merging their clients'); examples and clients add up."""
    weights = [r.num_examples for r in parsed]
    f = average_factors(len(parsed), weights)
    update = weighted_average([r.update for r in parsed], weights)
    buffers = weighted_average([r.buffers for r in parsed], weights) if parsed[0].buffers else {}
    extra = {key: float(sum(w * r.extra[key] for w, r in zip(f, parsed))) for key in parsed[0].extra}
    return UpdateReply(update, buffers, sum(weights), sum(r.clients for r in parsed),
                       float(sum(w * r.loss for w, r in zip(f, parsed))), extra)


def combine_update_replies(replies: list[RecordDict], extra: Sequence[str] = ()) -> RecordDict:
    """A node's ``reduce`` for update replies: its clients' replies as one (``merge_update_replies``)."""
    m = merge_update_replies([parse_update_reply(r, extra) for r in replies])
    return update_reply(m.update, m.buffers, m.num_examples, m.loss, clients=m.clients, extra=m.extra)


def reply_weight(content: RecordDict) -> tuple[float, float]:
    """(number of examples, training loss) of a reply, without touching its arrays."""
    metrics = content[METRICS_KEY]
    return float(metrics[WEIGHT_KEY]), float(metrics.get(LOSS_KEY, 0.0))


class ArraysCodec:
    """Reads and writes the model of a message stored as one ArrayRecord under ``key`` (a ``ModelCodec``, see
    ``fedsim.engine.parts``): what a spec declares as ``model_codec`` so the engine can rewrite a model reply."""

    def __init__(self, key: str = ARRAYS_KEY) -> None:
        self.key = key

    def read(self, content: RecordDict) -> dict[str, np.ndarray] | None:
        """The model in ``content`` (read-only views), None where it holds none."""
        return from_record(content[self.key]) if self.key in content.array_records else None

    def write(self, content: RecordDict, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the model in ``content``, in place."""
        content[self.key] = to_record(dict(arrays))

    def __repr__(self) -> str:
        return f"ArraysCodec({self.key!r})"


MODEL_CODEC = ArraysCodec()
