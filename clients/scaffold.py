"""SCAFFOLD's client part (Karimireddy et al., ICML 2020, arXiv 1910.06378, Algorithm 1, lines 7-13).

From y = x, each local step is y <- y - eta_l (g_i(y) + c - c_i): ``fedsim.nn.training.train_epochs`` with the
linear term <w, c - c_i> added to the loss (its gradient is the correction). Then

    option II:  c_i^+ = c_i - c + (x - y) / (K eta_l)     (K local steps; the paper's experiments)
    option I:   c_i^+ = grad f_i(x)                        (over the whole partition: one more pass)

and the client sends y and dc_i = c_i^+ - c_i, keeping c_i^+ in its state (float64). With heavy-ball momentum beta
(the request's ``local-momentum``; the paper's steps are plain SGD) K eta_l is replaced by the distance a constant gradient
travels in K momentum steps, eta_l sum_{k=1..K} (1 - beta^k) / (1 - beta), so (x - y) / that is again the average
corrected gradient; for beta = 0 it is K eta_l exactly. Weight decay is part of g_i in both options.
Messages: ``fedsim.algorithms.scaffold.protocol``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.codec import from_record, to_record
from fedsim.algorithms.scaffold import protocol
from fedsim.engine import ClientEnv
from fedsim.frameworks.model_rounds_protocol import momentum_steps
from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs


def momentum_distance(lr: float, momentum: float, steps: int) -> float:
    """How far K heavy-ball SGD steps (torch's SGD, no dampening) move under a constant unit gradient."""
    return lr * momentum_steps(steps, momentum)


def full_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, weight_decay: float,
                  names: list[str], device: str) -> dict[str, np.ndarray]:
    """grad f_i at the model's parameters: the mean cross-entropy gradient over all examples (in batches, in train
    mode as the local steps see BatchNorm) plus weight decay; on a copy, so no running statistic moves."""
    net = copy.deepcopy(model).to(device)
    net.train()
    params = dict(net.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    count = int(x.shape[0])
    for start in range(0, count, batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        net.zero_grad(set_to_none=True)
        (nn.functional.cross_entropy(net(xb), yb) * (xb.shape[0] / count)).backward()
        for n in names:
            if params[n].grad is not None:
                total[n] += params[n].grad.double()
    return {n: (total[n] + weight_decay * params[n].detach().double()).cpu().numpy() for n in names}


class ScaffoldClient:
    def __init__(self, params: protocol.ScaffoldParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        x, c, training = protocol.parse_request(content)
        names = list(c)
        stored = env.state.get(protocol.STATE_KEY)
        c_i = from_record(stored) if stored is not None else {n: np.zeros(np.shape(c[n])) for n in names}
        model = arrays_to_state(env.initial_model(), x)
        data, device = env.train_data(), env.device
        correction = {n: torch.as_tensor(np.asarray(c[n], dtype=np.float64) - c_i[n]) for n in names}

        def corrected(net: nn.Module, xb, yb, logits) -> torch.Tensor:  # noqa: ANN001
            params = dict(net.named_parameters())
            return sum((params[n] * correction[n].to(params[n].device, params[n].dtype)).sum() for n in names)

        start = None
        if self.params.control_update == "I":
            start = full_gradient(model, data.x, data.y, training.batch_size, training.weight_decay, names, device)
        stats = train_epochs(model, data.x, data.y, **training.train_kwargs(), seed=env.seed, device=device,
                             extra_loss=corrected)
        y = state_to_arrays(model)
        steps = int(stats["steps"])
        if steps == 0:  # nothing to learn from (an empty partition): c_i stays
            new = {n: np.asarray(c_i[n], dtype=np.float64) for n in names}
        elif start is not None:
            new = start
        else:
            dist = momentum_distance(training.lr, training.momentum, steps)
            new = {n: c_i[n] - np.asarray(c[n], dtype=np.float64)
                   + (np.asarray(x[n], dtype=np.float64) - np.asarray(y[n], dtype=np.float64)) / dist for n in names}
        delta = {n: (new[n] - c_i[n]).astype(np.asarray(c[n]).dtype) for n in names}
        env.state[protocol.STATE_KEY] = to_record(new)
        return protocol.reply(y, delta, len(data), 1, float(stats["loss"]))

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        return protocol.combine(replies)
