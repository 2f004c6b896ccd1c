"""Torch train / evaluate loops shared by every gradient strategy (FedAvg, FedProx, FuseFL, DPCR's backbone, ...).

One loop, written once: local epochs with optional FedProx proximal term and extra loss terms (e.g. LwF's
distillation), reproducible from `seed` on the CPU (shuffling from a seeded torch.Generator, other randomness such as
dropout from a forked, seeded global RNG), evaluation without gradients, and model <-> numpy conversion for Flower
ArrayRecords.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedsim.errors import ConfigError
from fedsim.nn.seeding import seeded

__all__ = [
    "train_epochs",
    "LocalRun",
    "train_from",
    "evaluate",
    "predict_logits",
    "per_class_accuracy",
    "state_to_arrays",
    "arrays_to_state",
    "set_torch_threads",
    "OPTIMIZERS",
]

OPTIMIZERS = ("sgd", "adam")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


def _as_tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches; a trailing batch of one example joins the previous one (BatchNorm cannot train on 1)."""
    chunks = list(torch.split(perm, batch_size))
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        last = chunks.pop()  # (not `chunks[-2] = cat([chunks[-2], chunks.pop()])`: the target index is taken
        chunks[-1] = torch.cat([chunks[-1], last])  # after the pop, so 2 chunks raised and 3+ dropped a batch)
    return chunks


def _set_train_mode(model: nn.Module) -> None:
    """model.train(), except frozen BatchNorm layers (all parameters requires_grad=False) stay in eval mode.

    Frozen blocks (FuseFL's fused lower stages, a frozen backbone) must not keep updating their running statistics
    while the layers above them train; the official FuseFL code lets them drift, fedsim does not.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def _global_reference(model: nn.Module, global_params: Any) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pairs (trainable parameter, its global value) for the proximal term."""
    named = list(model.named_parameters())
    if global_params is None:  # FedProx: the model as received, i.e. at the start of local training
        refs = [p.detach().clone() for _, p in named]
    elif isinstance(global_params, Mapping):
        missing = [k for k, p in named if p.requires_grad and k not in global_params]
        if missing:
            raise ValueError(f"global_params lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        refs = [_as_tensor(global_params[k]) if k in global_params else p.detach() for k, p in named]
    else:
        refs = [_as_tensor(g) for g in global_params]
        if len(refs) != len(named):
            raise ValueError(f"global_params has {len(refs)} tensors, the model {len(named)} parameters")
    return [(p, r.to(p.device, p.dtype)) for (_, p), r in zip(named, refs) if p.requires_grad]


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"client.optimizer: unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def train_epochs(
    model: nn.Module,
    x: Any,
    y: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    seed: int,
    device: str | torch.device = "cpu",
    proximal_mu: float = 0.0,
    global_params: Any = None,
    loss_fn: LossFn | None = None,
    extra_loss: ExtraLoss | None = None,
) -> dict[str, float | int]:
    """Train `model` in place for `epochs` passes over (x, y); returns {"loss", "num_examples", "steps"}.

    - Only parameters with requires_grad are optimized; frozen BatchNorm layers stay in eval mode.
    - `proximal_mu > 0` adds FedProx's (mu / 2) * ||w - w_global||^2; `global_params` is a sequence aligned with
      `model.parameters()` or a name -> tensor mapping, default the parameters at the start of this call.
    - `loss_fn(logits, y)` defaults to cross-entropy; `extra_loss(model, xb, yb, logits)` adds a term (e.g. LwF's
      distillation) or returns None.
    - Same seed, same inputs, same device (CPU) -> identical result; the caller's global RNG is left untouched.
    - `loss` is the mean `loss_fn` value over the examples of the last epoch (NaN when nothing was trained).
    x may stay on the CPU (batches are moved to `device`); zero examples or zero epochs return without training.
    """
    x, y = _as_tensor(x), _as_tensor(y)
    n = int(x.shape[0])
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}")
    if n == 0 or epochs <= 0:
        return {"loss": math.nan, "num_examples": n, "steps": 0}
    device = torch.device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay)
    criterion = loss_fn or nn.functional.cross_entropy
    prox = _global_reference(model, global_params) if proximal_mu > 0 else []
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    steps, last_loss = 0, math.nan
    _set_train_mode(model)
    with seeded(seed, device):
        for _ in range(epochs):
            total, seen = 0.0, 0
            for idx in _batches(torch.randperm(n, generator=gen), batch_size):
                xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
                logits = model(xb)
                data_loss = criterion(logits, yb)
                loss = data_loss
                if prox:
                    loss = loss + 0.5 * proximal_mu * sum(((p - g) ** 2).sum() for p, g in prox)
                if extra_loss is not None:
                    term = extra_loss(model, xb, yb, logits)
                    if term is not None:
                        loss = loss + term
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total += float(data_loss.detach()) * idx.numel()
                seen += idx.numel()
            last_loss = total / seen
    return {"loss": last_loss, "num_examples": n, "steps": steps}


@dataclass(frozen=True)
class LocalRun:
    """One run of local training from a received model: where it started and ended, which arrays SGD moved (the
    trainable parameters) and which it did not (buffers such as BatchNorm statistics), its loss and step count."""

    start: Mapping[str, np.ndarray]
    end: dict[str, np.ndarray]
    trainable: frozenset[str]
    num_examples: int
    loss: float
    steps: int

    def start_minus_end(self) -> dict[str, np.ndarray]:
        """x - y on the trainable parameters, in float64 (FedNova's and FedBuff's update)."""
        return {k: np.asarray(self.start[k], dtype=np.float64) - np.asarray(v, dtype=np.float64)
                for k, v in self.end.items() if k in self.trainable}

    def end_minus_start(self) -> dict[str, np.ndarray]:
        """y - x on the trainable parameters, in float64 (FedExP's update)."""
        return {k: np.asarray(v, dtype=np.float64) - np.asarray(self.start[k], dtype=np.float64)
                for k, v in self.end.items() if k in self.trainable}

    def in_model_dtypes(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` cast to the dtype each has in the model (an update travels in the model's precision)."""
        return {k: np.asarray(v).astype(self.end[k].dtype) for k, v in arrays.items()}

    def buffers(self) -> dict[str, np.ndarray]:
        """The arrays SGD does not move, as they ended."""
        return {k: v for k, v in self.end.items() if k not in self.trainable}


def train_from(model: nn.Module, start: Mapping[str, np.ndarray], x: Any, y: Any, *, seed: int,
               device: str | torch.device = "cpu", **train_kwargs: Any) -> LocalRun:
    """Load ``start`` into ``model`` and ``train_epochs`` on (x, y): the part every update-sending client shares
    (FedNova, FedBuff, FedExP); ``train_kwargs`` are ``LocalTraining.train_kwargs()`` and ``train_epochs``'s own."""
    arrays_to_state(model, start)
    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    stats = train_epochs(model, x, y, seed=seed, device=device, **train_kwargs)
    return LocalRun(start, state_to_arrays(model), trainable, int(stats["num_examples"]), float(stats["loss"]),
                    int(stats["steps"]))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own mode back (not one flag for all)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def predict_logits(model: nn.Module, x: Any, batch_size: int = 1024, device: str | torch.device = "cpu") -> torch.Tensor:
    """Model outputs (n, c) as float32 on the CPU, in eval mode without gradients, `batch_size` rows at a time."""
    x = _as_tensor(x)
    device = torch.device(device)
    model.to(device)
    outs = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            outs.append(model(x[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0, 0)


def evaluate(model: nn.Module, x: Any, y: Any, batch_size: int = 1024, device: str | torch.device = "cpu",
             loss_fn: LossFn | None = None) -> dict[str, Any]:
    """{"accuracy", "loss" (mean cross-entropy by default), "num_examples", "class_accuracy" (per class, NaN where
    y has none; see `fedsim.results.client_metrics`)}; 0.0 for accuracy and loss on an empty set, so example-weighted
    averages over clients stay finite."""
    y = _as_tensor(y).long()
    n = int(y.shape[0])
    if n == 0:
        return {"accuracy": 0.0, "loss": 0.0, "num_examples": 0, "class_accuracy": np.zeros(0)}
    logits = predict_logits(model, x, batch_size=batch_size, device=device)
    criterion = loss_fn or nn.functional.cross_entropy
    with torch.inference_mode():
        loss = float(criterion(logits, y))
    pred = logits.argmax(dim=1)
    acc = int((pred == y).sum()) / n  # exact count ratio (a float32 mean is off in the 8th digit)
    return {"accuracy": acc, "loss": loss, "num_examples": n,
            "class_accuracy": per_class_accuracy(pred, y, max(int(logits.shape[1]), int(y.max()) + 1))}


def per_class_accuracy(pred: Any, y: Any, num_classes: int) -> np.ndarray:
    """Accuracy per class (num_classes,), NaN for classes absent from y (use np.nanmean for mean class accuracy)."""
    pred = _as_tensor(pred).cpu().numpy().reshape(-1)
    y = _as_tensor(y).cpu().numpy().reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"pred has {pred.shape[0]} entries but y has {y.shape[0]}")
    support = np.bincount(y, minlength=num_classes)[:num_classes].astype(np.float64)
    correct = np.bincount(y[pred == y], minlength=num_classes)[:num_classes].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / np.maximum(support, 1), np.nan)


def state_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Parameters and buffers (BatchNorm statistics included) as numpy copies, in `state_dict` order.

    The order is the modules' registration order, identical for identically built models, so the dict maps onto
    a Flower ArrayRecord and back without sorting.
    """
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def arrays_to_state(model: nn.Module, arrays: Mapping[str, Any]) -> nn.Module:
    """Load `state_to_arrays` output (same keys, strict) into `model`, in place; returns the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in arrays]
    unexpected = [k for k in arrays if k not in own]
    if missing or unexpected:
        raise ValueError(f"arrays do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    state = {k: torch.tensor(np.asarray(arrays[k])) for k in own}
    model.load_state_dict(state, strict=True)
    return model


def set_torch_threads(n: int | None) -> int:
    """Limit torch's intra-op threads (e.g. to a Ray actor's CPU share); returns the previous value.

    n None or < 1 leaves the setting alone. Inter-op threads can only be set before torch's first parallel work;
    that attempt is skipped silently when too late.
    """
    previous = torch.get_num_threads()
    if n is not None and n >= 1:
        torch.set_num_threads(int(n))
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(int(n))
    return previous

