"""ACIL / G-ACIL's protocol (Zhuang et al., NeurIPS 2022 / NeurIPS 2024): the class-incremental framework's
messages (``fedsim.frameworks.class_incremental_protocol``) with two phases of its own.

    acil-base   down  ARRAYS_KEY  the global model       CONFIG_KEY {phase: "acil-base", task, loss "ce", classes,
                                                                     data_classes, the local training}
                up    ARRAYS_KEY  the client's model     METRICS_KEY {num-examples, train_loss}
    acil-stats  down  ARRAYS_KEY  the frozen backbone    CONFIG_KEY {phase: "acil-stats", task, classes}
                up    STATS_KEY   {gram (upper triangle of H^T H), cross H^T Y, count, classes}  (sums over samples)

``task`` is the task's index: the client takes its share of that task's indices
(``fedsim.algorithms.acil.learner.task_share``), so classes may recur across tasks (``stream.generalized``).
Base training runs on task 0 only (``local_rounds`` FedAvg rounds, as the framework's training); from task 1 on
the backbone is frozen and each task is one statistics round. The server part is ``fedsim.strategies.acil``, the
client part ``fedsim.clients.acil``.

Defaults from the official code (github ZHUANGHP/Analytic-continual-learning): ``config.py`` ``--buffer-size``
8192, ``--gamma`` 0.1; ``analytic/Buffer.py`` ``RandomBuffer`` = torch's ``nn.Linear`` initialization
(U(+-1/sqrt(D)), ``buffer_init = "uniform"``), no bias, ReLU, float64 (``ACIL.make_model``: dtype double); the
base network is backbone + ``nn.Linear`` trained with cross-entropy (``head = "linear"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.catalog import ACTIVATIONS, BUFFER_INITS
from fedsim.frameworks.class_incremental_protocol import (CONFIG_KEY, CILParams, TrainSettings, check_rounds,
                                                          statistics_request, train_request)
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

BASE_PHASE = "acil-base"
STATS_PHASE = "acil-stats"
TASK = "task"  # the task index in the phase's ConfigRecord


@dataclass
class ACILParams(CILParams):
    buffer_width: int = 8192  # official --buffer-size (config.py)
    gamma: float = 0.1  # official --gamma (config.py; README: 0.1 on CIFAR-100 and ImageNet-1k)
    activation: str = "relu"  # official RandomBuffer activation
    buffer_init: str = "uniform"  # official RandomBuffer: nn.Linear's reset, U(+-1/sqrt(D))

    _parameter_constraints = {"buffer_width": [Interval(1, None, integer=True)],
                              "gamma": [Interval(0, None, closed="neither")], "activation": [Options(ACTIVATIONS)],
                              "buffer_init": [Options(BUFFER_INITS)]}


def base_request(model: dict[str, np.ndarray], settings: TrainSettings, task: int) -> RecordDict:
    """A base-training round on task ``task``'s samples (the framework's train request, own phase name)."""
    content = train_request(model, settings)
    content[CONFIG_KEY]["phase"] = BASE_PHASE
    content[CONFIG_KEY][TASK] = int(task)
    return content


def stats_request(phase: str, model: dict[str, np.ndarray], classes: Sequence[int], task: int) -> RecordDict:
    """A statistics round over this client's share of task ``task`` under the frozen ``model``."""
    content = statistics_request(phase, model, classes)
    content[CONFIG_KEY][TASK] = int(task)
    return content


def parse_task(content: RecordDict) -> int:
    return int(content.config_records[CONFIG_KEY][TASK])


for _name, _desc in (
    ("acil", "ACIL (Zhuang et al. 2022): backbone trained on the base task then frozen, buffer layer + recursive "
             "least squares (joint ridge) over the tasks; federated by summing client statistics"),
    ("g-acil", "G-ACIL (Zhuang et al. 2024): ACIL in the generalized setting (classes recur, stream.generalized); "
               "the official code runs the same learner for both"),
):
    register_strategy(StrategySpec(
        name=_name, params=ACILParams, server="fedsim.strategies.acil:ACILServer",
        client="fedsim.clients.acil:ACILClient", kind="continual", description=_desc, stream="class-incremental",
        reducible=True, check=check_rounds,
    ))
