"""Online EWC's learner: the diagonal Fisher, its accumulation over tasks and the quadratic penalty.

Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) in its online form (Schwarz et al., "Progress &
Compress", ICML 2018): one running Fisher F and one anchor theta* (the parameters after the latest task), instead
of one (F_t, theta_t*) per task. Defaults from PyCIL (github G-U-N/PyCIL, ``models/ewc.py``):

    Fisher of task t     F_t = min(mean_b g_b^2, fishermax)        g_b: gradient of the batch-mean cross-entropy of
                                                                   batch b (over the seen classes' logits);
                                                                   fishermax = 1e-4
    accumulation         F <- alpha F + (1 - alpha) F_t            alpha = known / total classes (PyCIL's)
                         F <- gamma F + F_t                        (Schwarz et al.; ``gamma`` set)
    penalty              lambda / 2 sum_k F_k (theta_k - theta*_k)^2          lambda = 1000
    loss from task 1 on  CE(new classes' logits, y) + penalty

PyCIL's Fisher is an empirical Fisher of mini-batch gradients (not per-sample), taken with the network in train
mode, so its BatchNorm running statistics move during the Fisher pass; fedsim takes the same batch gradients in
eval mode and leaves the network unchanged. The sums (sum_b g_b^2, number of batches) add up over clients; the
server divides and clips (``fisher_from_sums``), which equals the centralized Fisher for the same batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["fisher_sums", "fisher_from_sums", "accumulate_fisher", "ewc_penalty"]


def fisher_sums(model: nn.Module, x: Any, y: Any, loss_fn: Any, batch_size: int, seed: int,
                device: str = "cpu") -> tuple[dict[str, np.ndarray], int]:
    """(sum over batches of the squared batch gradient per parameter, number of batches), eval mode, float64."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: np.zeros(tuple(p.shape)) for name, p in params.items()}
    n = int(x.shape[0])
    if n == 0:
        return sums, 0
    model.to(device)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(int(seed))
    batches = 0
    for idx in torch.split(torch.randperm(n, generator=gen), int(batch_size)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[idx].to(device)), y[idx].to(device)).backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach().double().cpu().numpy() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return sums, batches


def fisher_from_sums(sums: Mapping[str, Any], batches: int, fisher_max: float | None = 1e-4) -> dict[str, np.ndarray]:
    """F_t = min(sum / batches, fisher_max) per parameter (no clipping when ``fisher_max`` is None)."""
    out = {}
    for name, s in sums.items():
        f = np.asarray(s, dtype=np.float64) / max(int(batches), 1)
        out[name] = f if fisher_max is None else np.minimum(f, float(fisher_max))
    return out


def accumulate_fisher(old: Mapping[str, Any] | None, new: Mapping[str, Any], known: int, total: int,
                      gamma: float | None = None) -> dict[str, np.ndarray]:
    """The running Fisher: ``new`` alone at the first task; then alpha old + (1 - alpha) new with alpha = known /
    total (PyCIL), or gamma old + new when ``gamma`` is given (Schwarz et al.)."""
    if old is None:
        return {k: np.asarray(v, dtype=np.float64).copy() for k, v in new.items()}
    if gamma is None:
        alpha = known / total
        return {k: alpha * np.asarray(old[k]) + (1.0 - alpha) * np.asarray(v) for k, v in new.items()}
    return {k: float(gamma) * np.asarray(old[k]) + np.asarray(v) for k, v in new.items()}


def ewc_penalty(model: nn.Module, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                lam: float) -> torch.Tensor:
    """lambda / 2 * sum_k F_k (theta_k - theta*_k)^2 over the parameters ``fisher`` names (differentiable)."""
    terms = [(fisher[name] * (p - anchor[name]) ** 2).sum() for name, p in model.named_parameters() if name in fisher]
    return 0.5 * float(lam) * torch.stack(terms).sum() if terms else torch.zeros(())
