"""Client part of DPCR: the backbone training of ``fedsim.clients.cil`` plus one statistics pass per task.

Phase ``dpcr-stats`` (``fedsim.algorithms.dpcr.protocol``, after the task's FedAvg rounds): the client runs its share of the
task through the new global backbone and, when the request carries the previous backbone (TSSP), through the old
one, and uploads

    per new class c:  n_c, sum_c x_new, Phi_c = X_c,new^T X_c,new        (fedsim.analytic.ClassStatistics)
    TSSP pair:        X_old^T X_old, X_old^T X_new over its whole share  (fedsim.analytic.RidgeStatistics)

Every array is a sum over samples, so a node serving several clients adds them (``reduce``) and the server's
sum equals the centralized statistics exactly (up to float round-off); see ``fedsim.algorithms.dpcr.learner``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.dpcr import protocol
from fedsim.algorithms.dpcr.learner import class_statistics, drift_statistics, encode_statistics
from fedsim.clients.cil import CILClient, task_share
from fedsim.engine import ClientEnv
from fedsim.frameworks import class_incremental_protocol as cil
from fedsim.frameworks.class_incremental import embed, load_model


class DPCRClient(CILClient):
    """``train`` / ``class-means`` from CILClient, plus ``dpcr-stats``."""

    def other_phase(self, phase: str, content: RecordDict, env: ClientEnv) -> RecordDict:
        if phase != protocol.STATS_PHASE:
            return super().other_phase(phase, content, env)
        arrays, classes, old_arrays = cil.parse_statistics_request(content)
        data = task_share(env, classes)
        model = load_model(env, arrays)
        x_new = embed(model, data.x, env.device).double().numpy()
        stats = class_statistics(x_new, data.labels, dim=model.feature_dim)
        drift = None
        if old_arrays is not None:
            old = load_model(env, old_arrays)
            drift = drift_statistics(embed(old, data.x, env.device).double().numpy(), x_new)
        return cil.statistics_reply(encode_statistics(stats, np.asarray(classes, np.int64), drift), len(data))
