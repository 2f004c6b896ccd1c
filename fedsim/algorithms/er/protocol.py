"""ER's protocol: the framework's train phase with the replay settings, and one buffer phase per task. ER keeps
exemplars (raw images of old classes, on each client), unlike the other class-incremental strategies.

    train      down  (the framework's train request: loss "ce" over the seen classes on the task's data) plus
                     ER_CONFIG {replay_batch_size}: each step replays that many buffered samples
    er-buffer  down  ARRAYS_KEY the model (unused)   CONFIG_KEY {phase, classes (the task's), buffer_size}
               up    STATS_KEY  "buffered": the client's buffer size after offering its share of the task to its
                                reservoir; "offered": samples offered so far (sums over clients)

Each client keeps its own reservoir of ``buffer_size`` indices into its partition in ``env.state``. Server part
``fedsim.strategies.cil_drift:ERServer``, client part ``fedsim.clients.cil_drift:ERClient``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsim.frameworks.class_incremental_protocol import CILParams, CONFIG_KEY, check_rounds, statistics_request
from fedsim.params import Interval
from fedsim.registry import StrategySpec, register_strategy

BUFFER_PHASE = "er-buffer"
ER_CONFIG = "er"
STATE_KEY = "er-reservoir"


@dataclass
class ERParams(CILParams):
    """Reservoir ER (Mammoth models/er.py); linear head. The buffer size is per client."""

    buffer_size: int = 500  # images kept per client (500 x 784 B = 0.39 MB of uint8 Fashion-MNIST images)
    replay_batch_size: int | None = None  # None: the client batch size (Mammoth's minibatch_size default)

    _parameter_constraints = {"buffer_size": [Interval(1, None, integer=True)],
                              "replay_batch_size": [Interval(1, None, integer=True), None]}


def extend_train(content: RecordDict, replay_batch_size: int) -> RecordDict:
    content[ER_CONFIG] = ConfigRecord({"replay_batch_size": int(replay_batch_size)})
    return content


def parse_replay(content: RecordDict) -> int:
    return int(content.config_records[ER_CONFIG]["replay_batch_size"])


def buffer_request(model: dict[str, np.ndarray], classes: Sequence[int], buffer_size: int) -> RecordDict:
    content = statistics_request(BUFFER_PHASE, model, classes)
    content.config_records[CONFIG_KEY]["buffer_size"] = int(buffer_size)
    return content


register_strategy(StrategySpec(
    name="er", params=ERParams, server="fedsim.strategies.cil_drift:ERServer",
    client="fedsim.clients.cil_drift:ERClient", kind="continual", stream="class-incremental", reducible=True,
    check=check_rounds,
    description="Experience replay (uses exemplars): a reservoir buffer of strategy.buffer_size images per client, "
                "each step CE on the current batch + a replay batch",
))
