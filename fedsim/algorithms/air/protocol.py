"""AIR's protocol (Fang et al., arXiv 2408.10349) on the online framework: AEF-OCL's round messages.

Federated mode sends, per synchronization round, the global AIR weights W and the segment of each client's stream
(``fedsim.algorithms.aef_ocl.protocol.segment_request``); a client predicts and learns its segment and answers with
the segment's increments of AIR's additive statistics (``fedsim.algorithms.air.learner.AIR.statistics``: per-class
Grams as upper triangles, H^T Y, class counts) and its prequential counts (``segment_reply``). Centralized mode
sends nothing. Server part ``fedsim.strategies.air``, client part ``fedsim.clients.air``.

Defaults from the official code (github ZHUANGHP/Analytic-continual-learning): ``config.py`` ``--gamma`` 0.1 and
``--buffer-size`` 8192, ``analytic/Buffer.py`` ``RandomBuffer`` (torch's ``nn.Linear`` initialization,
``buffer_init = "uniform"``, ReLU), float64 (``AIRLearner.make_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.algorithms.aef_ocl.protocol import (MODES, check_scenario, parse_segment_reply,  # noqa: F401
                                               parse_segment_request, segment_reply, segment_request)
from fedsim.frameworks.online_protocol import OnlineParams
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy


@dataclass
class AIRParams(OnlineParams):
    gamma: float = 0.1  # official --gamma (config.py)
    buffer_width: int = 8192  # official --buffer-size
    buffer_init: str = "uniform"  # official RandomBuffer (nn.Linear's reset)
    mode: str = "auto"  # "auto" (federated with more than one client) | "centralized" | "federated"
    refresh_every: int | None = None  # centralized: batches between re-solves of the prediction weights (None:
    # eval_every); a new class always triggers one (the official code solves before each evaluation)
    defer_rows: int = 256  # rows folded into the per-class Grams at once (exact)

    _parameter_constraints = {"gamma": [Interval(0, None, closed="neither")], "mode": [Options(MODES)],
                              "refresh_every": [Interval(1, None, integer=True), None],
                              "defer_rows": [Interval(1, None, integer=True)]}

    def federated(self, num_clients: int) -> bool:
        return self.mode == "federated" or (self.mode == "auto" and num_clients > 1)


register_strategy(StrategySpec(
    name="air", params=AIRParams, server="fedsim.strategies.air:AIRServer", client="fedsim.clients.air:AIRClient",
    kind="continual", stream="online", reducible=True, check=check_scenario,
    description="AIR (Fang et al. 2024): analytic imbalance rectifier, class-reweighted ridge from per-class Grams "
                "on the frozen buffer layer of the online stream; centralized or federated",
))
