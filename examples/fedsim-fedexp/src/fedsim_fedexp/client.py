"""FedExP's client part (Jhunjhunwala, Wang and Joshi, ICLR 2023): FedAvg's local SGD, then the update and its norm.

From the global model x the client runs the requested local training (``LocalTraining``: epochs, batch size, lr,
momentum, weight decay, through ``fedsim.nn.training.train_epochs``) to y_i and sends Delta_i = y_i - x on the
trainable parameters, ||Delta_i||^2 (float64, what the server's step size needs and the mean update no longer
holds), its example count n_i and its buffers (BatchNorm statistics). A client without data sends Delta_i = 0 with
weight 0. Messages: ``fedsim_fedexp.protocol``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.engine import ClientEnv
from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs
from fedsim_fedexp import protocol


class FedExPClient:
    def __init__(self, params: protocol.FedExPParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        x, training = protocol.parse_request(content)
        model = arrays_to_state(env.initial_model(), x)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        data = env.train_data()
        stats = train_epochs(model, data.x, data.y, **training.train_kwargs(), seed=env.seed, device=env.device)
        y = state_to_arrays(model)
        diffs = {k: np.asarray(y[k], dtype=np.float64) - np.asarray(x[k], dtype=np.float64) for k in y if k in names}
        update = {k: d.astype(np.asarray(y[k]).dtype) for k, d in diffs.items()}
        buffers = {k: v for k, v in y.items() if k not in names}
        return protocol.reply(update, buffers, len(data), 1, float(stats["loss"]),
                              protocol.squared_norm(diffs, list(diffs)))

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        return protocol.combine(replies)
