"""The one-shot family's shared wire form: torch-free pieces several one-shot strategies speak.

FuseFL, the one-shot baselines (one-shot FedAvg, ensemble, recalibrated ensemble, best local model) and the
distillation baselines (FedDF, DENSE, Co-Boosting) exchange the same few records; their homes are here so that no
algorithm imports another one's protocol:

    down  TRAINING_KEY       ConfigRecord: the local training the request asks for (``LocalTraining`` of
                             ``fedsim.frameworks.model_rounds_protocol``: local-epochs, local-batch-size, local-lr,
                             ...); every training request carries it and clients read it from the message, never
                             from the scenario (FuseFL puts the same entries into its stage record)
    up    model.<pid>        ArrayRecord: client pid's locally trained model (``reply``; the one-shot upload)
          classes.<pid>      ArrayRecord: per-class count, mean and centred scatter (packed upper triangles, float64)
                             of the features a recalibrated head reads, classes present only (``CLASS_STATS_KEYS``;
                             ``class_statistics_reply``)
          meta.<pid>         MetricRecord {num-examples, train_loss}

Records carry the partition id, so a node serving several clients sends them side by side
(``fedsim.engine.node.concatenate_replies``). ``RecalibrationParams`` are the head recalibration's parameters
(FuseFL's head and the recalibrated ensemble); the torch side (fused network, ensemble, recalibration) is
``fedsim.frameworks.oneshot``. Only flwr's records, numpy and fedsim's torch-free modules are imported here (loading a
scenario reads this module); ``fedsim.analytic`` (scipy) is imported where class statistics are packed or unpacked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import CONFIG_KEY, LOSS_KEY, WEIGHT_KEY, LocalTraining, finite
from fedsim.params import Interval, Options

if TYPE_CHECKING:
    from fedsim.analytic import ClassStatistics

__all__ = ["MODEL_PREFIX", "META_PREFIX", "CLASSES_PREFIX", "TRAINING_KEY", "CLASS_STATS_KEYS", "MERGES", "COMBINES",
           "COVARIANCES", "WEIGHTINGS", "RecalibrationParams", "training_of", "LocalModel", "request", "reply",
           "parse_reply", "collect_local_models", "check_one_shot", "pack_class_statistics",
           "unpack_class_statistics", "class_statistics_reply", "parse_class_statistics"]

MODEL_PREFIX = "model."  # ArrayRecord per client: "model.<pid>"
META_PREFIX = "meta."  # MetricRecord per client: WEIGHT_KEY (num-examples), LOSS_KEY (train_loss)
CLASSES_PREFIX = "classes."  # ArrayRecord per client: its class statistics
TRAINING_KEY = CONFIG_KEY  # ConfigRecord of the one-shot request: LocalTraining's entries (local-epochs, ...)
CLASS_STATS_KEYS = ("classes", "count", "mean", "scatter")  # the class-statistics record's arrays

MERGES = ("avg", "sum", "conv1x1")  # how a fused column reads the previous stage's M outputs
COMBINES = ("logits", "softmax")  # how the ensemble combines its members' outputs: mean logits (FuseFL) | softmax
COVARIANCES = ("unbiased", "official")  # pooled class covariance: correct, or FuseFL's official code's (uncentred)
WEIGHTINGS = ("uniform", "examples")  # an average of the local models: 1 / M (FuseFL's baseline) | FedAvg's n_m / n


@dataclass
class RecalibrationParams:
    """The head recalibration on virtual features (CCVR-style; FuseFL's official ``locals/ccvr.py``).

    Clients send per-class count, mean and centred scatter of the fused final features; the server pools them,
    draws ``virtual_per_class`` Gaussian features per class present and trains the averaged head on them
    (``recalibration_epochs`` of plain SGD, lr ``recalibration_lr``, batch ``recalibration_batch_size``: the
    official 1 epoch, lr 0.01, batch 128, no momentum). ``recalibration_covariance = "official"`` reproduces the
    official pooling, whose mean term vanishes (``n / n - 1`` = 0: an uncentred second moment); "unbiased" is the
    correct pooled sample covariance.
    """

    virtual_per_class: int = 5000
    recalibration_epochs: int = 1
    recalibration_lr: float = 0.01
    recalibration_batch_size: int = 128
    recalibration_momentum: float = 0.0
    recalibration_covariance: str = "unbiased"

    _parameter_constraints = {"virtual_per_class": [Interval(1, None, integer=True)],
                              "recalibration_epochs": [Interval(1, None, integer=True)],
                              "recalibration_lr": [Interval(0, None, closed="neither")],
                              "recalibration_batch_size": [Interval(1, None, integer=True)],
                              "recalibration_momentum": [Interval(0, 1, closed="left")],
                              "recalibration_covariance": [Options(COVARIANCES)]}


# ------------------------------------------------------------------------------------- local training settings
def training_of(content: RecordDict, key: str | None = None) -> LocalTraining:
    """The local training settings a request carries in its ConfigRecord ``key`` (default ``TRAINING_KEY``); an
    error when it carries none (a client part never falls back on the scenario)."""
    key = TRAINING_KEY if key is None else key
    if key not in content.config_records:
        raise KeyError(f"the request carries no ConfigRecord {key!r} with local training settings; the server part "
                       "must send LocalTraining.to_config() (build the request with the protocol's builder)")
    return LocalTraining.from_config(content.config_records[key])


# ---------------------------------------------------------------------------------------- one-shot upload
@dataclass
class LocalModel:
    """One client's upload: its partition id, its model's arrays (read-only views), example count, training loss."""

    pid: int
    arrays: dict[str, np.ndarray]
    n: int
    loss: float


def request(training: LocalTraining) -> RecordDict:
    """The one-shot training request: the local training settings only (every client builds the common initial
    model from the scenario seed, so no model travels down)."""
    return RecordDict({TRAINING_KEY: ConfigRecord(training.to_config())})


def _meta(num_examples: int, train_loss: float) -> MetricRecord:
    return MetricRecord({WEIGHT_KEY: int(num_examples), LOSS_KEY: float(train_loss)})


def reply(pid: int, arrays: dict[str, np.ndarray], num_examples: int, train_loss: float) -> RecordDict:
    """Client ``pid``'s answer, keyed by its partition id (0 stands for the loss of a client with no data)."""
    return RecordDict({f"{MODEL_PREFIX}{pid}": to_record(arrays),
                       f"{META_PREFIX}{pid}": _meta(num_examples, finite(train_loss))})


def parse_reply(content: RecordDict) -> list[LocalModel]:
    """Every complete per-client entry of a (possibly concatenated) reply, by partition id."""
    arrays = {int(k[len(MODEL_PREFIX):]): from_record(r) for k, r in content.array_records.items()
              if k.startswith(MODEL_PREFIX)}
    meta = {int(k[len(META_PREFIX):]): r for k, r in content.metric_records.items() if k.startswith(META_PREFIX)}
    return [LocalModel(pid, arrays[pid], int(meta[pid][WEIGHT_KEY]), float(meta[pid][LOSS_KEY]))
            for pid in sorted(arrays.keys() & meta.keys())]


def collect_local_models(ctx: Any, purpose: str = "combine") -> list[LocalModel]:
    """The one round of every one-shot server: send the request (the scenario's ``client`` settings), keep each
    client's uploaded model that saw data (sorted by partition id); a RuntimeError naming ``purpose`` when no
    client with data answered. ``ctx``: the strategy's ``fedsim.engine.ServerContext``."""
    found: dict[int, LocalModel] = {}
    for answer in ctx.send(request(LocalTraining.from_settings(ctx.config.client)), round=1):
        if answer.content is not None:
            found.update((m.pid, m) for m in parse_reply(answer.content))
    local = [m for _, m in sorted(found.items()) if m.n > 0]
    if not local:
        raise RuntimeError(f"no client with data answered; nothing to {purpose}")
    return local


def check_one_shot(config: Any, rounds: int = 1) -> None:
    """The one-shot client part's requirements: exactly ``rounds`` rounds, and local training that trains."""
    if config.rounds != rounds:
        what = "exactly one round" if rounds == 1 else "one training round plus one statistics round"
        raise ConfigError(f"rounds: {config.rounds} but {config.strategy.name} is one-shot ({what}); "
                          f"set rounds = {rounds} or leave rounds out")
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for "
                          f"{config.strategy.name}")


# -------------------------------------------------------------------------------------- class statistics
def pack_class_statistics(stats: ClassStatistics) -> dict[str, np.ndarray]:
    """The wire form of class statistics with a scatter (``track_scatter``): the classes present, their counts,
    means and packed upper scatter triangles; a client under label skew sends a few classes, not all of them."""
    from fedsim.analytic import pack_upper

    if stats.scatter is None:
        raise ValueError("class statistics for a recalibrated head need the scatter (track_scatter=True)")
    present = np.flatnonzero(stats.count).astype(np.int64)
    return {"classes": present, "count": stats.count[present], "mean": stats.mean[present],
            "scatter": pack_upper(stats.scatter[present]) if present.size else np.zeros((0, 0))}


def unpack_class_statistics(arrays: dict[str, np.ndarray], num_classes: int, dim: int) -> ClassStatistics:
    """Inverse of ``pack_class_statistics``: ``num_classes`` classes of ``dim`` features (absent classes empty);
    the per-dimension M2 is the scatter's diagonal."""
    from fedsim.analytic import ClassStatistics, unpack_upper

    out = ClassStatistics.zeros(dim, num_classes, track_scatter=True)
    present = np.asarray(arrays["classes"], dtype=np.int64)
    if present.size:
        out.count[present] = np.asarray(arrays["count"], dtype=np.int64)
        out.mean[present] = arrays["mean"]
        out.scatter[present] = unpack_upper(arrays["scatter"], dim)
        out.m2[present] = np.diagonal(out.scatter[present], axis1=1, axis2=2)
    return out


def class_statistics_reply(pid: int, stats: ClassStatistics, num_examples: int) -> RecordDict:
    """Client ``pid``'s reply in a recalibration round: its class statistics (``pack_class_statistics``) and its
    example count (train loss NaN: nothing is trained in this round, so clients.csv shows none)."""
    return RecordDict({f"{CLASSES_PREFIX}{pid}": to_record(pack_class_statistics(stats)),
                       f"{META_PREFIX}{pid}": _meta(num_examples, float("nan"))})


def parse_class_statistics(contents: Iterable[RecordDict | None], num_classes: int, dim: int
                           ) -> list[ClassStatistics]:
    """The class statistics of every client that had data, in partition-id order, from a round's reply contents
    (None for a failed node)."""
    found: dict[int, dict[str, np.ndarray]] = {}
    counts: dict[int, int] = {}
    for content in contents:
        if content is None:
            continue
        for key, record in content.array_records.items():
            if key.startswith(CLASSES_PREFIX):
                found[int(key[len(CLASSES_PREFIX):])] = from_record(record)
        for key, record in content.metric_records.items():
            if key.startswith(META_PREFIX):
                counts[int(key[len(META_PREFIX):])] = int(record[WEIGHT_KEY])
    return [unpack_class_statistics(found[pid], num_classes, dim) for pid in sorted(found)
            if counts.get(pid, 0) > 0]
