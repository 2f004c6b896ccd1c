"""Online EWC's protocol: the framework's train phase with the penalty's records, and one Fisher phase per task.

    train        down  (the framework's train request, loss "ce" over the task's new classes from task 1 on) plus
                       FISHER_KEY  the running Fisher F (per parameter)   ANCHOR_KEY  theta* (the previous task's
                       EWC_CONFIG  {ewc_lambda}                                       parameters)
    ewc-fisher   down  ARRAYS_KEY  the trained model        CONFIG_KEY {phase, classes (the task's),
                                                                        logit_classes (the seen ones), batch_size}
                 up    STATS_KEY   per parameter "fisher/<name>": sum over batches of the squared batch gradient;
                                   "batches": the number of batches

Sums, so groups and the server add replies. Server part ``fedsim.strategies.cil_drift:EWCServer``, client part
``fedsim.clients.cil_drift:EWCClient``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsim.codec import from_record, to_record
from fedsim.frameworks.class_incremental_protocol import CILParams, CONFIG_KEY, check_rounds, statistics_request
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy

FISHER_PHASE = "ewc-fisher"
FISHER_KEY = "ewc-fisher"
ANCHOR_KEY = "ewc-anchor"
EWC_CONFIG = "ewc"
PREFIX = "fisher/"


@dataclass
class EWCParams(CILParams):
    """PyCIL models/ewc.py: lamda = 1000, fishermax = 0.0001, alpha = known / total; linear head (IncrementalNet)."""

    ewc_lambda: float = 1000.0
    fisher_max: float | None = 1e-4  # clip of the per-task Fisher; None: no clipping
    gamma: float | None = None  # None: PyCIL's F <- a F + (1 - a) F_t; a float: Schwarz et al.'s F <- gamma F + F_t

    _parameter_constraints = {"ewc_lambda": [Interval(0, None)],
                              "fisher_max": [Interval(0, None, closed="neither"), None],
                              "gamma": [Interval(0, None), None]}


def extend_train(content: RecordDict, fisher: dict[str, np.ndarray], anchor: dict[str, np.ndarray],
                 lam: float) -> RecordDict:
    """Add the penalty's Fisher, anchor and lambda to a framework train request."""
    content[FISHER_KEY] = to_record(fisher)
    content[ANCHOR_KEY] = to_record(anchor)
    content[EWC_CONFIG] = ConfigRecord({"ewc_lambda": float(lam)})
    return content


def parse_penalty(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float] | None:
    """(Fisher, anchor, lambda) of a train request, None when it carries no penalty (the first task)."""
    if FISHER_KEY not in content:
        return None
    return (from_record(content[FISHER_KEY]), from_record(content[ANCHOR_KEY]),
            float(content.config_records[EWC_CONFIG]["ewc_lambda"]))


def fisher_request(model: dict[str, np.ndarray], classes: Sequence[int], logit_classes: Sequence[int],
                   batch_size: int) -> RecordDict:
    content = statistics_request(FISHER_PHASE, model, classes)
    content.config_records[CONFIG_KEY]["logit_classes"] = [int(c) for c in logit_classes]
    content.config_records[CONFIG_KEY]["batch_size"] = int(batch_size)
    return content


register_strategy(StrategySpec(
    name="ewc", params=EWCParams, server="fedsim.strategies.cil_drift:EWCServer",
    client="fedsim.clients.cil_drift:EWCClient", kind="continual", stream="class-incremental", reducible=True,
    check=check_rounds,
    description="Online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018; PyCIL defaults): CE on the new classes "
                "+ lambda/2 sum F (theta - theta*)^2 with one running diagonal Fisher; federated Fisher sums",
))
