"""Continual-learning metrics: the accuracy matrix and the numbers read off it.

For a class-incremental run of T tasks, ``a[i][j]`` is the test accuracy, after training on task i, on the test
samples of task j's classes (j <= i; entries j > i are NaN: those classes are unseen). Alongside it
``A_i`` is the accuracy after task i on the test samples of *all* classes seen so far (sample-weighted, as PyCIL
and the DPCR paper report it). Then

- last accuracy          A_{T-1}
- average incremental    (1/T) sum_i A_i                                                  (Rebuffi et al., iCaRL)
- forgetting             (1/(T-1)) sum_{j<T-1} max_{i in [j, T-2]} a[i][j] - a[T-1][j]     (Chaudhry et al. 2018)
- backward transfer      (1/(T-1)) sum_{j<T-1} a[T-1][j] - a[j][j]                          (Lopez-Paz & Ranzato 2017)

Forgetting and backward transfer need T >= 2 (NaN otherwise). Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "AccuracyMatrix",
    "accuracy_on",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
]


def _as_numpy(a) -> np.ndarray:  # noqa: ANN001
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def accuracy_on(pred, y, classes: Sequence[int]) -> float:  # noqa: ANN001
    """Accuracy of ``pred`` against ``y`` on the samples whose label is in ``classes`` (NaN if there are none)."""
    pred, y = _as_numpy(pred).reshape(-1), _as_numpy(y).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"pred and y differ in length: {pred.shape[0]} vs {y.shape[0]}")
    mask = np.isin(y, np.asarray(list(classes), dtype=y.dtype))
    if not mask.any():
        return float("nan")
    return float(np.mean(pred[mask] == y[mask]))


def average_incremental_accuracy(accuracies: Sequence[float]) -> float:
    """Mean of the accuracies on all seen classes after each task, A_0 .. A_{T-1}."""
    accs = np.asarray(accuracies, dtype=np.float64)
    if accs.size == 0:
        return float("nan")
    return float(np.mean(accs))


def forgetting(matrix) -> float:  # noqa: ANN001
    """Average forgetting of a (T, T) accuracy matrix: mean over old tasks of best earlier minus final accuracy."""
    a = np.asarray(matrix, dtype=np.float64)
    t = a.shape[0]
    if t < 2:
        return float("nan")
    drops = [np.nanmax(a[j:t - 1, j]) - a[t - 1, j] for j in range(t - 1)]
    return float(np.nanmean(drops))


def backward_transfer(matrix) -> float:  # noqa: ANN001
    """Backward transfer: mean over old tasks of final accuracy minus the accuracy right after learning it."""
    a = np.asarray(matrix, dtype=np.float64)
    t = a.shape[0]
    if t < 2:
        return float("nan")
    return float(np.nanmean([a[t - 1, j] - a[j, j] for j in range(t - 1)]))


class AccuracyMatrix:
    """Fills ``a[i][j]`` and ``A_i`` task by task from predictions on the test set.

    ``task_classes[j]`` lists the classes of task j. ``record(i, pred, y)`` fills row i (columns j <= i) and
    returns A_i, the accuracy on every test sample whose class belongs to tasks 0..i.
    """

    def __init__(self, task_classes: Sequence[Sequence[int]]) -> None:
        self.task_classes = [list(map(int, c)) for c in task_classes]
        t = len(self.task_classes)
        self.values = np.full((t, t), np.nan)
        self.seen_accuracy = np.full(t, np.nan)

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    def seen_classes(self, i: int) -> list[int]:
        """Classes of tasks 0..i."""
        return [c for classes in self.task_classes[: i + 1] for c in classes]

    def record(self, i: int, pred, y) -> float:  # noqa: ANN001
        if not 0 <= i < self.num_tasks:
            raise ValueError(f"task index {i} outside [0, {self.num_tasks})")
        for j in range(i + 1):
            self.values[i, j] = accuracy_on(pred, y, self.task_classes[j])
        self.seen_accuracy[i] = accuracy_on(pred, y, self.seen_classes(i))
        return float(self.seen_accuracy[i])

    @property
    def done(self) -> int:
        """Number of tasks recorded so far."""
        return int(np.sum(~np.isnan(self.seen_accuracy)))

    def last_accuracy(self) -> float:
        n = self.done
        return float(self.seen_accuracy[n - 1]) if n else float("nan")

    def average_incremental_accuracy(self) -> float:
        return average_incremental_accuracy(self.seen_accuracy[: self.done])

    def forgetting(self) -> float:
        n = self.done
        return forgetting(self.values[:n, :n])

    def backward_transfer(self) -> float:
        n = self.done
        return backward_transfer(self.values[:n, :n])

    def summary(self) -> dict[str, float | None]:
        """``final_accuracy``, ``average_incremental_accuracy``, ``forgetting``, ``backward_transfer`` (None = NaN)."""
        out = {
            "final_accuracy": self.last_accuracy(),
            "average_incremental_accuracy": self.average_incremental_accuracy(),
            "forgetting": self.forgetting(),
            "backward_transfer": self.backward_transfer(),
        }
        return {k: (None if v != v else v) for k, v in out.items()}

    def to_frame(self) -> pd.DataFrame:
        """Rows ``after_task_i``, columns ``task_j`` plus ``seen`` (A_i); what ``accuracy_matrix.csv`` holds."""
        t = self.num_tasks
        frame = pd.DataFrame(self.values, index=[f"after_task_{i}" for i in range(t)],
                             columns=[f"task_{j}" for j in range(t)])
        frame["seen"] = self.seen_accuracy
        frame.index.name = "row"
        return frame
