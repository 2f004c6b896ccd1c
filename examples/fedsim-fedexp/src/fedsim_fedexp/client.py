"""FedExP's client part (Jhunjhunwala, Wang and Joshi, ICLR 2023): FedAvg's local SGD, then the update and its norm.

From the global model x the client runs the requested local training (``LocalTraining``: epochs, batch size, lr,
momentum, weight decay, through ``fedsim.nn.training.train_epochs``) to y_i and sends Delta_i = y_i - x on the
trainable parameters, ||Delta_i||^2 (float64, what the server's step size needs and the mean update no longer
holds), its example count n_i and its buffers (BatchNorm statistics). A client without data sends Delta_i = 0 with
weight 0. Messages: ``fedsim_fedexp.protocol``.
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedsim.engine import ClientEnv
from fedsim.nn.training import train_from
from fedsim_fedexp import protocol


class FedExPClient:
    def __init__(self, params: protocol.FedExPParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        x, training = protocol.parse_request(content)
        data = env.train_data()
        run = train_from(env.initial_model(), x, data.x, data.y, seed=env.seed, device=env.device,
                         **training.train_kwargs())
        diffs = run.end_minus_start()
        return protocol.reply(run.in_model_dtypes(diffs), run.buffers(), run.num_examples, 1, run.loss,
                              protocol.squared_norm(diffs, list(diffs)))

    reduce = staticmethod(protocol.combine)
