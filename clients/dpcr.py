"""Client part of DPCR: the backbone training of ``clients.cil`` plus one statistics pass per task.

Phase ``dpcr-stats`` (after the task's FedAvg rounds): the client runs its share of the task through the new
global backbone (``arrays``) and, when TSSP is on and a previous backbone exists, through the old one
(``old-arrays``), and uploads

    per new class c:  n_c, sum_c x_new, Phi_c = X_c,new^T X_c,new        (fedsim.analytic.ClassStatistics)
    TSSP pair:        X_old^T X_old, X_old^T X_new over its whole share  (fedsim.analytic.RidgeStatistics)

Every array is a sum over samples, so a node serving several clients adds them (``reduce``) and the server's
sum equals the centralized statistics exactly (up to float round-off); see ``fedsim.learners.dpcr``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from clients.cil import ARRAYS_KEY, METRICS_KEY, OLD_KEY, STATS_KEY, WEIGHT_KEY, CILClient, embed, ints, load_model, \
    pack, task_share
from fedsim.engine.client import ClientEnv
from fedsim.learners.dpcr import class_statistics, drift_statistics, encode_statistics


class DPCRClient(CILClient):
    """``train`` / ``class-means`` from CILClient, plus ``dpcr-stats``."""

    def other_phase(self, phase: str, content: RecordDict, cfg: ConfigRecord, env: ClientEnv) -> RecordDict:
        if phase != "dpcr-stats":
            return super().other_phase(phase, content, cfg, env)
        num_classes, shape = self._dataset_shape(env)
        classes = ints(cfg, "classes")
        data = task_share(env, classes)
        model = load_model(env.config, content[ARRAYS_KEY], num_classes, shape)
        x_new = embed(model, data.x, env.device).double().numpy()
        stats = class_statistics(x_new, data.labels, dim=model.feature_dim)
        drift = None
        if OLD_KEY in content:
            old = load_model(env.config, content[OLD_KEY], num_classes, shape)
            drift = drift_statistics(embed(old, data.x, env.device).double().numpy(), x_new)
        arrays = encode_statistics(stats, np.asarray(classes, np.int64), drift)
        return RecordDict({STATS_KEY: pack(arrays), METRICS_KEY: MetricRecord({WEIGHT_KEY: int(len(data))})})
