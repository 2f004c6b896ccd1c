"""FedBuff's client part (Nguyen et al., AISTATS 2022): local SGD from the model it received, then Delta = x - y.

The client runs the requested local training (``LocalTraining``) from x to y and sends Delta = x - y on the
trainable parameters, y's buffers, its example count and training loss. It knows nothing of staleness: the server
weighs an update by how many server versions passed while it trained. Messages: ``fedsim.algorithms.fedbuff.protocol``.
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedsim.algorithms.fedbuff import protocol
from fedsim.engine import ClientEnv
from fedsim.nn.training import train_from


class FedBuffClient:
    def __init__(self, params: protocol.FedBuffParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        x, training = protocol.parse_request(content)
        data = env.train_data()
        run = train_from(env.initial_model(), x, data.x, data.y, seed=env.seed, device=env.device,
                         **training.train_kwargs())
        return protocol.reply(run.in_model_dtypes(run.start_minus_end()), run.buffers(), run.num_examples, run.loss)
