"""The two server-only baselines of the online strategies: parameters and registrations.

They run on ``fedsim.frameworks.online`` with the shared settings of ``fedsim.frameworks.online_protocol.OnlineParams``
(the same buffer layer, seed and metric rows as AEF-OCL, so their numbers compare):

- ``online-sgd`` (``fedsim.strategies.online_baselines:OnlineSGDServer``): fine-tuning of a linear head, the lower
  bound; optimizer settings come from the scenario's ``[client]`` table (read by the server: there is no client).
- ``joint-ridge`` (``fedsim.strategies.online_baselines:JointRidgeServer``): ridge regression on the whole stream at
  once, the upper bound of the analytic learner.

Both run on the server alone (no client part, no messages).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.frameworks.online_protocol import OnlineParams
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy


@dataclass
class OnlineSGDParams(OnlineParams):
    """Optimizer settings come from the scenario's [client] table (lr, momentum, weight_decay, optimizer, epochs)."""


@dataclass
class JointRidgeParams(OnlineParams):
    gamma: float = 1e-3  # the same default as AEF-OCL

    _parameter_constraints = {"gamma": [Interval(0, None, closed="neither")]}


register_strategy(StrategySpec(
    name="online-sgd", params=OnlineSGDParams, server="fedsim.strategies.online_baselines:OnlineSGDServer",
    client=None, kind="continual", stream="online",
    description="Online SGD fine-tuning of a linear head on AEF-OCL's buffer features (lower bound), same stream",
))
register_strategy(StrategySpec(
    name="joint-ridge", params=JointRidgeParams, server="fedsim.strategies.online_baselines:JointRidgeServer",
    client=None, kind="continual", stream="online",
    description="Ridge regression on the whole stream at once, AEF-OCL's features (upper bound of the analytic "
                "learner)",
))
