"""Client part of ACIL / G-ACIL (and DS-AL's base): base training and the statistics of a task's share.

Phases (``fedsim.algorithms.acil.protocol``; the framework's ``train`` / ``class-means`` stay CILClient's):
- ``acil-base``: cross-entropy training of the global model on this client's share of task ``task`` (its partition's
  part of the task's indices, so recurring classes are handled), with the request's settings. Reply: the model.
- ``acil-stats``: buffer features H = act(f(x) B) of its share under the frozen backbone; reply C = H^T H (upper
  triangle), Q = H^T Y, n: sums over samples, so a node adds its clients' replies (``reduce``) and the server's sum
  equals the centralized statistics.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.acil import protocol
from fedsim.algorithms.acil.learner import buffer_features, buffer_for, encode_statistics, task_share
from fedsim.analytic import RidgeStatistics
from fedsim.clients.cil import CILClient, restricted_ce
from fedsim.engine import ClientEnv
from fedsim.frameworks import class_incremental_protocol as cil
from fedsim.frameworks.class_incremental import load_model
from fedsim.nn.training import state_to_arrays, train_epochs


class ACILClient(CILClient):
    """``acil-base`` and ``acil-stats`` on top of CILClient's phases."""

    buffer_activation = "relu"

    def other_phase(self, phase: str, content: RecordDict, env: ClientEnv) -> RecordDict:
        if phase == protocol.BASE_PHASE:
            return self.base_training(content, env)
        if phase == protocol.STATS_PHASE:
            model, data, h = self.task_features(content, env)
            stats = RidgeStatistics.from_data(h, data.labels, env.num_classes)
            classes = cil.config_ints(content.config_records[cil.CONFIG_KEY], "classes")
            return cil.statistics_reply(encode_statistics(stats, classes), len(data))
        return super().other_phase(phase, content, env)

    def base_training(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        arrays, s, _ = cil.parse_train_request(content)
        data = task_share(env, protocol.parse_task(content))
        model = load_model(env, arrays)
        stats = train_epochs(model, data.x, data.y, **s.training.train_kwargs(), seed=env.seed, device=env.device,
                             loss_fn=restricted_ce(s.classes, env.num_classes))
        loss = float(stats["loss"])
        return cil.model_reply(state_to_arrays(model.cpu()), len(data), loss if np.isfinite(loss) else 0.0)

    def task_features(self, content: RecordDict, env: ClientEnv):  # noqa: ANN201
        """(frozen backbone, this client's share of the requested task, its buffer features)."""
        arrays, _, _ = cil.parse_statistics_request(content)
        model = load_model(env, arrays)
        data = task_share(env, protocol.parse_task(content))
        p = self.params
        buffer = buffer_for(env, model.feature_dim, p.buffer_width, self.buffer_activation, p.buffer_init)
        return model, data, buffer_features(model, buffer, data.x, env.device)
