"""AEF-OCL's protocol (Zhuang et al., arXiv 2405.17779), federated mode: one exchange per synchronization round.

    down  MODEL_KEY    ArrayRecord {weights: W (d x c), the global prediction weights}
          SEGMENT_KEY  ConfigRecord {start, length}: the batches [start, start + length) of each client's stream
    up    STATS_KEY    ArrayRecord of the segment's statistics increments (``AEFOCL.statistics()``: gram packed as
                       its upper triangle, cross, count, pfg_count, pfg_mean, pfg_m2) and the prequential counts
                       per class (PREQ_KEYS)
          METRICS_KEY  MetricRecord {num-examples}: the samples the segment held (Flower's key; clients.csv)

Centralized mode sends no message. The server part is ``fedsim.strategies.aef_ocl``, the client part
``fedsim.clients.aef_ocl``; the learner both build is ``fedsim.algorithms.aef_ocl.learner.learner_for``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.frameworks.online_protocol import OnlineParams
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

MODEL_KEY = "aef.model"  # down: {"weights": W}
SEGMENT_KEY = "aef.segment"  # down: {"start": first batch, "length": batches}
STATS_KEY = "aef.stats"  # up: the learner's statistics() plus "preq_correct", "preq_total" (per class)
PREQ_KEYS = ("preq_correct", "preq_total")
METRICS_KEY = "aef.metrics"  # up: {"num-examples": the segment's samples}

MODES = ("auto", "centralized", "federated")
BALANCE_RULES = ("max", "mean")  # PFG's target count: the largest class count (paper) or the mean one
PFG_SPACES = ("backbone", "buffer")  # where PFG keeps its class statistics


@dataclass
class AEFOCLParams(OnlineParams):
    gamma: float = 1e-3  # ridge regularization (R_0 = I / gamma), the official default
    pfg: bool = True  # pseudo-features generator; false = the ACIL-style analytic learner (ablation)
    noise: float = 1.0  # pseudo-features ~ N(mu_c, (noise * std_c)^2)
    balance: str = "max"  # top every seen class up to the largest count ("max", paper) or the mean count
    draws: int | None = None  # pseudo-features drawn per class per balancing (None: the whole deficit, paper)
    pfg_space: str = "backbone"  # class statistics of the backbone features (official) or of the buffer features
    mode: str = "auto"  # "auto" | "centralized" | "federated"
    balance_every: int | None = None  # centralized + PFG: batches between refreshes of the balanced weights
    # (None: eval_every); a new class always triggers one
    defer_rows: int = 256  # centralized: stream rows folded into the RLS state at once when the real-data weights
    # are not read at every batch (PFG predicts with the balanced ones); exact; 0 = update at every batch

    _parameter_constraints = {
        "gamma": [Interval(0, None, closed="neither")], "noise": [Interval(0, None)],
        "balance": [Options(BALANCE_RULES)], "pfg_space": [Options(PFG_SPACES)], "mode": [Options(MODES)],
        "draws": [Interval(1, None, integer=True), None], "balance_every": [Interval(1, None, integer=True), None],
        "defer_rows": [Interval(0, None, integer=True)],
    }

    def federated(self, num_clients: int) -> bool:
        """Whether a run on `num_clients` clients is federated (`mode = "auto"`: more than one client)."""
        return self.mode == "federated" or (self.mode == "auto" and num_clients > 1)


def segment_request(weights: np.ndarray, start: int, length: int) -> RecordDict:
    """The server's round message: the global weights and the segment of the stream to predict and learn."""
    return RecordDict({MODEL_KEY: to_record({"weights": weights}),
                       SEGMENT_KEY: ConfigRecord({"start": int(start), "length": int(length)})})


def parse_segment_request(content: RecordDict) -> tuple[np.ndarray, int, int]:
    """(weights as a read-only view, first batch, number of batches) of a round message."""
    segment = content[SEGMENT_KEY]
    return from_record(content[MODEL_KEY])["weights"], int(segment["start"]), int(segment["length"])


def segment_reply(statistics: dict[str, np.ndarray], correct: np.ndarray, total: np.ndarray) -> RecordDict:
    """A client's (or a node's summed) answer: the statistics increments and the prequential counts per class."""
    arrays = dict(statistics)
    arrays.update(zip(PREQ_KEYS, (correct, total)))
    return RecordDict({STATS_KEY: to_record(arrays),
                       METRICS_KEY: MetricRecord({"num-examples": int(np.asarray(total).sum())})})


def parse_segment_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(statistics increments, prequential correct, prequential total) of a reply, all read-only views."""
    arrays = from_record(content[STATS_KEY])
    correct, total = (arrays.pop(key) for key in PREQ_KEYS)
    return arrays, correct, total


def check_scenario(config) -> None:  # noqa: ANN001
    """Rows at phase ends are a centralized notion: a federated run writes one row per synchronization round."""
    p = config.strategy.params
    if p.eval_at == "phases" and p.federated(config.num_clients):
        raise ConfigError("strategy.eval_at: 'phases' needs a centralized run (strategy.mode = 'centralized' or one "
                          "client); a federated run writes one row per round (strategy.sync_every)")


register_strategy(StrategySpec(
    name="aef-ocl", params=AEFOCLParams, server="fedsim.strategies.aef_ocl:AEFOCLServer",
    client="fedsim.clients.aef_ocl:AEFOCLClient", kind="continual", stream="online", reducible=True,
    check=check_scenario,
    description="AEF-OCL (Zhuang et al. 2024): online exemplar-free continual learning, recursive least squares on "
                "a frozen buffer layer with a pseudo-feature generator for imbalance; centralized or federated",
))
