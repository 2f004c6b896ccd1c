"""FedDyn's server part (Acar et al., ICLR 2021, arXiv 2111.04263, Algorithm 1).

Each round, over the sampled clients P that answered (m: all clients):

    h       <- h - (alpha / m) sum_{k in P} (theta_k - theta)     (trainable parameters, float64, from zero)
    theta   <- (1 / |P|) sum_{k in P} theta_k - h / alpha          (BatchNorm buffers: the mean)

The official code evaluates the same server model (its ``cld_mdl_param`` = mean of the sampled models plus the mean
over all clients of their accumulated drifts, which is -h / alpha); it also divides alpha by each client's relative
dataset size, which the paper does not, and fedsim does not. Messages: ``fedsim.algorithms.feddyn.protocol``; the
round loop is ``fedsim.frameworks.model_rounds.ModelRoundsServer``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.feddyn import protocol
from fedsim.engine import ServerContext
from fedsim.frameworks.model_rounds import ModelRoundsServer


class FedDynServer(ModelRoundsServer):
    def setup(self, ctx: ServerContext, parameters: list[str]) -> None:
        super().setup(ctx, parameters)
        self.h: dict[str, np.ndarray] | None = None

    def request(self, model: dict[str, np.ndarray], round_: int) -> RecordDict:
        return protocol.request(model, self.params.alpha, self.training)

    def aggregate(self, model: dict[str, np.ndarray], replies: list[RecordDict]) -> dict[str, np.ndarray]:
        merged = protocol.merge([protocol.parse_reply(r) for r in replies])
        alpha, m, count = float(self.params.alpha), self.ctx.config.num_clients, merged.clients
        if self.h is None:
            self.h = {k: np.zeros(np.shape(model[k]), dtype=np.float64) for k in self.parameters}
        out = dict(merged.model)
        for key in self.parameters:
            theta = np.asarray(model[key], dtype=np.float64)
            mean = np.asarray(merged.model[key], dtype=np.float64)
            self.h[key] -= (alpha / m) * count * (mean - theta)  # sum_k (theta_k - theta) = |P| (mean - theta)
            out[key] = (mean - self.h[key] / alpha).astype(np.asarray(model[key]).dtype)
        return out
