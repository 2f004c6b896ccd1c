"""FeCAM's protocol (Goswami et al., NeurIPS 2023): the framework's train phase for the first task only, then one
statistics phase per task on the frozen backbone.

    fecam-stats  down  ARRAYS_KEY  the (frozen) backbone    CONFIG_KEY {phase, classes (the task's), beta}
                 up    STATS_KEY   ``fedsim.algorithms.fecam.learner.fecam_sums``: per class count, sum z, sum T(z),
                                   packed T(Z)^T T(Z)

Sums, so federated FeCAM equals centralized FeCAM exactly. Server part ``fedsim.strategies.cil_drift:FeCAMServer``,
client part ``fedsim.clients.cil_drift:FeCAMClient``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.frameworks.class_incremental_protocol import CILParams, CONFIG_KEY, check_rounds, statistics_request
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy

STATS_PHASE = "fecam-stats"


@dataclass
class FeCAMParams(CILParams):
    """Defaults of dipamgoswami/FeCAM exps/FeCAM_cifar100.json and models/base.py (see the learner)."""

    head: str = "cosine"  # the first task trains a CosineIncrementalNet
    beta: float = 0.5  # Tukey exponent ("tukey": true, "beta": 0.5)
    alpha1: float = 1.0  # diagonal shrinkage ("alpha1": 1)
    alpha2: float = 1.0  # off-diagonal shrinkage ("alpha2": 1)
    shrink_times: int = 2  # the official code shrinks twice
    normalize_cov: bool = True  # "norm_cov": true

    _parameter_constraints = {"beta": [Interval(0, None)], "alpha1": [Interval(0, None)],
                              "alpha2": [Interval(0, None)], "shrink_times": [Interval(0, None, integer=True)]}


def stats_request(model: dict[str, np.ndarray], classes: Sequence[int], beta: float) -> RecordDict:
    content = statistics_request(STATS_PHASE, model, classes)
    content.config_records[CONFIG_KEY]["beta"] = float(beta)
    return content


register_strategy(StrategySpec(
    name="fecam", params=FeCAMParams, server="fedsim.strategies.cil_drift:FeCAMServer",
    client="fedsim.clients.cil_drift:FeCAMClient", kind="continual", stream="class-incremental", reducible=True,
    check=check_rounds,
    description="FeCAM (Goswami et al. 2023): backbone frozen after the first task, per-class Mahalanobis "
                "prototypes (Tukey transform, shrunk normalized covariances); federated by summing class statistics",
))
