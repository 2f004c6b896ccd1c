"""SDC's learner: class prototypes in embedding space, moved by the drift of the current task's embeddings.

Semantic Drift Compensation (Yu et al., "Semantic Drift Compensation for Class-Incremental Learning", CVPR 2020;
official code github yulu0724/SDC-IL, ``test.py: displacement``). Features are row vectors z = f(image). After the
backbone moved from f_old to f_new on task t, each stored prototype mu_c (an old class, no images of it are kept) is
shifted by the drift of the current task's samples i, weighted by their closeness to mu_c under f_old:

    w_ic = exp(-||z_i^old - mu_c||^2 / (2 sigma^2)) + floor,      Delta_c = sum_i w_ic (z_i^new - z_i^old) / sum_i w_ic,
    mu_c <- mu_c + Delta_c.

The numerator and the denominator are sums over samples (``drift_sums``), so clients' sums add up to the centralized
shift (federated SDC, exact). Defaults: sigma = 0.3 and floor = 1e-5 are the values of the LwF + SDC baseline in the
LDC authors' code (github alviur/ldc, ``LDC_supervised/exps/lwf.json`` "sigma": 0.3, ``models/lwf.py: displacement``
``+1e-5``), which is the SDC that DPCR's and LDC's tables report; the SDC paper's own code uses sigma_test = 0.2
(``run_demo.sh``) on metric-learning embeddings and no floor (``# +1e-5`` commented out in ``test.py``). With raw
(un-normalized) embeddings whose distances are far above sigma every exp() underflows, so the floor makes Delta_c
the plain mean drift of the task; ``effective_fraction`` in the sums tells how much of the weight was not floor.

``PrototypeNCM`` is the classifier SDC and LDC share (official LDC ``models/base.py: _eval_ncm``): prototypes are
class means of the raw embeddings, compared with test embeddings after L2-normalizing both, nearest in squared
Euclidean distance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.estimator import BaseLearner

__all__ = ["PrototypeNCM", "drift_sums", "sdc_shift", "class_sums"]


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def class_sums(features: Any, labels: Any, classes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per class of ``classes``: count (k,) and sum of the raw embeddings (k, d); additive over clients."""
    z, y = _np(features), np.asarray(labels, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    counts = np.array([(y == c).sum() for c in classes], np.int64)
    sums = np.stack([z[y == c].sum(axis=0) for c in classes]) if len(classes) else np.zeros((0, z.shape[1]))
    return counts, sums


def drift_sums(old: Any, new: Any, prototypes: Any, sigma: float = 0.3, floor: float = 1e-5
               ) -> dict[str, np.ndarray]:
    """SDC's additive sums for prototypes (k, d) from one share's embeddings under f_old and f_new (n, d).

    Returns ``weighted`` (k, d) = sum_i w_ic (z_i^new - z_i^old), ``weight`` (k,) = sum_i w_ic and ``kernel`` (k,) =
    sum_i exp(...) (the weight without the floor, for ``effective_fraction``).
    """
    z_old, z_new, mu = _np(old), _np(new), _np(prototypes)
    if z_old.shape != z_new.shape:
        raise ValueError(f"old and new embeddings must have the same shape, got {z_old.shape} and {z_new.shape}")
    sq = (mu ** 2).sum(1)[:, None] + (z_old ** 2).sum(1)[None, :] - 2.0 * mu @ z_old.T  # (k, n)
    kernel = np.exp(-np.maximum(sq, 0.0) / (2.0 * float(sigma) ** 2))
    w = kernel + float(floor)
    return {"weighted": w @ (z_new - z_old), "weight": w.sum(axis=1), "kernel": kernel.sum(axis=1)}


def sdc_shift(sums: dict[str, np.ndarray]) -> np.ndarray:
    """Delta_c = weighted / weight (k, d); a class whose weight is 0 (floor 0 and every kernel underflowed) is not
    moved (its row is 0) instead of becoming NaN."""
    weight = np.asarray(sums["weight"], dtype=np.float64)
    safe = np.where(weight > 0, weight, 1.0)
    return np.where((weight > 0)[:, None], np.asarray(sums["weighted"]) / safe[:, None], 0.0)


class PrototypeNCM(BaseLearner):
    """Nearest class mean over L2-normalized embeddings, with prototypes that drift compensation moves.

    ``add_classes(classes, counts, sums)`` stores mean = sum / count of new classes (raw embedding space);
    ``shift(classes, delta)`` adds a drift (SDC), ``transform(matrix)`` maps every prototype mu <- mu M (LDC's
    projector, row-vector convention). State: ``prototypes_`` {class: (d,)}, ``classes_`` (sorted labels).
    """

    _fitted_attribute = "classes_"
    _fit_hint = "call add_classes"

    def __init__(self) -> None:
        pass

    def add_classes(self, classes: Any, counts: Any, sums: Any) -> "PrototypeNCM":
        if not hasattr(self, "prototypes_"):
            self.prototypes_: dict[int, np.ndarray] = {}
        for c, n, s in zip(np.asarray(classes).tolist(), np.asarray(counts).tolist(), _np(sums)):
            if n > 0:
                self.prototypes_[int(c)] = s / n
        self.classes_ = np.array(sorted(self.prototypes_), np.int64)
        return self

    def matrix(self, classes: Any | None = None) -> np.ndarray:
        """Prototypes (k, d) of ``classes`` (default: all, sorted)."""
        self._check_fitted()
        keys = self.classes_ if classes is None else classes
        return np.stack([self.prototypes_[int(c)] for c in keys])

    def shift(self, classes: Any, delta: Any) -> "PrototypeNCM":
        for c, d in zip(np.asarray(classes).tolist(), _np(delta)):
            self.prototypes_[int(c)] = self.prototypes_[int(c)] + d
        return self

    def transform(self, matrix: Any) -> "PrototypeNCM":
        m = _np(matrix)
        for c in list(self.prototypes_):
            self.prototypes_[c] = self.prototypes_[c] @ m
        return self

    def normalized(self) -> np.ndarray:
        """Unit-norm prototypes (k, d) in ``classes_`` order (the classifier's weights on unit embeddings)."""
        p = self.matrix()
        return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)

    def decision_function(self, x: Any) -> np.ndarray:
        """Scores (n, k) = -||x/|x| - mu/|mu|||^2 over ``classes_``."""
        z = _np(x)
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        p = self.normalized()
        return -((z ** 2).sum(1)[:, None] + (p ** 2).sum(1)[None, :] - 2.0 * z @ p.T)

    def predict(self, x: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(x), axis=1)]
