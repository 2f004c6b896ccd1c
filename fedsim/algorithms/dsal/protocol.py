"""DS-AL's protocol (Zhuang et al., AAAI 2024): ACIL's base training (``fedsim.algorithms.acil.protocol``) and two
statistics exchanges per task, both in the task's statistics round.

    dsal-stats     down  ARRAYS_KEY  the frozen backbone   CONFIG_KEY {phase, task, classes}
                   up    STATS_KEY   {main_gram, main_cross, main_count: relu(z) statistics; comp_gram, comp_count:
                                      the tanh(z) Gram; classes}                 (sums over samples)
    dsal-residual  down  ARRAYS_KEY  the frozen backbone   CONFIG_KEY {phase, task, classes = the task's new classes}
                         MAIN_KEY    {weights: W_m after this task}
                   up    STATS_KEY   {comp_cross: tanh(z)^T (Y - relu(z) W_m) on the new classes' columns; classes}

z = f(x) B is the linear buffer (no activation). The server part is ``fedsim.strategies.dsal``, the client part
``fedsim.clients.dsal``.

Defaults from the official code (github ZHUANGHP/Analytic-continual-learning): ``config.py`` ``--gamma`` 0.1
(main), ``--gamma-comp`` 0.1, ``--compensation-ratio`` 1 (its README recommends 0.6 on CIFAR-100 and 1.5 on
ImageNet-1k, found by grid search in [0, 2]), ``--buffer-size`` 8192; ``analytic/DSAL.py``: the buffer without
activation, ``activation_main = torch.relu``, ``activation_comp = torch.tanh``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.acil.protocol import ACILParams, stats_request
from fedsim.catalog import ACTIVATIONS
from fedsim.codec import from_record, to_record
from fedsim.frameworks.class_incremental_protocol import check_rounds
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

STATS_PHASE = "dsal-stats"
RESIDUAL_PHASE = "dsal-residual"
MAIN_KEY = "dsal.main"


@dataclass
class DSALParams(ACILParams):
    gamma_comp: float = 0.1  # official --gamma-comp
    compensation_ratio: float = 1.0  # official -C / --compensation-ratio (default 1)
    activation: str = "relu"  # the main stream's activation (official activation_main)
    activation_comp: str = "tanh"  # the compensation stream's (official activation_comp)

    _parameter_constraints = {"gamma_comp": [Interval(0, None, closed="neither")],
                              "compensation_ratio": [Interval(0, None)],
                              "activation_comp": [Options(ACTIVATIONS)]}


def residual_request(model: dict[str, np.ndarray], new_classes: Sequence[int], task: int,
                     w_main: np.ndarray) -> RecordDict:
    """The compensation targets' round: the backbone, the task's new classes and the main stream's weights."""
    content = stats_request(RESIDUAL_PHASE, model, new_classes, task)
    content[MAIN_KEY] = to_record({"weights": np.asarray(w_main, np.float64)})
    return content


def parse_main_weights(content: RecordDict) -> np.ndarray:
    return from_record(content[MAIN_KEY])["weights"]


register_strategy(StrategySpec(
    name="ds-al", params=DSALParams, server="fedsim.strategies.dsal:DSALServer",
    client="fedsim.clients.dsal:DSALClient", kind="continual", stream="class-incremental", reducible=True,
    check=check_rounds,
    description="DS-AL (Zhuang et al. 2024): ACIL's frozen backbone with a main (relu) and a compensation (tanh) "
                "analytic stream fitted to the main stream's residual on the new classes; federated",
))
