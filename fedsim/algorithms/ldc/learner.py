"""LDC's learner: a linear projector from the old backbone's embedding space to the new one, fitted by SGD.

Learned Drift Compensation (Gomez-Villa et al., "Exemplar-free Continual Representation Learning via Learnable
Drift Compensation", ECCV 2024; official code github alviur/ldc, ``LDC_supervised/models/lwf.py``). After task t's
backbone training, a projector p(z) = z W (the official ``nn.Linear(512, 512, bias=False)``: W = weight^T) is
fitted on the current task's samples to map old embeddings onto new ones,

    min_W  mean_{i, j} ((z_i^old W - z_i^new)_j)^2          (``torch.nn.MSELoss()``, mean over samples and dims)

with Adam (lr 1e-3) for 20 epochs of batches of 128 from PyTorch's default ``nn.Linear`` initialization (the
official values), and every stored prototype (an old class) is moved: mu_c <- mu_c W. Deviation: the official code
extracts z^new with the new network still in train mode (BatchNorm normalizes by batch statistics and keeps
updating its running statistics during the 20 epochs); fedsim embeds both networks in eval mode, once.

DPCR's TSSP is the closed form of the same regression with a ridge (Delta = (X_old^T X_old + eps I)^-1 X_old^T
X_new); LDC's is the SGD fit. The fit is not a sum over samples, so the federated form is FedAvg of the clients'
projectors (one round, example-weighted; one client = the centralized official fit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["fit_projector", "initial_projector"]


def initial_projector(dim: int, seed: int) -> np.ndarray:
    """W0 (d, d) of PyTorch's default ``nn.Linear(d, d, bias=False)`` initialization, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / np.sqrt(dim)  # kaiming_uniform_(a=sqrt(5)) on a (d, d) weight is U(-1/sqrt(d), 1/sqrt(d))
    weight = torch.empty(dim, dim).uniform_(-bound, bound, generator=gen)
    return weight.double().numpy().T.copy()


def fit_projector(old: Any, new: Any, init: Any, epochs: int = 20, lr: float = 1e-3, batch_size: int = 128,
                  seed: int = 0) -> np.ndarray:
    """W (d, d) after ``epochs`` of Adam on the mean squared error of z_old W against z_new, from ``init``.

    Batches are drawn from a seeded shuffle each epoch (the official loader shuffles). Float32, as the official
    layer; returns float64.
    """
    x_old = torch.as_tensor(np.asarray(old, dtype=np.float32))
    x_new = torch.as_tensor(np.asarray(new, dtype=np.float32))
    if x_old.shape != x_new.shape:
        raise ValueError(f"old and new embeddings must have the same shape, got {tuple(x_old.shape)} and "
                         f"{tuple(x_new.shape)}")
    w = torch.nn.Parameter(torch.as_tensor(np.asarray(init, dtype=np.float32)).clone())
    n = x_old.shape[0]
    if n == 0 or epochs <= 0:
        return w.detach().double().numpy()
    opt = torch.optim.Adam([w], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(int(epochs)):
        for idx in torch.split(torch.randperm(n, generator=gen), int(batch_size)):
            loss = nn.functional.mse_loss(x_old[idx] @ w, x_new[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return w.detach().double().numpy()
