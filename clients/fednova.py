"""FedNova's client part (Wang et al., NeurIPS 2020, arXiv 2007.07481): local SGD, then the normalized update.

From the global model x the client runs the requested local training (``LocalTraining``: epochs, batch size, lr,
momentum, weight decay; tau_i = epochs * ceil(n_i / batch size) steps of ``fedsim.nn.training.train_epochs``) to
y_i, and sends

    d_i = (x - y_i) / ||a_i||_1        ||a_i||_1 = tau_i (plain SGD), sum_{k=1..tau_i} (1 - rho^k) / (1 - rho)
                                       under heavy-ball momentum rho (``momentum_steps``)

on the trainable parameters, with ||a_i||_1, tau_i, its example count n_i and its buffers (BatchNorm statistics).
d_i is lr times the weighted mean of the gradients the client took, so its length no longer grows with the number
of steps. A client without data sends d_i = 0 with weight 0. Messages: ``fedsim.algorithms.fednova.protocol``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.fednova import protocol
from fedsim.engine import ClientEnv
from fedsim.frameworks.model_rounds_protocol import momentum_steps
from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs


class FedNovaClient:
    def __init__(self, params: protocol.FedNovaParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        x, training = protocol.parse_request(content)
        model = arrays_to_state(env.initial_model(), x)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        data = env.train_data()
        stats = train_epochs(model, data.x, data.y, **training.train_kwargs(), seed=env.seed, device=env.device)
        y = state_to_arrays(model)
        steps = int(stats["steps"])
        norm = momentum_steps(steps, training.momentum)
        update = {}
        for key in y:
            if key in names:
                diff = np.asarray(x[key], dtype=np.float64) - np.asarray(y[key], dtype=np.float64)
                update[key] = (diff / norm if norm > 0 else np.zeros_like(diff)).astype(np.asarray(y[key]).dtype)
        buffers = {k: v for k, v in y.items() if k not in names}
        return protocol.reply(update, buffers, len(data), 1, float(stats["loss"]), steps, norm)

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        return protocol.combine(replies)
