"""DS-AL: Dual-Stream Analytic Learning, centralized and federated (server part).

Zhuang et al., "DS-AL: A Dual-Stream Analytic Learning for Exemplar-Free Class-Incremental Learning", AAAI 2024;
official code github ZHUANGHP/Analytic-continual-learning (``analytic/DSAL.py``). ACIL's loop
(``fedsim.strategies.acil``: base training on task 0, frozen backbone after it) with two analytic streams on one
linear buffer z = f(x) B; per task, in its statistics round (messages ``fedsim.algorithms.dsal.protocol``):

1. ``dsal-stats``: the clients' relu(z) Gram and cross-products with Y (main stream) and tanh(z) Gram, summed;
   the server solves W_m = ridge(main, gamma_main) on all tasks so far.
2. ``dsal-residual``: W_m goes down; each client returns tanh(z)^T Y~ with Y~ = Y - relu(z) W_m on the task's new
   classes only (previous label cleansing), summed; the server solves W_c = ridge(compensation, gamma_comp).
3. Prediction: argmax(relu(z) W_m + C tanh(z) W_c) over the classes seen so far.

The math is ``fedsim.algorithms.dsal.learner.DSAL``; with summed statistics, federated DS-AL equals centralized
DS-AL on the union of the clients' data given the same backbone.
"""

from __future__ import annotations

import numpy as np

from fedsim.algorithms.acil.learner import decode_statistics
from fedsim.algorithms.dsal import protocol
from fedsim.algorithms.dsal.learner import DSAL, stream_features
from fedsim.analytic import RidgeStatistics
from fedsim.engine import ServerContext
from fedsim.frameworks.class_incremental import MAIN
from fedsim.nn.training import state_to_arrays
from fedsim.strategies.acil import ACILServer


class DSALServer(ACILServer):
    buffer_activation = "identity"  # the streams apply relu / tanh themselves

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        super().begin(ctx, tasks)
        p = self.params
        self.learner_ = DSAL(p.gamma, p.gamma_comp, p.compensation_ratio, p.activation, p.activation_comp)

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        d, c = int(self.params.buffer_width), ctx.num_classes
        first = self.collect(ctx, protocol.stats_request(protocol.STATS_PHASE, state_to_arrays(model),
                                                         task_classes, t), round_)
        if first is None:
            raise RuntimeError(f"no client answered the statistics round of task {t}")
        self.learner_.add_main(decode_statistics(first, d, "main_").grow_classes(c))
        content = protocol.residual_request(state_to_arrays(model), task_classes, t, self.learner_.coef_main_)
        second = self.collect(ctx, content, round_)
        if second is None:
            raise RuntimeError(f"no client answered the residual round of task {t}")
        comp_gram = decode_statistics({**first, "comp_cross": np.zeros((d, c))}, d, "comp_").gram
        self.learner_.add_compensation(RidgeStatistics(comp_gram, second["comp_cross"],
                                                       int(np.asarray(first["comp_count"]).reshape(-1)[0])))
        return {"statistics_samples": int(np.asarray(first["main_count"]).reshape(-1)[0])}

    def predict(self, ctx, model, x, seen):  # noqa: ANN001, ANN201
        return {MAIN: self.learner_.predict(self.features(ctx, model, x), seen)}

    def streams(self) -> list[tuple[str, float, np.ndarray]]:
        p, learner = self.params, self.learner_
        return [(p.activation, 1.0, learner.coef_main_), (p.activation_comp, float(p.compensation_ratio),
                                                           learner.coef_comp_)]

    def final_summary(self, ctx: ServerContext) -> dict:
        out = super().final_summary(ctx)
        d = int(self.params.buffer_width)
        out.update(statistics_bytes=2 * 8 * d * (d + ctx.num_classes), gamma_comp=self.params.gamma_comp,
                   compensation_ratio=self.params.compensation_ratio)
        return out
