"""ACIL and G-ACIL: analytic class-incremental learning, centralized and federated (server part).

Zhuang et al., "ACIL: Analytic Class-Incremental Learning with Absolute Memorization and Privacy Protection",
NeurIPS 2022; G-ACIL: Zhuang et al., "GACL: Exemplar-Free Generalized Analytic Continual Learning", NeurIPS 2024
(arXiv 2403.15706); official code github ZHUANGHP/Analytic-continual-learning (``analytic/ACIL.py``). Exemplar-free.

Per task t (the framework's loop, ``fedsim.frameworks.class_incremental``; messages ``fedsim.algorithms.acil.protocol``):

1. t = 0 (base training): ``local_rounds`` rounds of FedAvg with cross-entropy over the task's classes on the task's
   samples (one client = centralized training); from t = 1 on the backbone is frozen and no training round is sent.
2. One statistics round: each client sends C_k = H^T H and Q_k = H^T Y of its share of the task, H = the buffer
   features act(f(x) B) of the frozen backbone; the server adds them to everything it has (exact) and solves
   W = (C + gamma I)^-1 Q: joint ridge on every task so far, the weights ACIL's recursive least squares reaches
   (``fedsim.algorithms.acil.learner``). Federated ACIL therefore equals centralized ACIL given the same backbone.
3. Prediction: argmax of H W over the classes seen so far.

``g-acil`` is the same strategy (the official code runs ``ACILLearner`` for both); with ``stream.generalized = true``
classes recur across tasks (Si-Blurry split, ``fedsim.data.streams.generalized_class_incremental``), which changes
nothing in the learner: W is still the joint ridge solution on the data seen.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.algorithms.acil import protocol
from fedsim.algorithms.acil.learner import (ACIL, AnalyticIncrementalModel, buffer_features, buffer_for,
                                            decode_statistics, scenario_tasks)
from fedsim.engine import ServerContext
from fedsim.frameworks.class_incremental import MAIN, CILServer
from fedsim.frameworks.class_incremental_protocol import TrainSettings
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.nn.training import arrays_to_state, state_to_arrays
from fedsim.frameworks import class_incremental_protocol as cil


class ACILServer(CILServer):
    """Base training on task 0, then one statistics round per task and a ridge solve on the summed statistics."""

    loss = "ce"
    buffer_activation = "relu"  # the buffer layer's own nonlinearity (DS-AL: "identity", its streams apply theirs)

    def tasks(self, ctx: ServerContext) -> list:
        return scenario_tasks(ctx.config, ctx.train_data().labels)

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        self.tasks_ = tasks
        self.learner_ = ACIL(gamma=self.params.gamma)
        self.buffer_ = None  # built on the first statistics round (needs the backbone's width)

    def buffer(self, ctx: ServerContext, model: torch.nn.Module) -> torch.nn.Module:
        """The scenario's buffer layer on the backbone's embedding (the clients build the same one)."""
        if self.buffer_ is None:
            p = self.params
            self.buffer_ = buffer_for(ctx, model.feature_dim, p.buffer_width, self.buffer_activation,
                                      p.buffer_init)
        return self.buffer_

    def train_task(self, ctx, t, task_classes, seen, old_classes, model, old, base):  # noqa: ANN001, ANN201
        """Base training on task 0 only (on the task's samples, by index); later tasks keep the backbone frozen."""
        if t > 0:
            return float("nan")
        settings = TrainSettings("ce", seen, seen, LocalTraining.from_settings(ctx.config.client))
        loss = float("nan")
        for i in range(self.params.local_rounds):
            content = protocol.base_request(state_to_arrays(model), settings, t)
            merged = cil.merge_models([r.content for r in ctx.send(content, round=base + i + 1) if r.ok])
            if merged is not None and merged[1] > 0:
                arrays_to_state(model, merged[0])
                loss = merged[2]
        return loss

    def task_statistics(self, ctx, t, task_classes, model, round_):  # noqa: ANN001, ANN201
        """The summed statistics arrays of task t's round (raises when no client answered)."""
        arrays = self.collect(ctx, protocol.stats_request(protocol.STATS_PHASE, state_to_arrays(model),
                                                          task_classes, t), round_)
        if arrays is None:
            raise RuntimeError(f"no client answered the statistics round of task {t}")
        return arrays

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        arrays = self.task_statistics(ctx, t, task_classes, model, round_)
        stats = decode_statistics(arrays, self.params.buffer_width)
        self.learner_.add_statistics(stats.grow_classes(ctx.num_classes))
        return {"statistics_samples": int(stats.count)}

    def features(self, ctx: ServerContext, model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
        return buffer_features(model, self.buffer(ctx, model), x, ctx.device, ctx.config.evaluation.batch_size)

    def predict(self, ctx, model, x, seen):  # noqa: ANN001, ANN201
        return {MAIN: self.learner_.predict(self.features(ctx, model, x), seen)}

    def streams(self) -> list[tuple[str, float, np.ndarray]]:
        """(activation on the buffer output, ratio, weights) of each output stream, for the saved model."""
        return [("identity", 1.0, self.learner_.coef_)]

    def final_summary(self, ctx: ServerContext) -> dict:
        d = int(self.params.buffer_width)
        return {"buffer_width": d, "gamma": self.params.gamma, "statistics_bytes": 8 * d * (d + ctx.num_classes),
                "generalized": bool(ctx.config.stream.generalized),
                "task_present_classes": [t.present or t.classes for t in self.tasks_]}

    def saved_model(self, ctx, model, seen):  # noqa: ANN001, ANN201
        model = model.cpu()
        return AnalyticIncrementalModel(model, self.buffer(ctx, model), self.streams(), seen, ctx.num_classes,
                                        state={"backbone": model.state_dict(), "classes": list(seen)})
