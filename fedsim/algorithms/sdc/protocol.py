"""SDC's protocol (Yu et al., CVPR 2020): the class-incremental framework's phases plus one statistics phase.

    sdc-stats  down  ARRAYS_KEY  the new backbone        CONFIG_KEY {phase, classes (the task's), sigma, floor}
                     OLD_KEY     the previous backbone (from task 1 on)
                     PROTOTYPES  the old classes' prototypes (k, d), in the server's order
               up    STATS_KEY   per new class: count, sum of raw embeddings; per prototype: weighted (k, d),
                                 weight (k,), kernel (k,) (``fedsim.algorithms.sdc.learner.drift_sums``)

Every array is a sum over samples, so groups and the server add replies (federated SDC equals centralized SDC).
Server part: ``fedsim.strategies.cil_drift:SDCServer``; client part ``fedsim.clients.cil_drift:SDCClient``.
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

STATS_PHASE = "sdc-stats"
PROTOTYPES_KEY = "prototypes"


@dataclass
class SDCParams(LwFParams):
    """LwF backbone (cosine head), NCM prototypes moved by SDC; defaults of the LDC authors' LwF + SDC baseline."""

    sigma: float = 0.3  # kernel width of the drift weights (alviur/ldc exps/lwf.json; SDC-IL run_demo.sh: 0.2)
    floor: float = 1e-5  # added to every weight (alviur/ldc models/lwf.py; SDC-IL: 0)

    _parameter_constraints = {"sigma": [Interval(0, None, closed="neither")], "floor": [Interval(0, None)]}


def stats_request(model: dict[str, np.ndarray], classes: Sequence[int], old_model: dict[str, np.ndarray] | None,
                  prototypes: np.ndarray | None, sigma: float, floor: float) -> RecordDict:
    content = statistics_request(STATS_PHASE, model, classes, old_model)
    content.config_records[CONFIG_KEY]["sigma"] = float(sigma)
    content.config_records[CONFIG_KEY]["floor"] = float(floor)
    if prototypes is not None:
        content[PROTOTYPES_KEY] = to_record({"prototypes": np.asarray(prototypes, dtype=np.float64)})
    return content


def parse_prototypes(content: RecordDict) -> tuple[np.ndarray | None, float, float]:
    """(old prototypes or None, sigma, floor) of an ``sdc-stats`` request."""
    cfg = content.config_records[CONFIG_KEY]
    protos = from_record(content[PROTOTYPES_KEY])["prototypes"] if PROTOTYPES_KEY in content else None
    return protos, float(cfg["sigma"]), float(cfg["floor"])


register_strategy(StrategySpec(
    name="sdc", params=SDCParams, server="fedsim.strategies.cil_drift:SDCServer",
    client="fedsim.clients.cil_drift:SDCClient", kind="continual", stream="class-incremental", reducible=True,
    check=check_rounds,
    description="SDC (Yu et al. 2020): LwF backbone, nearest-class-mean prototypes shifted by the kernel-weighted "
                "drift of the current task's embeddings; federated by summing the weighted drifts",
))
