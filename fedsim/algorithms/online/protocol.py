"""Settings shared by the strategies that learn from an online stream, and the two server-only baselines.

``OnlineParams`` is what every online strategy on a stream has (AEF-OCL, ``online-sgd``, ``joint-ridge``): the frozen
buffer layer (width, activation; seeded by ``fedsim.algorithms.aef_ocl.learner.buffer_seed``, so all three see the same
features), how often metrics.csv gets a row and a test evaluation, and the batches per federated round. The
running and evaluation loop they share is ``fedsim.frameworks.online``.

- ``online-sgd`` (``fedsim.strategies.online_baselines:OnlineSGDServer``): fine-tuning of a linear head, the lower
  bound; optimizer settings come from the scenario's ``[client]`` table.
- ``joint-ridge`` (``fedsim.strategies.online_baselines:JointRidgeServer``): ridge regression on the whole stream at
  once, the upper bound of the analytic learner.

Both run on the server alone (no client part, no messages).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.catalog import ACTIVATIONS
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

_POSITIVE_INT = Interval(1, None, integer=True)

#: The buffer layer's weights (``fedsim.nn.features.BufferLayer``): "normal" N(0, 1/D) or "uniform" U(+-1/sqrt(D)),
#: D = the backbone's dimension (the official analytic-learning buffer: torch's nn.Linear initialization).
BUFFER_INITS = ("normal", "uniform")
#: Where metrics.csv gets its rows in a centralized run: every ``eval_every`` batches, or at the end of each phase
#: of the stream (the last batch before one that brings a class not seen yet, and the last batch): the evaluation
#: points of the official code, which scores after every phase.
EVAL_AT = ("batches", "phases")


@dataclass
class OnlineParams:
    """Settings every online strategy on a stream shares (AEF-OCL, online-sgd, joint-ridge)."""

    buffer_width: int = 2048  # width d of the random buffer layer (the official code uses 8192)
    activation: str = "relu"  # buffer nonlinearity
    buffer_init: str = "normal"  # buffer weights: "normal" N(0, 1/D) or "uniform" U(+-1/sqrt(D)) (official)
    eval_every: int = 100  # centralized: stream batches between rows of metrics.csv
    eval_at: str = "batches"  # centralized: rows every `eval_every` batches, or at each phase end ("phases")
    test_every: int = 1  # rows of metrics.csv between test-set evaluations (the last row always has one)
    sync_every: int | None = None  # batches of each client's stream per federated round (None: split the longest
    # stream into `rounds`); centralized runs on several clients' streams take the union in that order

    _parameter_constraints = {"buffer_width": [_POSITIVE_INT], "sync_every": [_POSITIVE_INT, None],
                              "activation": [Options(ACTIVATIONS)], "eval_every": [_POSITIVE_INT],
                              "test_every": [_POSITIVE_INT], "buffer_init": [Options(BUFFER_INITS)],
                              "eval_at": [Options(EVAL_AT)]}


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
