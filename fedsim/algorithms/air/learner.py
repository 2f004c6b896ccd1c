"""AIR's learner: the Analytic Imbalance Rectifier, class-reweighted ridge regression from per-class statistics.

AIR (Fang et al., "AIR: Analytic Imbalance Rectifier for Continual Learning", arXiv 2408.10349); official code
github ZHUANGHP/Analytic-continual-learning, ``analytic/AIR.py`` and ``analytic/AnalyticLinear.py``
(``GeneralizedARM``). On buffer features h = act(f(x) B) (the frozen backbone and buffer layer of AEF-OCL's setting,
``fedsim.frameworks.online``) it keeps, per class c, the count n_c and the Gram A_c = H_c^T H_c, and the cross term
Q = H^T Y (column c = H_c^T 1). Its weights re-balance every class to the same total weight:

    w_c = (1 / n_c) * K / sum_k (1 / n_k)        (seen classes; 0 for unseen ones)
    W   = (sum_c w_c A_c + gamma I)^-1 Q diag(w)

i.e. ridge regression in which every sample of class c carries weight w_c, so each class weighs as much as any
other whatever its count (``GeneralizedARM.update``; it solves with ``torch.inverse``, fedsim with a Cholesky
solve). K: the official code normalizes by ``len(cnt)``, the number of label slots so far (the largest label seen
+ 1, which equals the number of seen classes when labels arrive in order, as in its dataset wrappers); fedsim
uses the number of seen classes. The normalization only rescales gamma.

Everything is a sum over samples, so the statistics of disjoint streams add: the federated server's W equals the
centralized one on the union of the clients' streams. Rows are folded into the per-class Grams in chunks of
``defer_rows`` (exact; a per-batch rank-10 update of C d x d matrices is memory-bound).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.analytic import pack_upper, ridge_solve, unpack_upper
from fedsim.estimator import BaseLearner
from fedsim.frameworks.online import buffer_seed, masked_predict
from fedsim.nn.features import buffer_layer

__all__ = ["AIR", "buffer_transform", "reduce_statistics"]


class AIR(BaseLearner):
    """Class-reweighted analytic classifier over buffer features (see the module docstring).

    ``partial_fit(h, y)`` learns a batch; ``coef_`` is W (solved on demand, cached until the next batch);
    ``class_weights()`` the w_c; ``statistics()`` / ``merge(arrays)`` the additive wire form (federated).
    Learned state: ``grams_`` (C, d, d), ``cross_`` (d, C), ``counts_`` (C,).
    """

    _fitted_attribute = "grams_"
    _fit_hint = "call partial_fit or merge"

    def __init__(self, gamma: float = 0.1, num_classes: int = 0, defer_rows: int = 256) -> None:
        self.gamma = gamma
        self.num_classes = num_classes
        self.defer_rows = defer_rows

    def _ensure(self, dim: int) -> None:
        if self.is_fitted:
            if dim != self.grams_.shape[1]:
                raise ValueError(f"features have {dim} dimensions, the learner {self.grams_.shape[1]}")
            return
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        c = int(self.num_classes)
        self.grams_ = np.zeros((c, dim, dim))
        self.cross_ = np.zeros((dim, c))
        self.counts_ = np.zeros(c, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._coef: np.ndarray | None = None

    def _grow(self, num_classes: int) -> None:
        extra = num_classes - self.counts_.shape[0]
        if extra > 0:
            self.grams_ = np.concatenate([self.grams_, np.zeros((extra,) + self.grams_.shape[1:])])
            self.cross_ = np.pad(self.cross_, ((0, 0), (0, extra)))
            self.counts_ = np.pad(self.counts_, (0, extra))

    def partial_fit(self, h: Any, y: Any) -> "AIR":
        """Learn a batch of buffer features h (b, d) with labels y (b,). Returns self."""
        h = np.asarray(h, np.float64)
        y = np.asarray(y, np.int64).reshape(-1)
        self._ensure(h.shape[1])
        if len(y):
            self._grow(int(y.max()) + 1)
            self.counts_ += np.bincount(y, minlength=self.counts_.shape[0])  # counts now, Grams deferred
            self._pending.append((h, y))
            self._pending_rows += len(y)
            self._coef = None
            if self._pending_rows >= max(self.defer_rows, 1):
                self._fold()
        return self

    def _fold(self) -> None:
        if not self._pending:
            return
        h = np.concatenate([p[0] for p in self._pending])
        y = np.concatenate([p[1] for p in self._pending])
        self._pending, self._pending_rows = [], 0
        for c in np.unique(y):
            hc = h[y == c]
            self.grams_[c] += hc.T @ hc
            self.cross_[:, c] += hc.sum(axis=0)

    @property
    def class_counts_(self) -> np.ndarray:
        """Samples per class so far (pending rows included: reading the counts folds nothing)."""
        self._check_fitted()
        return self.counts_

    def class_weights(self) -> np.ndarray:
        """w_c = (1 / n_c) K / sum_k (1 / n_k) over the K seen classes, 0 for unseen ones."""
        counts = self.class_counts_
        inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
        seen = int(np.count_nonzero(counts))
        return inv * (seen / inv.sum()) if seen else inv

    @property
    def coef_(self) -> np.ndarray:
        """W = (sum_c w_c A_c + gamma I)^-1 Q diag(w) (d, C), solved, never inverted."""
        self._check_fitted()
        self._fold()
        if self._coef is None:
            w = self.class_weights()
            gram = np.tensordot(w, self.grams_, axes=1) if len(w) else np.zeros(self.grams_.shape[1:])
            self._coef = ridge_solve(gram, self.cross_ * w[None, :], self.gamma)
        return self._coef

    def predict(self, h: Any) -> np.ndarray:
        return masked_predict(np.asarray(h, np.float64), self.coef_)

    # ---- federated -------------------------------------------------------------------------------------------
    def statistics(self) -> dict[str, np.ndarray]:
        """Additive arrays: per-class Grams (upper triangles), the cross term, the class counts."""
        self._check_fitted()
        self._fold()
        return {"grams": pack_upper(self.grams_), "cross": self.cross_, "counts": self.counts_}

    def merge(self, arrays: dict[str, Any], dim: int) -> "AIR":
        """Add a client's (or a node's summed) ``statistics()``."""
        self._ensure(int(dim))
        self._fold()
        counts = np.asarray(arrays["counts"], np.int64)
        self._grow(counts.shape[0])
        c = counts.shape[0]
        self.grams_[:c] += unpack_upper(arrays["grams"], int(dim))
        self.cross_[:, :c] += np.asarray(arrays["cross"], np.float64)
        self.counts_[:c] += counts
        self._coef = None
        return self


def reduce_statistics(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The sum of several ``statistics()`` (a node serving several clients); all have the same classes."""
    return {key: np.sum([np.asarray(p[key]) for p in parts], axis=0) for key in ("grams", "cross", "counts")}


def buffer_transform(config, params, in_dim: int):  # noqa: ANN001, ANN201
    """(buffer layer, backbone features -> buffer features as float64 numpy): the same on server and clients."""
    buffer = buffer_layer(int(in_dim), params.buffer_width, buffer_seed(config), params.activation,
                          params.buffer_init)

    def transform(x) -> np.ndarray:  # noqa: ANN001
        with torch.inference_mode():
            return buffer(torch.as_tensor(np.asarray(x, np.float64))).numpy()

    return buffer, transform
