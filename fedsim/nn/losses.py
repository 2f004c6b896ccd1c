"""Distillation losses, one home, each named for what it computes.

Two forms appear in the papers' code and give different gradients' scale and different values, so they are two
functions, not one name with two meanings:

- ``kl_distillation``: Hinton et al. (2015), ``T^2 * KL(softmax(t / T) || softmax(s / T))``; the data-free and
  ensemble distillation baselines (FedDF, DENSE, Co-Boosting) use it.
- ``soft_cross_entropy``: LwF as PyCIL writes it, ``-sum softmax(t / T) * log_softmax(s / T)`` averaged over the
  batch (no ``T^2``, the teacher's entropy not subtracted); the class-incremental LwF baseline uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kl_distillation", "soft_cross_entropy"]


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    reduction: str = "batchmean") -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T)) * T^2`` (``reduction`` as ``F.kl_div``'s)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction=reduction) * (t * t)


def soft_cross_entropy(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-sum softmax(teacher / T) * log_softmax(logits / T)``, summed over classes, mean over the batch."""
    log_p = torch.log_softmax(logits / temperature, dim=1)
    q = torch.softmax(teacher / temperature, dim=1)
    return -(q * log_p).sum() / logits.shape[0]
