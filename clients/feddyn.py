"""FedDyn's client part (Acar et al., ICLR 2021, arXiv 2111.04263, Algorithm 1).

Client k minimizes L_k(theta) - <g_k, theta> + (alpha / 2) ||theta - theta^{t-1}||^2 from theta^{t-1} with the
requested local epochs (``LocalTraining``) of ``fedsim.nn.training.train_epochs`` (the quadratic is its proximal
term with mu = alpha, the linear term an extra loss), then updates its state by the first-order condition of that
problem,

    g_k <- g_k - alpha (theta_k^t - theta^{t-1})

(g_k estimates grad L_k(theta_k^t); float64, from zero; trainable parameters only). alpha is read from the
message, as are the epochs, learning rate and batch size. Messages: ``fedsim.algorithms.feddyn.protocol``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.codec import from_record, to_record
from fedsim.engine import ClientEnv
from fedsim.algorithms.feddyn import protocol
from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs


class FedDynClient:
    def __init__(self, params: protocol.FedDynParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        theta, alpha, training = protocol.parse_request(content)
        model = arrays_to_state(env.initial_model(), theta)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        stored = env.state.get(protocol.STATE_KEY)
        g = from_record(stored) if stored is not None else {n: np.zeros(np.shape(theta[n])) for n in names}
        linear = {n: torch.tensor(np.asarray(g[n], dtype=np.float64)) for n in names}

        def dynamic(net: nn.Module, xb, yb, logits) -> torch.Tensor:  # noqa: ANN001
            params = dict(net.named_parameters())
            return -sum((params[n] * linear[n].to(params[n].device, params[n].dtype)).sum() for n in names)

        data = env.train_data()
        stats = train_epochs(model, data.x, data.y, **training.train_kwargs(), seed=env.seed, device=env.device,
                             proximal_mu=alpha, extra_loss=dynamic)
        local = state_to_arrays(model)
        env.state[protocol.STATE_KEY] = to_record({
            n: np.asarray(g[n], dtype=np.float64)
            - alpha * (np.asarray(local[n], dtype=np.float64) - np.asarray(theta[n], dtype=np.float64))
            for n in names})
        return protocol.reply(local, len(data), 1, float(stats["loss"]))

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        return protocol.combine(replies)
