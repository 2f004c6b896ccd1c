"""The settings every strategy on an online stream shares (torch-free): the online framework's parameters.

``OnlineParams`` is what every online strategy has (AEF-OCL, ``online-sgd``, ``joint-ridge``, and any new one on
``fedsim.frameworks.online``): the frozen buffer layer (width, activation, initialization; built by
``fedsim.nn.features.buffer_layer`` with ``fedsim.nn.features.buffer_seed``, so every strategy on the same scenario
sees the same features), how often metrics.csv gets a row and a test evaluation, and the batches per federated
round. A strategy's parameters subclass it; the names its choices may take live in ``fedsim.catalog``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.catalog import ACTIVATIONS, BUFFER_INITS
from fedsim.params import Interval, Options

__all__ = ["EVAL_AT", "OnlineParams"]

_POSITIVE_INT = Interval(1, None, integer=True)

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
