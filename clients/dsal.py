"""Client part of DS-AL: ACIL's base training and features, plus the two statistics phases of a task.

- ``dsal-stats``: on this client's share of the task, z = f(x) B (linear buffer); replies relu(z)^T relu(z),
  relu(z)^T Y, n (main stream) and tanh(z)^T tanh(z) (compensation Gram).
- ``dsal-residual``: with the main weights W_m of the request, replies tanh(z)^T Y~, Y~ = Y - relu(z) W_m on the
  columns of the task's new classes (the rest 0). Both are sums over samples (``reduce`` adds them).
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.acil.learner import encode_statistics
from fedsim.algorithms.dsal import protocol
from fedsim.algorithms.dsal.learner import residual_targets, stream_features
from fedsim.analytic import RidgeStatistics
from fedsim.clients.acil import ACILClient
from fedsim.engine import ClientEnv
from fedsim.frameworks import class_incremental_protocol as cil


class DSALClient(ACILClient):
    buffer_activation = "identity"

    def other_phase(self, phase: str, content: RecordDict, env: ClientEnv) -> RecordDict:
        if phase not in (protocol.STATS_PHASE, protocol.RESIDUAL_PHASE):
            return super().other_phase(phase, content, env)
        p = self.params
        _, data, z = self.task_features(content, env)
        classes = cil.config_ints(content.config_records[cil.CONFIG_KEY], "classes")
        h_main, h_comp = stream_features(z, p.activation), stream_features(z, p.activation_comp)
        if phase == protocol.STATS_PHASE:
            arrays = encode_statistics(RidgeStatistics.from_data(h_main, data.labels, env.num_classes), classes,
                                       "main_")
            comp = encode_statistics(RidgeStatistics(h_comp.T @ h_comp, np.zeros((z.shape[1], 0)), len(data)),
                                     None, "comp_")
            arrays.update(comp_gram=comp["comp_gram"], comp_count=comp["comp_count"])
        else:
            targets = residual_targets(h_main, data.labels, protocol.parse_main_weights(content), classes,
                                       env.num_classes)
            arrays = {"classes": np.asarray(classes, np.int64), "comp_cross": h_comp.T @ targets}
        return cil.statistics_reply(arrays, len(data))
