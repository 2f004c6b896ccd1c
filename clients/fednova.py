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
from fedsim.nn.training import train_from


class FedNovaClient:
    def __init__(self, params: protocol.FedNovaParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        x, training = protocol.parse_request(content)
        data = env.train_data()
        run = train_from(env.initial_model(), x, data.x, data.y, seed=env.seed, device=env.device,
                         **training.train_kwargs())
        norm = momentum_steps(run.steps, training.momentum)
        update = {k: d / norm if norm > 0 else np.zeros_like(d) for k, d in run.start_minus_end().items()}
        return protocol.reply(run.in_model_dtypes(update), run.buffers(), run.num_examples, 1, run.loss, run.steps,
                              norm)

    reduce = staticmethod(protocol.combine)
