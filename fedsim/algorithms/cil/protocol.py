"""Protocol of the class-incremental baselines (finetune, lwf, lwf-ncm, joint): their one own phase and their
registrations.

The train phase, the statistics requests and replies, their combination and the shared parameters (``CILParams``,
``LwFParams``) are the class-incremental framework's (``fedsim.frameworks.class_incremental_protocol``), which
DPCR's protocol uses too. The baselines add one statistics phase:

    class-means  down  ARRAYS_KEY  the global model          CONFIG_KEY {phase, classes}
                 up    STATS_KEY   per class: count, sum of  METRICS_KEY {num-examples}
                                   L2-normalized embeddings

The server parts are ``fedsim.strategies.cil_baselines`` (on the loop of ``fedsim.frameworks.class_incremental``),
the client part ``fedsim.clients.cil``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import RecordDict

from fedsim.frameworks.class_incremental_protocol import CILParams, LwFParams, check_rounds, statistics_request
from fedsim.registry import StrategySpec, register_strategy

CLASS_MEANS = "class-means"


def class_means_request(model: dict[str, np.ndarray], classes: Sequence[int]) -> RecordDict:
    """Per-class count and sum of the L2-normalized embeddings of ``classes`` (nearest-class-mean prototypes)."""
    return statistics_request(CLASS_MEANS, model, classes)


# -------------------------------------------------------------------------------------------- registrations
for _name, _server, _params, _desc in (
    ("finetune", "FinetuneServer", CILParams,
     "Class-incremental fine-tuning (lower bound): CE on each new task, head over the seen classes"),
    ("lwf", "LwFServer", LwFParams,
     "Learning without Forgetting (Li & Hoiem 2017): CE on new classes + lambda * KD from the previous model"),
    ("lwf-ncm", "LwFNCMServer", LwFParams,
     "LwF backbone with a nearest-class-mean classifier (prototypes stored once, never calibrated)"),
    ("joint", "JointServer", CILParams,
     "Joint training (upper bound): at each task, CE on the data of every task so far"),
):
    register_strategy(StrategySpec(
        name=_name, params=_params, server=f"fedsim.strategies.cil_baselines:{_server}",
        client="fedsim.clients.cil:CILClient", kind="continual", description=_desc, stream="class-incremental",
        reducible=True, check=check_rounds,
    ))
