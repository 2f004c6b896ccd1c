"""DPCR's protocol (He et al., ICML 2025): the class-incremental framework's phases
(``fedsim.frameworks.class_incremental_protocol``) plus one more.

    dpcr-stats  down  ARRAYS_KEY  the new backbone     CONFIG_KEY {phase: "dpcr-stats", classes}
                      OLD_KEY     the previous backbone (when the drift is needed: TSSP or the ablation)
                up    STATS_KEY   ``fedsim.algorithms.dpcr.learner.encode_statistics``: per new class n_c, sum x,
                                  the upper triangle of Phi_c; the TSSP pair X_old^T X_old (upper triangle),
                                  X_old^T X_new
                      METRICS_KEY {num-examples}

Every array is a sum over samples, so nodes and the server add replies
(``fedsim.frameworks.class_incremental_protocol.combine``). The server part is ``fedsim.strategies.dpcr``, the
client part ``fedsim.clients.dpcr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import RecordDict

from fedsim.errors import ConfigError
from fedsim.frameworks.class_incremental_protocol import LwFParams, check_rounds, statistics_request
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy

STATS_PHASE = "dpcr-stats"
#: ``strategy.cip_tol`` for the numerical-rank tolerance (the same word as ``fedsim.algorithms.dpcr.learner``'s,
#: written here because the protocol imports no numerical code)
NUMERICAL_RANK = "rank"
_TOLERANCE = Interval(0, None)


@dataclass
class DPCRParams(LwFParams):
    gamma: float = 100.0  # ridge regularization of the reconstruction
    tssp: bool = True  # task-wise shift projection
    cip: bool = True  # category-wise row-space projection (needs tssp)
    # CIP tolerance: 0 = S > 0, the official code's operator (default); "rank" = numerical rank (S > S_max d eps);
    # t > 0: S > t S_max
    cip_tol: float | str = 0.0
    class_norm: bool = True  # unit-norm class vectors
    tssp_eps: float = 1e-9  # TSSP's ridge
    ablation: bool = False  # also evaluate the ablation classifiers and the LwF head on the same statistics
    # CIP tolerances to evaluate beside the main classifier on the same backbone and statistics (companions
    # "cip_tol_<t>": tssp + cip + class_norm with cip_tol = t); empty: none
    cip_tol_sweep: list[float | str] = field(default_factory=list)

    _parameter_constraints = {"gamma": [Interval(0, None, closed="neither")], "tssp_eps": [Interval(0, None)]}

    def check(self, path: str = "strategy") -> None:
        if self.cip and not self.tssp:
            raise ConfigError(f"{path}.cip: true needs {path}.tssp = true (CIP refines the TSSP map W_c = Delta P_c); "
                              f"set {path}.cip = false too, or use strategy.name = 'ridge-uncalibrated'")
        for where, t in [("cip_tol", self.cip_tol)] + [(f"cip_tol_sweep[{i}]", t)
                                                       for i, t in enumerate(self.cip_tol_sweep)]:
            if not (_TOLERANCE.accepts(t) or t == NUMERICAL_RANK):
                raise ConfigError(f"{path}.{where}: {t!r} is not allowed; {_TOLERANCE.describe()} "
                                  f"(0 = the official S > 0) or {NUMERICAL_RANK!r} (the numerical rank)")
        if len(set(self.cip_tol_sweep)) != len(self.cip_tol_sweep):
            raise ConfigError(f"{path}.cip_tol_sweep: {self.cip_tol_sweep!r} lists a tolerance twice")


def sweep_name(tol: float | str) -> str:
    """The companion name of CIP tolerance ``tol`` in a ``cip_tol_sweep`` (metrics column ``acc_<name>``)."""
    return f"cip_tol_{tol}" if isinstance(tol, str) else f"cip_tol_{tol:g}"


@dataclass
class RidgeUncalibratedParams(DPCRParams):
    tssp: bool = False
    cip: bool = False
    class_norm: bool = False


def stats_request(model: dict[str, np.ndarray], classes: Sequence[int],
                  old_model: dict[str, np.ndarray] | None = None) -> RecordDict:
    """The statistics round of a task: its classes under the new backbone (and the old one, for the drift)."""
    return statistics_request(STATS_PHASE, model, classes, old_model)


for _name, _params, _desc in (
    ("dpcr", DPCRParams,
     "DPCR (He et al. 2025): LwF backbone + TSSP/CIP-calibrated class statistics + ridge reconstruction "
     "+ class normalization; federated by summing client statistics"),
    ("ridge-uncalibrated", RidgeUncalibratedParams,
     "Ridge classifier rebuilt from stored, un-calibrated class statistics (DPCR with TSSP/CIP/CN off)"),
):
    register_strategy(StrategySpec(
        name=_name, params=_params, server="fedsim.strategies.dpcr:DPCRServer",
        client="fedsim.clients.dpcr:DPCRClient", kind="continual", description=_desc, stream="class-incremental",
        reducible=True, check=check_rounds,
    ))
