"""FedExP's server part (Jhunjhunwala, Wang and Joshi, ICLR 2023, arXiv 2301.09604, Algorithm 1).

Each round, over the sampled clients that answered, with p_i = n_i / sum_j n_j (trainable parameters, float64):

    Delta  = sum_i p_i Delta_i                                     (Delta_i = y_i - x, client i's update)
    eta_g  = max(1, sum_i p_i ||Delta_i||^2 / (2 (||Delta||^2 + epsilon)))
    x     <- x + eta_g * Delta

and the BatchNorm buffers take the example-weighted mean of the clients' (as FedAvg's). The step size is the
paper's: an extrapolation that the projections-onto-convex-sets view of FedAvg motivates, never below FedAvg's 1.
``eta_g`` of each round is a metrics.csv column, its mean over the run ``mean_eta_g`` in summary.json.

Evaluation: with ``average_last_two`` (the default, as in the paper and its official code) the model evaluated,
logged and saved as model.pt is (x_t + x_{t-1}) / 2 on the trainable parameters (the latest buffers) once two
rounds were aggregated, x_1 after the first; the rounds continue from x_t itself.

The round loop is ``fedsim.frameworks.model_rounds.ModelRoundsServer``; this part is its ``aggregate`` and the
reporting hooks, the same shape as FedNova's (docs/ARCHITECTURE.md). Messages: ``fedsim_fedexp.protocol``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedsim.engine import ServerContext
from fedsim.frameworks.model_rounds import ModelRoundsServer
from fedsim_fedexp import protocol


def fedexp_step(model: dict[str, np.ndarray], merged: protocol.UpdateReply, parameters: list[str],
                epsilon: float) -> tuple[dict[str, np.ndarray], float]:
    """(x + eta_g * Delta on the trainable parameters, back in their dtype, the buffers of ``merged``; eta_g)."""
    eta_g = protocol.server_step_size(merged.extra[protocol.SQ_NORM_KEY], protocol.squared_norm(merged.update, parameters), epsilon)
    out = dict(merged.buffers)
    for key in parameters:
        x = np.asarray(model[key], dtype=np.float64)
        out[key] = (x + eta_g * np.asarray(merged.update[key], dtype=np.float64)).astype(np.asarray(model[key]).dtype)
    return out, eta_g


def mean_of_two(latest: dict[str, np.ndarray], previous: dict[str, np.ndarray],
                parameters: list[str]) -> dict[str, np.ndarray]:
    """(latest + previous) / 2 on the trainable parameters (float64, back in their dtype); ``latest``'s buffers."""
    out = dict(latest)
    for key in parameters:
        mean = (np.asarray(latest[key], dtype=np.float64) + np.asarray(previous[key], dtype=np.float64)) / 2.0
        out[key] = mean.astype(np.asarray(latest[key]).dtype)
    return out


class FedExPServer(ModelRoundsServer):
    """FedExP: FedAvg's rounds with the extrapolated server step; keeps the previous global model to evaluate
    the mean of the last two."""

    def setup(self, ctx: ServerContext, parameters: list[str]) -> None:
        super().setup(ctx, parameters)
        self.eta_g: dict[int, float] = {}  # round -> eta_g
        self.previous: dict[str, np.ndarray] | None = None  # x_{t-1} once two rounds were aggregated

    def request(self, model: dict[str, np.ndarray], round_: int) -> RecordDict:
        return protocol.request(model, self.training)

    def aggregate(self, model: dict[str, np.ndarray], replies: list[RecordDict]) -> dict[str, np.ndarray]:
        merged = protocol.merge([protocol.parse_reply(r) for r in replies])
        new, self.eta_g[self.round] = fedexp_step(model, merged, self.parameters, self.params.epsilon)
        self.previous = model if self.eta_g.keys() - {self.round} else None
        return new

    def evaluation_model(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.params.average_last_two or self.previous is None:
            return model
        return mean_of_two(model, self.previous, self.parameters)

    def round_metrics(self, round_: int) -> dict[str, Any]:
        return {"eta_g": self.eta_g[round_]} if round_ in self.eta_g else {}

    def summary_values(self) -> dict[str, Any]:
        values = list(self.eta_g.values())
        return {"mean_eta_g": float(np.mean(values))} if values else {}
