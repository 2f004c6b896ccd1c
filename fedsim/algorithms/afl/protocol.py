"""AFL's protocol (Zhuang et al., arXiv 2405.16240): one request down, one statistics upload up.

    down  REQUEST_KEY  ConfigRecord {gamma, upload, batch_size}
    up    ARRAYS_KEY   ArrayRecord of ``fedsim.algorithms.afl.learner.encode_reply`` (statistics or the local solution)
          METRICS_KEY  MetricRecord {num-examples}

Everything the client needs travels in the request (the client reads no strategy setting from the scenario). The
server part is ``fedsim.strategies.afl``, the client part ``fedsim.clients.afl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

ARRAYS_KEY = "afl"
METRICS_KEY = "afl.metrics"
REQUEST_KEY = "afl.config"

TARGETS = ("ridge", "least-squares")  # == fedsim.analytic.TARGETS (tested)
UPLOADS = ("auto", "statistics", "factor", "solution")  # == fedsim.algorithms.afl.learner.UPLOADS (tested)


@dataclass
class AFLParams:
    gamma: float = 1.0  # ridge regularization (the regularization intermediary); AFL's only hyperparameter
    target: str = "ridge"  # "ridge" | "least-squares" (the official code's, behind the paper's numbers)
    upload: str = "auto"  # "auto": the smaller exact form per client | "statistics": (C_k, Q_k) packed |
    #                       "factor": (R_k, Q_k), R_k^T R_k = C_k | "solution": the paper's (W_k, C_k + gamma I)
    batch_size: int = 1024  # rows per forward pass of the feature map (memory only; the result is the same)

    _parameter_constraints = {"gamma": [Interval(0, None, closed="neither")], "target": [Options(TARGETS)],
                              "upload": [Options(UPLOADS)], "batch_size": [Interval(1, None, integer=True)]}


def request(params: AFLParams) -> RecordDict:
    """The server's one message: gamma, the upload form and the rows per forward pass of the feature map."""
    return RecordDict({REQUEST_KEY: ConfigRecord({"gamma": float(params.gamma), "upload": str(params.upload),
                                                  "batch_size": int(params.batch_size)})})


def parse_request(content: RecordDict) -> tuple[float, str, int]:
    """(gamma, upload, batch_size) of a request."""
    cfg = content.config_records[REQUEST_KEY]
    return float(cfg["gamma"]), str(cfg["upload"]), int(cfg["batch_size"])


def reply(arrays: dict[str, np.ndarray], num_examples: int) -> RecordDict:
    return RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord({"num-examples": int(num_examples)})})


def parse_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], int]:
    """(arrays as read-only views, number of examples) of a client's reply."""
    return from_record(content[ARRAYS_KEY]), int(content[METRICS_KEY]["num-examples"])


def _single_round(config) -> None:  # noqa: ANN001
    if config.rounds != 1:
        raise ConfigError(f"rounds: {config.rounds} rounds requested, but AFL is single-round (its result is "
                          "final after one round); set rounds = 1")


register_strategy(StrategySpec(
    name="afl", params=AFLParams, server="fedsim.strategies.afl:AFLServer", client="fedsim.clients.afl:AFLClient",
    fixed_rounds=lambda params: 1, check=_single_round, reducible=True,
    description="AFL (Zhuang et al. 2024): one round of frozen-feature ridge statistics, AA law + RI, exact and "
                "weight-invariant",
))
