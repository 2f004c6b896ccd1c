"""The messages and settings every class-incremental strategy shares (torch-free): the framework's protocol.

The task loop (``fedsim.frameworks.class_incremental``) and every strategy on it (finetune, LwF, LwF + NCM, joint:
``fedsim.algorithms.cil``; DPCR: ``fedsim.algorithms.dpcr``) speak this protocol; a strategy adds its own
statistics phases (``statistics_request`` with its phase name) and parameters on top of ``CILParams`` /
``LwFParams``. Every request carries the global backbone; the phase and its settings travel in one ConfigRecord:

    train        down  ARRAYS_KEY  the global model          CONFIG_KEY {phase, loss, classes, data_classes,
                                                                         the local training (local-epochs, ...)
                                                                         [, new_classes, old_classes, lwf_lambda,
                                                                         temperature]}
                       OLD_KEY     the previous task's model (LwF only)
                 up    ARRAYS_KEY  the client's model        METRICS_KEY {num-examples, train_loss}
    <statistics> down  ARRAYS_KEY  the global model          CONFIG_KEY {phase, classes}
                       OLD_KEY     the previous model (when the strategy needs it)
                 up    STATS_KEY   additive arrays           METRICS_KEY {num-examples}

Everything a client needs for a round travels in the request (the model-rounds framework's ``LocalTraining``: the
server copies the scenario's ``[client]`` table into it), so a client never reads hyperparameters from the scenario. A statistics phase answers
with arrays that are sums over samples ("classes" excepted), so the replies of any group of clients combine by
adding them; models combine by FedAvg's example-weighted average (``fedsim.averaging.weighted_average``).
``combine`` does both for a node serving several clients, ``merge_models`` / ``merge_statistics`` for the server,
so the two agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim.averaging import average_factors, weighted_average
from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.params import Interval, Options

__all__ = [
    "ARRAYS_KEY", "CONFIG_KEY", "HEADS", "LOSSES", "METRICS_KEY", "OLD_KEY", "STATS_KEY", "TRAIN", "WEIGHT_KEY",
    "CILParams", "LwFParams", "TrainSettings", "check_rounds", "combine", "combine_models",
    "combine_statistics", "config_ints", "merge_models", "merge_statistics", "model_reply", "parse_model_reply",
    "parse_phase", "parse_statistics_reply", "parse_statistics_request", "parse_train_request", "statistics_reply",
    "statistics_request", "train_request",
]

CONFIG_KEY = "cil"  # ConfigRecord: phase, classes, data_classes, the local training, LwF's settings
OLD_KEY = "old-arrays"  # the previous task's model
STATS_KEY = "stats"  # ArrayRecord of additive statistics
ARRAYS_KEY = "arrays"  # the model (the key Flower's FedAvg uses)
METRICS_KEY = "metrics"
WEIGHT_KEY = "num-examples"

TRAIN = "train"
LOSSES = ("ce", "lwf")
#: The backbone's classifier during training: "linear" (nn.Linear with bias) or "cosine"
#: (``fedsim.nn.models.CosineLinear``: normalized features and class weights, one learnable scale).
HEADS = ("linear", "cosine")


# ----------------------------------------------------------------------------------------------- parameters
@dataclass
class CILParams:
    """What every class-incremental strategy has: FedAvg rounds per task and the training head."""

    local_rounds: int = 1  # FedAvg rounds per task (each: client.epochs local epochs)
    head: str = "linear"  # the network's classifier: "linear" (PyCIL's finetune / joint) or "cosine"

    _parameter_constraints = {"local_rounds": [Interval(1, None, integer=True)], "head": [Options(HEADS)]}


@dataclass
class LwFParams(CILParams):
    """LwF and the methods on its backbone (lwf-ncm, DPCR): the official DPCR configuration trains with the cosine
    head (PyCIL ``"cosine": true``), so it is their default; ``head = "linear"`` is the option."""

    lwf_lambda: float = 10.0  # weight of the distillation term
    temperature: float = 2.0  # distillation temperature T
    head: str = "cosine"

    _parameter_constraints = {"lwf_lambda": [Interval(0, None)],
                              "temperature": [Interval(0, None, closed="neither")]}


def check_rounds(config: Any) -> None:
    """One metrics row per task: ``rounds`` is unset (1) or the number of tasks."""
    name = config.strategy.name
    if config.rounds not in (1, config.stream.tasks):
        raise ConfigError(f"rounds: {config.rounds} does not match the {config.stream.tasks} tasks; {name} logs one "
                          f"step per task, so leave rounds unset or set it to stream.tasks; FedAvg rounds within a "
                          f"task are strategy.local_rounds")


# --------------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class TrainSettings:
    """What a client trains on in a ``train`` phase: the loss, the logits it covers, the data and the optimization.

    ``loss = "ce"``: cross-entropy over the logits of ``classes``; ``"lwf"``: cross-entropy over ``new_classes`` plus
    ``lwf_lambda`` * KD(previous model's logits of ``old_classes``, ``temperature``). ``data_classes``: the classes
    whose samples the client trains on; ``training``: epochs, batch size and optimizer.
    """

    loss: str
    classes: list[int]
    data_classes: list[int]
    training: LocalTraining
    new_classes: list[int] = field(default_factory=list)
    old_classes: list[int] = field(default_factory=list)
    lwf_lambda: float = 0.0
    temperature: float = 1.0

    def to_config(self) -> ConfigRecord:
        settings = {"phase": TRAIN, "loss": self.loss, "classes": _ints(self.classes),
                    "data_classes": _ints(self.data_classes), **self.training.to_config()}
        if self.loss == "lwf":
            settings.update(new_classes=_ints(self.new_classes), old_classes=_ints(self.old_classes),
                            lwf_lambda=float(self.lwf_lambda), temperature=float(self.temperature))
        return ConfigRecord(settings)

    @classmethod
    def from_config(cls, cfg: ConfigRecord) -> "TrainSettings":
        loss = str(cfg["loss"])
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
        training = LocalTraining.from_config(cfg)
        if loss == "lwf":
            return cls(loss, config_ints(cfg, "classes"), config_ints(cfg, "data_classes"), training,
                       config_ints(cfg, "new_classes"), config_ints(cfg, "old_classes"), float(cfg["lwf_lambda"]),
                       float(cfg["temperature"]))
        return cls(loss, config_ints(cfg, "classes"), config_ints(cfg, "data_classes"), training)


def train_request(model: dict[str, np.ndarray], settings: TrainSettings,
                  old_model: dict[str, np.ndarray] | None = None) -> RecordDict:
    """A ``train`` phase: the global model, the settings and, for LwF, the previous task's model."""
    content = RecordDict({ARRAYS_KEY: to_record(model), CONFIG_KEY: settings.to_config()})
    if old_model is not None:
        content[OLD_KEY] = to_record(old_model)
    return content


def statistics_request(phase: str, model: dict[str, np.ndarray], classes: Sequence[int],
                       old_model: dict[str, np.ndarray] | None = None) -> RecordDict:
    """A statistics phase over the clients' samples of ``classes`` under ``model`` (and ``old_model``, if given)."""
    content = RecordDict({ARRAYS_KEY: to_record(model),
                          CONFIG_KEY: ConfigRecord({"phase": phase, "classes": _ints(classes)})})
    if old_model is not None:
        content[OLD_KEY] = to_record(old_model)
    return content


def parse_phase(content: RecordDict) -> str:
    return str(content.config_records[CONFIG_KEY]["phase"])


def parse_train_request(content: RecordDict
                        ) -> tuple[dict[str, np.ndarray], TrainSettings, dict[str, np.ndarray] | None]:
    """(model, settings, previous model or None) of a ``train`` request; arrays as read-only views."""
    settings = TrainSettings.from_config(content.config_records[CONFIG_KEY])
    old = from_record(content[OLD_KEY]) if settings.loss == "lwf" else None
    return from_record(content[ARRAYS_KEY]), settings, old


def parse_statistics_request(content: RecordDict
                             ) -> tuple[dict[str, np.ndarray], list[int], dict[str, np.ndarray] | None]:
    """(model, classes, previous model or None) of a statistics request; arrays as read-only views."""
    old = from_record(content[OLD_KEY]) if OLD_KEY in content else None
    return from_record(content[ARRAYS_KEY]), config_ints(content.config_records[CONFIG_KEY], "classes"), old


# ---------------------------------------------------------------------------------------------------- replies
def model_reply(model: dict[str, np.ndarray], num_examples: int, train_loss: float) -> RecordDict:
    return RecordDict({ARRAYS_KEY: to_record(model),
                       METRICS_KEY: MetricRecord({WEIGHT_KEY: int(num_examples), "train_loss": float(train_loss)})})


def statistics_reply(arrays: dict[str, np.ndarray], num_examples: int) -> RecordDict:
    return RecordDict({STATS_KEY: to_record(arrays), METRICS_KEY: MetricRecord({WEIGHT_KEY: int(num_examples)})})


def parse_model_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], int, float]:
    """(model as read-only views, number of examples, train loss) of a ``train`` reply."""
    metrics = content[METRICS_KEY]
    return from_record(content[ARRAYS_KEY]), int(metrics[WEIGHT_KEY]), float(metrics["train_loss"])


def parse_statistics_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], int]:
    """(statistics as read-only views, number of examples) of a statistics reply."""
    return from_record(content[STATS_KEY]), int(content[METRICS_KEY][WEIGHT_KEY])


# ---------------------------------------------------------------------------------------------------- combine
def combine_models(parsed: Sequence[tuple[dict[str, np.ndarray], int, float]]
                   ) -> tuple[dict[str, np.ndarray], int, float]:
    """FedAvg over ``parse_model_reply`` results: example-weighted model and loss, total examples."""
    weights = [float(n) for _, n, _ in parsed]
    model = weighted_average([m for m, _, _ in parsed], weights)
    factors = average_factors(len(parsed), weights)
    loss = float(sum(f * loss for f, (_, _, loss) in zip(factors, parsed)))
    return model, int(sum(weights)), loss


def combine_statistics(parsed: Sequence[tuple[dict[str, np.ndarray], int]]) -> tuple[dict[str, np.ndarray], int]:
    """Sums over ``parse_statistics_reply`` results, array by array ("classes" is the same in all of them)."""
    first = parsed[0][0]
    out = {"classes": first["classes"]}
    for key in first:
        if key != "classes":
            out[key] = sum(arrays[key] for arrays, _ in parsed)
    return out, sum(n for _, n in parsed)


def combine(replies: list[RecordDict]) -> RecordDict:
    """A group's replies as one (a node's ``reduce``): averaged models or summed statistics."""
    if ARRAYS_KEY in replies[0]:
        return model_reply(*combine_models([parse_model_reply(r) for r in replies]))
    return statistics_reply(*combine_statistics([parse_statistics_reply(r) for r in replies]))


def merge_models(replies: list[RecordDict]) -> tuple[dict[str, np.ndarray], int, float] | None:
    """The server's FedAvg step over the answering nodes: (model, examples, loss); None without replies."""
    return combine_models([parse_model_reply(r) for r in replies]) if replies else None


def merge_statistics(replies: list[RecordDict]) -> dict[str, np.ndarray] | None:
    """The server's sum of a statistics phase's replies; None without replies."""
    return combine_statistics([parse_statistics_reply(r) for r in replies])[0] if replies else None


def _ints(values: Sequence[int]) -> list[int]:
    return [int(v) for v in values]


def config_ints(record: ConfigRecord, key: str) -> list[int]:
    """A list of class labels from a ConfigRecord ([] where absent)."""
    return [int(v) for v in record.get(key, [])]
