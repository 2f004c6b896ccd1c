"""LDC's protocol (Gomez-Villa et al., ECCV 2024): the class-incremental framework's phases plus one phase.

    ldc-stats  down  ARRAYS_KEY  the new backbone       CONFIG_KEY {phase, classes (the task's), projector_epochs,
                     OLD_KEY     the previous backbone              projector_lr, projector_batch_size}
                     PROJECTOR   W0 (d, d), the projector's initialization (from task 1 on)
               up    STATS_KEY   per new class: count, sum of raw embeddings; n_k W_k (the client's fitted projector
                                 times its examples) and n_k (``projector_count``)

Sums again: the class sums are exact, and sum_k n_k W_k / sum_k n_k is FedAvg of the clients' projectors (one
client: the centralized official fit). Server part ``fedsim.strategies.cil_drift:LDCServer``, client part
``fedsim.clients.cil_drift:LDCClient``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.codec import from_record, to_record
from fedsim.frameworks.class_incremental_protocol import CONFIG_KEY, LwFParams, check_rounds, statistics_request
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy

STATS_PHASE = "ldc-stats"
PROJECTOR_KEY = "projector"


@dataclass
class LDCParams(LwFParams):
    """LwF backbone (cosine head, the official ``"cosine": true``), NCM prototypes moved by a learned projector."""

    projector_epochs: int = 20  # alviur/ldc models/lwf.py: range(20)
    projector_lr: float = 1e-3  # optim.Adam(..., lr=0.001)
    projector_batch_size: int = 128  # the official train loader's batch_size

    _parameter_constraints = {"projector_epochs": [Interval(1, None, integer=True)],
                              "projector_lr": [Interval(0, None, closed="neither")],
                              "projector_batch_size": [Interval(1, None, integer=True)]}


def stats_request(model: dict[str, np.ndarray], classes: Sequence[int], old_model: dict[str, np.ndarray] | None,
                  init: np.ndarray | None, params: LDCParams) -> RecordDict:
    content = statistics_request(STATS_PHASE, model, classes, old_model)
    cfg = content.config_records[CONFIG_KEY]
    cfg["projector_epochs"] = int(params.projector_epochs)
    cfg["projector_lr"] = float(params.projector_lr)
    cfg["projector_batch_size"] = int(params.projector_batch_size)
    if init is not None:
        content[PROJECTOR_KEY] = to_record({"init": np.asarray(init, dtype=np.float64)})
    return content


def parse_projector(content: RecordDict) -> tuple[np.ndarray | None, dict]:
    """(W0 or None, {epochs, lr, batch_size}) of an ``ldc-stats`` request."""
    cfg = content.config_records[CONFIG_KEY]
    init = from_record(content[PROJECTOR_KEY])["init"] if PROJECTOR_KEY in content else None
    return init, {"epochs": int(cfg["projector_epochs"]), "lr": float(cfg["projector_lr"]),
                  "batch_size": int(cfg["projector_batch_size"])}


register_strategy(StrategySpec(
    name="ldc", params=LDCParams, server="fedsim.strategies.cil_drift:LDCServer",
    client="fedsim.clients.cil_drift:LDCClient", kind="continual", stream="class-incremental", reducible=True,
    check=check_rounds,
    description="LDC (Gomez-Villa et al. 2024): LwF backbone, nearest-class-mean prototypes moved by a linear "
                "projector old -> new embeddings fitted by Adam; federated by FedAvg of the projectors",
))
