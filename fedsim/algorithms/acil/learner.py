"""ACIL / G-ACIL's learner: a frozen backbone, a buffer layer and ridge regression learned task by task, exactly.

ACIL (Zhuang et al., "ACIL: Analytic Class-Incremental Learning with Absolute Memorization and Privacy
Protection", NeurIPS 2022) and G-ACIL (Zhuang et al., "GACL: Exemplar-Free Generalized Analytic Continual
Learning", NeurIPS 2024, arXiv 2403.15706); official code github ZHUANGHP/Analytic-continual-learning,
``analytic/ACIL.py`` and ``analytic/AnalyticLinear.py`` (``RecursiveLinear``). The official ``config.py`` maps
both names to the same ``ACILLearner`` ("the G-ACIL is a generalization of the ACIL in the generalized setting");
so does fedsim.

The backbone f is trained with cross-entropy on the base task only, then frozen. Features of an image are
h = act(f(x) B) (the buffer layer: a fixed random projection B, no bias; official ``RandomBuffer``: torch's
``nn.Linear`` reset, i.e. U(+-1/sqrt(D)), ReLU, float64). The classifier after task t is

    W_t = (sum_{s<=t} H_s^T H_s + gamma I)^-1 sum_{s<=t} H_s^T Y_s                (joint ridge on all tasks)

which the official ``RecursiveLinear`` reaches by recursive least squares over mini-batches (R_0 = I / gamma,
R <- R - R X^T (I + X R X^T)^-1 X R, W <- W + R X^T (Y - X W)): the recursion is exact, so the order and size of
the batches, and whether classes recur across tasks (G-ACIL's generalized setting), do not change W. That
*weight invariance* is what makes ACIL federated at no cost: per task every client uploads C_k = H_k^T H_k,
Q_k = H_k^T Y_k (``fedsim.analytic.RidgeStatistics``, additive), the server adds them and solves. ``ACIL``
accumulates the statistics and solves (``solver = "statistics"``, the server's form) or runs the official
recursion on feature rows (``"recursive"``, ``fedsim.analytic.RecursiveLeastSquares``); both give the same W.

Tasks come from ``scenario_tasks``: the framework's disjoint split, or with ``stream.generalized`` the Si-Blurry
split of ``fedsim.data.streams.generalized_class_incremental``, where a task's data are its indices (not every
sample of its classes). A client's share of a task is its partition's part of those indices (``task_share``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.analytic import RecursiveLeastSquares, RidgeStatistics, pack_upper, unpack_upper
from fedsim.data.streams import Task, class_incremental, generalized_class_incremental
from fedsim.estimator import BaseLearner
from fedsim.nn.features import buffer_layer

__all__ = ["ACIL", "SOLVERS", "AnalyticIncrementalModel", "scenario_tasks", "task_share", "buffer_for",
           "buffer_features", "encode_statistics", "decode_statistics", "masked_argmax"]

SOLVERS = ("statistics", "recursive")


def scenario_tasks(config: Any, labels: np.ndarray) -> list[Task]:
    """The scenario's tasks (indices into the training split): disjoint, or generalized with ``stream.generalized``.

    A pure function of the config, so the server and every client derive the same tasks."""
    s = config.stream
    if s.generalized:
        return generalized_class_incremental(labels, s.tasks, seed=config.seed, disjoint_fraction=s.disjoint_fraction,
                                             blurry_fraction=s.blurry_fraction)
    return class_incremental(labels, s.tasks, seed=config.seed, first_task_classes=s.first_task_classes)


def task_share(env: Any, task_index: int):  # noqa: ANN201
    """This client's samples of task ``task_index`` (LabeledData, in partition order)."""
    from fedsim.scenario import train_split

    tasks = scenario_tasks(env.config, train_split(env.config).labels)
    positions = np.flatnonzero(np.isin(np.asarray(env.indices), tasks[int(task_index)].indices))
    return env.train_data().subset(positions)


def buffer_for(view: Any, in_dim: int, width: int, activation: str, init: str) -> nn.Module:
    """The scenario's buffer layer (float64, seeded from the scenario: the same on the server and every client)."""
    return buffer_layer(int(in_dim), int(width), int(view.derive_seed("acil-buffer")), activation, init)


def buffer_features(model: nn.Module, buffer: nn.Module, x: torch.Tensor, device: str = "cpu",
                    batch_size: int = 1024) -> np.ndarray:
    """Buffer features act(f(x) B) (n, width), float64 numpy, of images ``x`` through the frozen backbone."""
    from fedsim.frameworks.class_incremental import embed

    z = embed(model, x, device, batch_size).double()
    with torch.inference_mode():
        return buffer(z).numpy() if len(z) else np.zeros((0, buffer.width))


def masked_argmax(scores: np.ndarray, classes: Any) -> np.ndarray:
    """argmax of ``scores`` (n, C) over the columns of ``classes`` (the classes seen so far)."""
    cols = np.asarray(classes, dtype=np.int64)
    return cols[np.argmax(scores[:, cols], axis=1)]


class ACIL(BaseLearner):
    """Ridge regression over all tasks so far on buffer features (see the module docstring).

    ``solver = "statistics"``: ``add_statistics(stats)`` adds a task's (or the clients' summed) RidgeStatistics and
    re-solves; ``"recursive"``: ``partial_fit(h, y)`` runs the official recursion on feature rows. Learned state:
    ``coef_`` (d, C), ``stats_`` or ``rls_``.
    """

    _fit_hint = "call add_statistics or partial_fit"

    def __init__(self, gamma: float = 0.1, solver: str = "statistics") -> None:
        self.gamma = gamma
        self.solver = solver

    def _check(self, solver: str) -> None:
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.solver != solver:
            raise ValueError(f"this ACIL learner uses solver {self.solver!r}; "
                             f"{'partial_fit' if solver == 'recursive' else 'add_statistics'} needs {solver!r}")

    def add_statistics(self, stats: RidgeStatistics) -> "ACIL":
        """Add C = H^T H, Q = H^T Y of new data (any grouping of clients and tasks) and re-solve W."""
        self._check("statistics")
        if not hasattr(self, "stats_"):
            self.stats_ = RidgeStatistics.zeros(stats.dim, stats.num_classes)
        self.stats_ += stats
        self.coef_ = self.stats_.solve(self.gamma)
        return self

    def partial_fit(self, h: Any, y: Any, num_classes: int | None = None) -> "ACIL":
        """The official recursion (``RecursiveLinear.fit``) on a batch of feature rows; W stays joint ridge."""
        self._check("recursive")
        if not hasattr(self, "rls_"):
            self.rls_ = RecursiveLeastSquares(self.gamma)
        self.rls_.partial_fit(h, y, num_classes)
        self.coef_ = self.rls_.W_
        return self

    def decision_function(self, h: Any) -> np.ndarray:
        self._check_fitted()
        return np.asarray(h, dtype=np.float64) @ self.coef_

    def predict(self, h: Any, classes: Any) -> np.ndarray:
        return masked_argmax(self.decision_function(h), classes)


# ------------------------------------------------------------------------------------------------ wire format
def encode_statistics(stats: RidgeStatistics, classes: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Additive arrays of a statistics reply: the Gram's upper triangle, X^T Y, n (``classes``: the task's, kept
    as is when replies are added)."""
    out = {f"{prefix}gram": pack_upper(stats.gram), f"{prefix}cross": stats.cross,
           f"{prefix}count": np.array([stats.count], np.int64)}
    if classes is not None:
        out["classes"] = np.asarray(classes, np.int64)
    return out


def decode_statistics(arrays: dict[str, Any], dim: int, prefix: str = "") -> RidgeStatistics:
    """Inverse of ``encode_statistics`` (for summed replies too)."""
    return RidgeStatistics(unpack_upper(arrays[f"{prefix}gram"], dim), np.array(arrays[f"{prefix}cross"]),
                           int(np.asarray(arrays[f"{prefix}count"]).reshape(-1)[0]))


# ------------------------------------------------------------------------------------------------ saved model
class AnalyticIncrementalModel(nn.Module):
    """What an analytic class-incremental run saves: images -> scores (n, num_classes) as the run predicted.

    backbone embedding -> float64 -> buffer layer (linear part) -> sum over streams of ratio * act(.) @ W;
    classes outside ``classes`` score -inf. ACIL: one stream (relu, 1.0, W); DS-AL: main (relu) and
    compensation (tanh, C). The state (backbone weights, statistics) stays readable as ``model[key]``.
    """

    def __init__(self, backbone: nn.Module, buffer: nn.Module, streams: list[tuple[str, float, np.ndarray]],
                 classes: list[int], num_classes: int, state: dict | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.buffer = buffer
        self.num_classes = int(num_classes)
        self.activations = [a for a, _, _ in streams]  # names (picklable), looked up in forward
        self.ratios = [float(r) for _, r, _ in streams]
        for i, (_, _, w) in enumerate(streams):
            self.register_buffer(f"weights_{i}", torch.as_tensor(np.asarray(w), dtype=torch.float64))
        self.register_buffer("classes", torch.as_tensor(list(classes), dtype=torch.long))
        self.state = dict(state or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fedsim.nn.features import ACTIVATIONS

        h = self.buffer(self.backbone.embed(x).double())
        scores = sum(r * (ACTIVATIONS[a](h) @ getattr(self, f"weights_{i}"))
                     for i, (a, r) in enumerate(zip(self.activations, self.ratios)))
        out = torch.full((h.shape[0], self.num_classes), float("-inf"), dtype=torch.float64, device=h.device)
        out[:, self.classes] = scores[:, self.classes]
        return out

    def __getitem__(self, key: str):  # noqa: ANN204
        return self.state[key]
