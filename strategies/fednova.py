"""FedNova's server part (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020, arXiv 2007.07481, Eq. 6-7).

Each round, over the sampled clients that answered, with p_i = n_i / sum_j n_j:

    tau_eff = sum_i p_i ||a_i||_1                  (||a_i||_1 = tau_i, client i's local steps, for plain SGD)
    x      <- x - tau_eff * sum_i p_i d_i          (d_i = (x - y_i) / ||a_i||_1; trainable parameters, float64)

and the BatchNorm buffers take the example-weighted mean of the clients' (as FedAvg's). FedAvg's average
sum_i p_i y_i = x - sum_i p_i tau_i d_i weighs each client's direction by its own steps, so clients with more data
(more steps at fixed epochs) pull the model towards their own optimum; FedNova gives every client the same
effective steps tau_eff. With equal tau_i the two are the same update. ``tau_eff`` of each round is a metrics.csv
column, its mean over the run ``mean_tau_eff`` in summary.json.

The round loop is ``fedsim.frameworks.model_rounds.ModelRoundsServer``; this part is its ``aggregate`` (and the
``round_metrics`` hook). Messages: ``fedsim.algorithms.fednova.protocol``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.fednova import protocol
from fedsim.engine import ServerContext
from fedsim.frameworks.model_rounds import ModelRoundsServer


def nova_step(model: dict[str, np.ndarray], update: dict[str, np.ndarray], buffers: dict[str, np.ndarray],
              parameters: list[str], tau_eff: float) -> dict[str, np.ndarray]:
    """x - tau_eff * d on the trainable parameters (float64, back in their dtype), ``buffers`` for the rest."""
    out = dict(buffers)
    for key in parameters:
        x = np.asarray(model[key], dtype=np.float64)
        step = tau_eff * np.asarray(update[key], dtype=np.float64)
        out[key] = (x - step).astype(np.asarray(model[key]).dtype)
    return out


class FedNovaServer(ModelRoundsServer):
    """FedNova: normalized averaging; no server state beyond the model."""

    def setup(self, ctx: ServerContext, parameters: list[str]) -> None:
        super().setup(ctx, parameters)
        self.tau_eff: dict[int, float] = {}  # round -> tau_eff

    def request(self, model: dict[str, np.ndarray], round_: int) -> RecordDict:
        return protocol.request(model, self.training)

    def aggregate(self, model: dict[str, np.ndarray], replies: list[RecordDict]) -> dict[str, np.ndarray]:
        merged = protocol.merge([protocol.parse_reply(r) for r in replies])
        self.tau_eff[self.round] = merged.extra[protocol.NORM_KEY]
        return nova_step(model, merged.update, merged.buffers, self.parameters, merged.extra[protocol.NORM_KEY])

    def round_metrics(self, round_: int) -> dict[str, Any]:
        return {"tau_eff": self.tau_eff[round_]} if round_ in self.tau_eff else {}

    def summary_values(self) -> dict[str, Any]:
        values = list(self.tau_eff.values())
        return {"mean_tau_eff": float(np.mean(values))} if values else {}
