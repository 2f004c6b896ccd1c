"""SCAFFOLD's server part (Karimireddy et al., ICML 2020, arXiv 1910.06378, Algorithm 1).

Each round: sample S (``fraction_train``, seeded), send (x, c), receive the clients' local models y_i and control
updates dc_i = c_i^+ - c_i, then

    x <- x + eta_g * (1/|S|) sum_{i in S} (y_i - x)     (trainable parameters; BatchNorm buffers: the mean)
    c <- c + (1/N) sum_{i in S} dc_i                    (N: all clients)

over the clients that answered. The round loop (sampling, evaluation, logging, saving) is
``fedsim.frameworks.model_rounds.ModelRoundsServer``; this part adds c to ``setup``, ``request`` and
``aggregate``. Messages: ``fedsim.algorithms.scaffold.protocol``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.scaffold import protocol
from fedsim.engine import ServerContext
from fedsim.frameworks.model_rounds import ModelRoundsServer, step_towards


class ScaffoldServer(ModelRoundsServer):
    """SCAFFOLD: the server control variate c (float64) lives here, each client's c_i in its own state."""

    def setup(self, ctx: ServerContext, parameters: list[str]) -> None:
        super().setup(ctx, parameters)
        self.control: dict[str, np.ndarray] | None = None

    def request(self, model: dict[str, np.ndarray], round_: int) -> RecordDict:
        if self.control is None:
            self.control = {k: np.zeros(np.shape(model[k]), dtype=np.float64) for k in self.parameters}
        dtype = {k: np.asarray(model[k]).dtype for k in self.parameters}
        return protocol.request(model, {k: v.astype(dtype[k]) for k, v in self.control.items()}, self.training)

    def aggregate(self, model: dict[str, np.ndarray], replies: list[RecordDict]) -> dict[str, np.ndarray]:
        merged = protocol.merge([protocol.parse_reply(r) for r in replies])
        n = self.ctx.config.num_clients
        for key, value in self.control.items():
            value += np.asarray(merged.control[key], dtype=np.float64) / n
        return step_towards(model, merged.model, self.parameters, self.params.server_learning_rate)
