"""The one-shot baselines' protocol (one-shot FedAvg, ensemble, best local model): one empty request, one upload.

    down  (nothing: every client builds the common initial model from the scenario seed)
    up    MODEL_PREFIX + pid   ArrayRecord: client pid's locally trained model (parameters and BatchNorm buffers)
          META_PREFIX + pid    MetricRecord {num-examples, train_loss}

Records carry the partition id, so a node serving several clients sends their records side by side
(``concatenate_replies``). The server part is ``fedsim.strategies.oneshot``, the client part ``fedsim.clients.oneshot``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.params import Options
from fedsim.registry import StrategySpec, register_strategy

MODEL_PREFIX = "model."  # ArrayRecord per client: "model.<pid>"
META_PREFIX = "meta."  # MetricRecord per client: num-examples, train_loss
WEIGHT_KEY = "num-examples"
LOSS_KEY = "train_loss"

WEIGHTINGS = ("examples", "uniform")  # examples: FedAvg's n_m / n; uniform: 1 / M
COMBINES = ("softmax", "logits")  # how the ensemble (and FuseFL's ensemble) combines its members' outputs


@dataclass
class OneShotAvgParams:
    weighting: str = "examples"  # examples: FedAvg's n_m / n; uniform: 1 / M

    _parameter_constraints = {"weighting": [Options(WEIGHTINGS)]}


@dataclass
class EnsembleParams:
    combine: str = "softmax"  # softmax: mean of probabilities; logits: mean of logits

    _parameter_constraints = {"combine": [Options(COMBINES)]}


@dataclass
class BestLocalParams:
    pass


@dataclass
class LocalModel:
    """One client's upload: its partition id, its model's arrays (read-only views), example count, training loss."""

    pid: int
    arrays: dict[str, np.ndarray]
    n: int
    loss: float


def request() -> RecordDict:
    """The server's one message: empty (the initial model is derived from the scenario on every client)."""
    return RecordDict()


def reply(pid: int, arrays: dict[str, np.ndarray], num_examples: int, train_loss: float) -> RecordDict:
    """Client ``pid``'s answer, keyed by its partition id (0 stands for the loss of a client with no data)."""
    loss = float(train_loss)
    return RecordDict({
        f"{MODEL_PREFIX}{pid}": to_record(arrays),
        f"{META_PREFIX}{pid}": MetricRecord({WEIGHT_KEY: int(num_examples),
                                             LOSS_KEY: loss if math.isfinite(loss) else 0.0}),
    })


def parse_reply(content: RecordDict) -> list[LocalModel]:
    """Every complete per-client entry of a (possibly concatenated) reply, by partition id."""
    arrays = {int(k[len(MODEL_PREFIX):]): from_record(r) for k, r in content.array_records.items()
              if k.startswith(MODEL_PREFIX)}
    meta = {int(k[len(META_PREFIX):]): r for k, r in content.metric_records.items() if k.startswith(META_PREFIX)}
    return [LocalModel(pid, arrays[pid], int(meta[pid][WEIGHT_KEY]), float(meta[pid][LOSS_KEY]))
            for pid in sorted(arrays.keys() & meta.keys())]


def _check(config) -> None:  # noqa: ANN001
    if config.rounds != 1:
        raise ConfigError(f"rounds: {config.rounds} but {config.strategy.name} is one-shot (exactly one round); "
                          "set rounds = 1 or leave rounds out")
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for "
                          f"{config.strategy.name}")


def _one_round(params) -> int:  # noqa: ANN001
    return 1


_CLIENT = "fedsim.clients.oneshot:LocalModelClient"

register_strategy(StrategySpec(
    name="fedavg-oneshot", params=OneShotAvgParams, server="fedsim.strategies.oneshot:OneShotFedAvgServer",
    client=_CLIENT, check=_check, fixed_rounds=_one_round, reducible=True,
    description="One-shot FedAvg: local training once, parameters averaged once (FuseFL's baseline)",
))
register_strategy(StrategySpec(
    name="ensemble", params=EnsembleParams, server="fedsim.strategies.oneshot:EnsembleServer", client=_CLIENT,
    check=_check, fixed_rounds=_one_round, reducible=True,
    description="Ensemble of the M local models (averaged softmax); also reports each local model's accuracy",
))
register_strategy(StrategySpec(
    name="best-local", params=BestLocalParams, server="fedsim.strategies.oneshot:BestLocalServer", client=_CLIENT,
    check=_check, fixed_rounds=_one_round, reducible=True,
    description="Best single local model (chosen by test accuracy: an oracle reference)",
))
