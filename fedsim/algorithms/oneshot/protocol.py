"""The one-shot baselines' protocol (one-shot FedAvg, ensemble, best local model): one training request, one upload;
the recalibrated ensemble has a second round for the class statistics of the ensemble's summed features.

    round 1 (the one-shot family's form, ``fedsim.frameworks.oneshot_protocol``)
    down  TRAINING_KEY         ConfigRecord: the local training (``LocalTraining``: client.epochs, batch size, lr,
                               momentum, weight decay, optimizer); no model: every client builds the common initial
                               model from the scenario seed
    up    MODEL_PREFIX + pid   ArrayRecord: client pid's locally trained model (parameters and BatchNorm buffers)
          META_PREFIX + pid    MetricRecord {num-examples, train_loss}
    round 2 (ensemble-recalibrated only)
    down  MEMBERS_KEY          ArrayRecord: the M local models as one fused stage of M columns (``FusedNet`` state
                               keys) and MEMBERS_CONFIG_KEY {members: M}
    up    classes.<pid>        ArrayRecord: per-class count, mean and centred scatter of sum_m e_m(x) over the
                               client's data (``fedsim.frameworks.oneshot_protocol.class_statistics_reply``, the form
                               FuseFL's recalibrated head uses too)

Records carry the partition id, so a node serving several clients sends their records side by side
(``concatenate_replies``). The server part is ``fedsim.strategies.oneshot``, the client part ``fedsim.clients.oneshot``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.frameworks.oneshot_protocol import COMBINES, WEIGHTINGS, RecalibrationParams, check_one_shot
from fedsim.params import Options
from fedsim.registry import StrategySpec, register_strategy

MEMBERS_KEY = "members"  # round 2 of ensemble-recalibrated: the local models as one fused stage
MEMBERS_CONFIG_KEY = "members.config"



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
    embeddings, recalibrated on virtual features exactly as FuseFL's head (the shared RecalibrationParams)."""


@dataclass
class BestLocalParams:
    pass


def members_request(fused_arrays: dict[str, np.ndarray], members: int) -> RecordDict:
    """Round 2 of ensemble-recalibrated: the M local models, as the state of one fused stage of M columns."""
    return RecordDict({MEMBERS_KEY: to_record(fused_arrays),
                       MEMBERS_CONFIG_KEY: ConfigRecord({"members": int(members)})})


def members_of(content: RecordDict) -> tuple[dict[str, np.ndarray], int] | None:
    """(fused-stage arrays, number of members) of a round-2 request; None for the training request."""
    if MEMBERS_KEY not in content:
        return None
    return from_record(content[MEMBERS_KEY]), int(content.config_records[MEMBERS_CONFIG_KEY]["members"])


def _check(config) -> None:  # noqa: ANN001
    check_one_shot(config, _rounds_of(config.strategy.params))


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
