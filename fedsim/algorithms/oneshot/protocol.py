"""The one-shot baselines' protocol (one-shot FedAvg, ensemble, best local model): one empty request, one upload;
the recalibrated ensemble has a second round for the class statistics of the ensemble's summed features.

    round 1
    down  (nothing: every client builds the common initial model from the scenario seed)
    up    MODEL_PREFIX + pid   ArrayRecord: client pid's locally trained model (parameters and BatchNorm buffers)
          META_PREFIX + pid    MetricRecord {num-examples, train_loss}
    round 2 (ensemble-recalibrated only)
    down  MEMBERS_KEY          ArrayRecord: the M local models as one fused stage of M columns (``FusedNet`` state
                               keys) and MEMBERS_CONFIG_KEY {members: M}
    up    classes.<pid>        ArrayRecord: per-class count, mean and centred scatter of sum_m e_m(x) over the
                               client's data (``fedsim.algorithms.fusefl.protocol.class_statistics_reply``: FuseFL's form)

Records carry the partition id, so a node serving several clients sends their records side by side
(``concatenate_replies``). The server part is ``fedsim.strategies.oneshot``, the client part ``fedsim.clients.oneshot``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.params import Options
from fedsim.algorithms.fusefl.protocol import RecalibrationParams
from fedsim.registry import StrategySpec, register_strategy

MODEL_PREFIX = "model."  # ArrayRecord per client: "model.<pid>"
META_PREFIX = "meta."  # MetricRecord per client: num-examples, train_loss
WEIGHT_KEY = "num-examples"
LOSS_KEY = "train_loss"
MEMBERS_KEY = "members"  # round 2 of ensemble-recalibrated: the local models as one fused stage
MEMBERS_CONFIG_KEY = "members.config"

WEIGHTINGS = ("uniform", "examples")  # uniform: 1 / M (FuseFL's baseline); examples: FedAvg's n_m / n
COMBINES = ("logits", "softmax")  # how the ensemble combines its members' outputs: mean logits (FuseFL) | softmax


@dataclass
class OneShotAvgParams:
    weighting: str = "uniform"  # uniform: the plain parameter mean (FuseFL's baseline); examples: n_m / n

    _parameter_constraints = {"weighting": [Options(WEIGHTINGS)]}


@dataclass
class EnsembleParams:
    combine: str = "logits"  # logits: mean of logits (FuseFL's baseline); softmax: mean of probabilities

    _parameter_constraints = {"combine": [Options(COMBINES)]}


@dataclass
class EnsembleRecalibratedParams(RecalibrationParams):
    """The M local models as FuseFL's final model with K = 1: the mean of their heads reading the sum of their
    embeddings, recalibrated on virtual features exactly as FuseFL's head (FuseFL's RecalibrationParams)."""


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


def members_request(fused_arrays: dict[str, np.ndarray], members: int) -> RecordDict:
    """Round 2 of ensemble-recalibrated: the M local models, as the state of one fused stage of M columns."""
    return RecordDict({MEMBERS_KEY: to_record(fused_arrays),
                       MEMBERS_CONFIG_KEY: ConfigRecord({"members": int(members)})})


def members_of(content: RecordDict) -> tuple[dict[str, np.ndarray], int] | None:
    """(fused-stage arrays, number of members) of a round-2 request; None for the training request."""
    if MEMBERS_KEY not in content:
        return None
    return from_record(content[MEMBERS_KEY]), int(content.config_records[MEMBERS_CONFIG_KEY]["members"])


def parse_reply(content: RecordDict) -> list[LocalModel]:
    """Every complete per-client entry of a (possibly concatenated) reply, by partition id."""
    arrays = {int(k[len(MODEL_PREFIX):]): from_record(r) for k, r in content.array_records.items()
              if k.startswith(MODEL_PREFIX)}
    meta = {int(k[len(META_PREFIX):]): r for k, r in content.metric_records.items() if k.startswith(META_PREFIX)}
    return [LocalModel(pid, arrays[pid], int(meta[pid][WEIGHT_KEY]), float(meta[pid][LOSS_KEY]))
            for pid in sorted(arrays.keys() & meta.keys())]


def collect_local_models(ctx, purpose: str = "combine") -> list[LocalModel]:  # noqa: ANN001
    """The one round of every one-shot server: send the request, keep each client's uploaded model that saw data
    (sorted by partition id); a RuntimeError naming ``purpose`` when no client with data answered."""
    found: dict[int, LocalModel] = {}
    for reply in ctx.send(request(), round=1):
        if reply.content is not None:
            found.update((m.pid, m) for m in parse_reply(reply.content))
    local = [m for _, m in sorted(found.items()) if m.n > 0]
    if not local:
        raise RuntimeError(f"no client with data answered; nothing to {purpose}")
    return local


def _check(config) -> None:  # noqa: ANN001
    want = _rounds_of(config.strategy.params)
    if config.rounds != want:
        what = "exactly one round" if want == 1 else "one training round plus one statistics round"
        raise ConfigError(f"rounds: {config.rounds} but {config.strategy.name} is one-shot ({what}); "
                          f"set rounds = {want} or leave rounds out")
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for "
                          f"{config.strategy.name}")


def _one_round(params) -> int:  # noqa: ANN001
    return 1


def _rounds_of(params) -> int:  # noqa: ANN001
    return 2 if isinstance(params, EnsembleRecalibratedParams) else 1


_CLIENT = "fedsim.clients.oneshot:LocalModelClient"

register_strategy(StrategySpec(
    name="fedavg-oneshot", params=OneShotAvgParams, server="fedsim.strategies.oneshot:OneShotFedAvgServer",
    client=_CLIENT, check=_check, fixed_rounds=_one_round, reducible=True,
    description="One-shot FedAvg: local training once, parameters averaged once (uniform; FuseFL's baseline)",
))
register_strategy(StrategySpec(
    name="ensemble", params=EnsembleParams, server="fedsim.strategies.oneshot:EnsembleServer", client=_CLIENT,
    check=_check, fixed_rounds=_one_round, reducible=True,
    description="Ensemble of the M local models (mean logits); also reports each local model's accuracy",
))
register_strategy(StrategySpec(
    name="ensemble-recalibrated", params=EnsembleRecalibratedParams,
    server="fedsim.strategies.oneshot:EnsembleRecalibratedServer", client=_CLIENT, check=_check,
    fixed_rounds=lambda p: 2, reducible=True,
    description="The local models with FuseFL's head: mean head on their summed embeddings, recalibrated on "
                "virtual features (one statistics round); separates the head's gain from fusion's",
))
register_strategy(StrategySpec(
    name="best-local", params=BestLocalParams, server="fedsim.strategies.oneshot:BestLocalServer", client=_CLIENT,
    check=_check, fixed_rounds=_one_round, reducible=True,
    description="Best single local model (chosen by test accuracy: an oracle reference)",
))
