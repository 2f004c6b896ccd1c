"""FedBuff's client part (Nguyen et al., AISTATS 2022): local SGD from the model it received, then Delta = x - y.

The client runs the requested local training (``LocalTraining``) from x to y and sends Delta = x - y on the
trainable parameters, y's buffers, its example count and training loss. It knows nothing of staleness: the server
weighs an update by how many server versions passed while it trained. Messages: ``fedsim.algorithms.fedbuff.protocol``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.fedbuff import protocol
from fedsim.engine import ClientEnv
from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs


class FedBuffClient:
    def __init__(self, params: protocol.FedBuffParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        x, training = protocol.parse_request(content)
        model = arrays_to_state(env.initial_model(), x)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        data = env.train_data()
        stats = train_epochs(model, data.x, data.y, **training.train_kwargs(), seed=env.seed, device=env.device)
        y = state_to_arrays(model)
        delta = {k: (np.asarray(x[k], dtype=np.float64) - np.asarray(y[k], dtype=np.float64)).astype(y[k].dtype)
                 for k in y if k in names}
        buffers = {k: v for k, v in y.items() if k not in names}
        return protocol.reply(delta, buffers, len(data), float(stats["loss"]))
