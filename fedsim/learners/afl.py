"""AFL's learner: the math both the client and the server part use, and a centralized run reuses.

Analytic Federated Learning (Zhuang et al., "AFL: A Single-Round Analytic Approach for Federated Learning with
Pre-trained Models", arXiv 2405.16240). With a frozen feature map phi (rows X_k = phi(data of client k)), one-hot
labels Y_k and a ridge parameter gamma > 0:

    client k (one pass, no gradients):  C_k = X_k^T X_k (d x d),  Q_k = X_k^T Y_k (d x c),  n_k
    upload "statistics":                (C_k, Q_k)
    upload "solution" (the paper's):    W_k = (C_k + gamma I)^-1 Q_k  and  C_k^r = C_k + gamma I
    server (AA law + RI, any order):    sum_k C_k^r = X^T X + K gamma I,   sum_k C_k^r W_k = X^T Y
    target "ridge":                     W = (X^T X + gamma I)^-1 X^T Y   (centralized ridge on all answered data)
    target "least-squares":             W = (X^T X)^+ X^T Y              (the official code's target)

The sums are associative, so the server folds replies in as they arrive (memory O(d^2) for any number of clients)
and the result does not depend on how the data is split (weight invariance) nor on who dropped out beyond the
data they held. The statistics/AA-law sums and solves come from `fedsim.analytic`; this module adds the wire
format (symmetric matrices travel as their upper triangle: exact, half the bytes), the per-client feature pass
and an sklearn-style estimator `AFLLearner` that accepts every form.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from fedsim.analytic import (
    TARGETS,
    AnalyticAggregator,
    RidgeStatistics,
    pack_upper,
    regularized_upload,
    ridge_solve,
    unpack_upper,
)

__all__ = [
    "UPLOADS",
    "TARGETS",
    "AFLLearner",
    "client_statistics",
    "encode_reply",
    "reduce_replies",
    "packed_symmetric_matmul",
]

#: What a client uploads: its raw statistics (C_k, Q_k) or the paper's (W_k, C_k + gamma I).
UPLOADS = ("statistics", "solution")

# Reply kinds on the wire (the arrays a reply carries, see `encode_reply`):
#   "statistics": gram (packed), cross, count           - one or more clients' summed raw statistics
#   "solution":   weights, c_reg (packed), count        - one client's (W_k, C_k^r), the paper's upload
#   "aggregate":  c_reg (packed), cw, count             - a group's AA-law partial sums (sum C^r, sum C^r W)
KINDS = ("statistics", "solution", "aggregate")


# ---------------------------------------------------------------------------------------------- wire format
def packed_symmetric_matmul(packed: np.ndarray, dim: int, b: np.ndarray) -> np.ndarray:
    """A @ b for the symmetric A given by `pack_upper` (BLAS spmv per column; A is never expanded)."""
    from scipy.linalg.blas import dspmv

    packed = np.asarray(packed, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64)
    out = np.empty((dim, b.shape[1]), dtype=np.float64)
    for j in range(b.shape[1]):  # row-major upper packing == column-major lower packing (BLAS 'L')
        out[:, j] = dspmv(dim, 1.0, packed, b[:, j], lower=1)
    return out


def client_statistics(x: Any, y: Any, feature_map: Any, num_classes: int, batch_size: int = 1024
                      ) -> RidgeStatistics:
    """One pass of a client's data through the frozen `feature_map`: C = X^T X, Q = X^T Y, n (float64).

    `x` (n, C, H, W) images, `y` (n,) labels; `feature_map` a `fedsim.features.FeatureMap`. Features are
    requested in float64 (the identity and random maps then compute in float64, so a sample's features do not
    depend on which batch it is in, which keeps the federated sums equal to the centralized ones to round-off)
    `batch_size` rows at a time and folded in at once: memory O(batch_size * d + d^2). An empty client gives zero
    statistics.
    """
    import torch

    dim = int(feature_map.dim)
    stats = RidgeStatistics.zeros(dim, num_classes)
    for start in range(0, int(len(y)), batch_size):
        feats = feature_map(x[start:start + batch_size], dtype=torch.float64)
        stats.update(feats, y[start:start + batch_size], num_classes)
    return stats


def encode_reply(stats: RidgeStatistics, upload: str, gamma: float) -> dict[str, np.ndarray]:
    """One client's upload as plain arrays: the raw statistics or the paper's (W_k, C_k^r)."""
    count = np.array([stats.count], dtype=np.int64)
    if upload == "statistics":
        return {"gram": pack_upper(stats.gram), "cross": stats.cross, "count": count}
    if upload == "solution":
        weights, c_reg = regularized_upload(stats, gamma)
        return {"weights": weights, "c_reg": pack_upper(c_reg), "count": count}
    raise ValueError(f"upload must be one of {UPLOADS}, got {upload!r}")


def _kind(arrays: dict[str, Any]) -> str:
    if "gram" in arrays:
        return "statistics"
    if "weights" in arrays:
        return "solution"
    if "cw" in arrays:
        return "aggregate"
    raise ValueError(f"not an AFL reply: arrays {sorted(arrays)}")


def _count(arrays: dict[str, Any]) -> int:
    return int(np.asarray(arrays["count"]).reshape(-1)[0])


def _dim(packed: np.ndarray) -> int:
    return int(round((np.sqrt(8 * np.asarray(packed).size + 1) - 1) / 2))


def reduce_replies(replies: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Combine several clients' uploads into one (a node serving a group of clients), folding one at a time.

    Raw statistics are summed (still "statistics"; packed Grams add entrywise). Paper-form uploads are folded with
    the AA law into the group's partial sums sum C_k^r and sum C_k^r W_k ("aggregate"), which the server adds like
    any upload. How many clients a combined reply stands for (K, needed to remove the K gamma I of the RI) is not in
    the arrays: the server takes it from the engine's per-client accounting of the reply.
    """
    acc: dict[str, np.ndarray] | None = None
    for arrays in replies:
        kind = _kind(arrays)
        if kind == "statistics":
            part = {"gram": arrays["gram"], "cross": arrays["cross"]}
        elif kind == "solution":
            c_reg = np.asarray(arrays["c_reg"], np.float64)
            part = {"c_reg": c_reg, "cw": packed_symmetric_matmul(c_reg, _dim(c_reg), arrays["weights"])}
        else:
            part = {"c_reg": arrays["c_reg"], "cw": arrays["cw"]}
        if acc is None:
            acc = {k: np.array(v, dtype=np.float64) for k, v in part.items()}
            acc["count"] = np.array([_count(arrays)], dtype=np.int64)
            continue
        if set(part) != set(acc) - {"count"}:
            raise ValueError("cannot combine raw statistics with paper-form uploads")
        for k, v in part.items():
            if v.ndim == 2 and v.shape[1] != acc[k].shape[1]:  # a reply with more classes widens the sum
                acc[k] = _pad_columns(acc[k], max(v.shape[1], acc[k].shape[1]))
                v = _pad_columns(np.asarray(v), acc[k].shape[1])
            acc[k] += v
        acc["count"][0] += _count(arrays)
    if acc is None:
        raise ValueError("nothing to reduce")
    return acc


def _pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1]))) if a.shape[1] < width else a


# ---------------------------------------------------------------------------------------------- estimator
class AFLLearner:
    """AFL as an sklearn-style estimator over clients' uploads (see the module docstring for the math).

    `partial_fit(x, y)` adds one client's features; `add_statistics`, `add_upload`, `add_reply` add a client's (or
    a group's) upload as it arrives over the wire; `fit(x, y)` is the centralized run (one client holding
    everything). `solve()` computes the weights `coef_` (d x c).

    Running sums are kept in packed (upper-triangle) form, so folding a reply in is one contiguous vector add and
    memory is O(d^2 / 2 + d c) whatever the number of clients. Raw statistics are kept as plain sums (so
    "least-squares" never subtracts gamma I from them) and solved with `fedsim.analytic.ridge_solve`; paper-form
    uploads are solved through `fedsim.analytic.AnalyticAggregator` (AA law + RI). Learned attributes: `coef_`,
    `n_clients_` (K, empty clients included), `n_samples_`, `dim_`.
    """

    def __init__(self, gamma: float = 1.0, target: str = "ridge") -> None:
        self.gamma = gamma
        self.target = target

    # ---- accumulation ----------------------------------------------------------------------------------------
    def _ensure(self, dim: int) -> None:
        if not hasattr(self, "n_clients_"):
            if not self.gamma > 0:
                raise ValueError(f"AFL needs gamma > 0 (the regularization intermediary), got {self.gamma}")
            if self.target not in TARGETS:
                raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
            self.dim_ = int(dim)
            self.gram_packed_: np.ndarray | None = None    # sum of raw C_k (packed)
            self.cross_: np.ndarray | None = None          # sum of raw Q_k
            self.c_reg_packed_: np.ndarray | None = None   # sum of C_k^r over paper-form uploads (packed)
            self.cw_: np.ndarray | None = None             # sum of C_k^r W_k over paper-form uploads
            self.n_uploads_ = 0                            # paper-form uploads (each carries one gamma I)
            self.n_clients_ = 0
            self.n_samples_ = 0
        elif int(dim) != self.dim_:
            raise ValueError(f"cannot aggregate dimension {dim} into {self.dim_}")
        self.__dict__.pop("coef_", None)

    @staticmethod
    def _add(total: np.ndarray | None, part: Any) -> np.ndarray:
        part = np.asarray(part, dtype=np.float64)
        if total is None:
            return part.copy()
        if part.ndim == 2 and part.shape[1] != total.shape[1]:
            width = max(part.shape[1], total.shape[1])
            total, part = _pad_columns(total, width), _pad_columns(part, width)
        total += part
        return total

    def add_packed_statistics(self, gram_packed: Any, cross: Any, count: int, clients: int = 1) -> "AFLLearner":
        """Fold in raw statistics (packed C, Q, n) standing for `clients` clients. Returns self."""
        cross = np.asarray(cross, dtype=np.float64)
        self._ensure(cross.shape[0])
        self.gram_packed_ = self._add(self.gram_packed_, gram_packed)
        self.cross_ = self._add(self.cross_, cross)
        self.n_clients_ += int(clients)
        self.n_samples_ += int(count)
        return self

    def add_statistics(self, stats: RidgeStatistics, clients: int = 1) -> "AFLLearner":
        """Fold in raw statistics (C, Q, n) standing for `clients` clients. Returns self."""
        return self.add_packed_statistics(pack_upper(stats.gram), stats.cross, stats.count, clients)

    def add_packed_aggregate(self, c_reg_packed: Any, cw: Any, clients: int, count: int = 0) -> "AFLLearner":
        """Fold in AA-law partial sums (packed sum_k C_k^r, sum_k C_k^r W_k over `clients` clients)."""
        cw = np.asarray(cw, dtype=np.float64)
        self._ensure(cw.shape[0])
        self.c_reg_packed_ = self._add(self.c_reg_packed_, c_reg_packed)
        self.cw_ = self._add(self.cw_, cw)
        self.n_uploads_ += int(clients)
        self.n_clients_ += int(clients)
        self.n_samples_ += int(count)
        return self

    def add_upload(self, weights: Any, c_reg: Any, count: int = 0) -> "AFLLearner":
        """Fold in one client's paper-form upload (W_k, C_k^r = C_k + gamma I, full matrix). Returns self."""
        c_reg = np.asarray(c_reg, dtype=np.float64)
        return self.add_packed_aggregate(pack_upper(c_reg), c_reg @ np.asarray(weights, np.float64), 1, count)

    def add_reply(self, arrays: dict[str, Any], clients: int = 1) -> "AFLLearner":
        """Fold in a reply's arrays as `encode_reply` / `reduce_replies` wrote them, standing for `clients`."""
        kind, count = _kind(arrays), _count(arrays)
        if kind == "statistics":
            return self.add_packed_statistics(arrays["gram"], arrays["cross"], count, clients)
        if kind == "solution":
            if clients != 1:
                raise ValueError(f"a 'solution' reply stands for one client, not {clients}")
            c_reg = np.asarray(arrays["c_reg"], np.float64)
            cw = packed_symmetric_matmul(c_reg, _dim(c_reg), arrays["weights"])
            return self.add_packed_aggregate(c_reg, cw, 1, count)
        return self.add_packed_aggregate(arrays["c_reg"], arrays["cw"], clients, count)

    def partial_fit(self, x: Any, y: Any, num_classes: int | None = None) -> "AFLLearner":
        """Add one client holding features `x` (n, d) and labels `y`. Returns self."""
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
        stats = RidgeStatistics.zeros(x.shape[1], num_classes or 0).update(x, y, num_classes)
        return self.add_statistics(stats)

    def fit(self, x: Any, y: Any, num_classes: int | None = None) -> "AFLLearner":
        """Centralized AFL: forget everything, then one client holding (x, y); solves. Returns self."""
        for name in [k for k in self.__dict__ if k.endswith("_")]:
            del self.__dict__[name]
        return self.partial_fit(x, y, num_classes).solve()

    # ---- solving ---------------------------------------------------------------------------------------------
    def solve(self) -> "AFLLearner":
        """Compute `coef_` (d x c) for `target` from everything folded in so far. Returns self."""
        if getattr(self, "n_clients_", 0) == 0:
            raise RuntimeError("AFLLearner has no client uploads yet")
        d = self.dim_
        if self.c_reg_packed_ is None:  # raw statistics only: solve on the plain sums
            gamma = self.gamma if self.target == "ridge" else 0.0
            self.coef_ = ridge_solve(unpack_upper(self.gram_packed_, d), self.cross_, gamma)
            return self
        agg = AnalyticAggregator(self.gamma)  # AA law + RI on the paper-form sums
        agg.c_reg_ = unpack_upper(self.c_reg_packed_, d)
        agg.cw_ = self.cw_.copy()
        agg.num_uploads_ = self.n_uploads_
        if self.gram_packed_ is not None:  # mixed forms: raw statistics join as one more upload
            stats = RidgeStatistics(unpack_upper(self.gram_packed_, d), self.cross_)
            agg += AnalyticAggregator(self.gamma).add_statistics(stats)
        self.coef_ = agg.solve(self.target)
        return self

    # ---- inference -------------------------------------------------------------------------------------------
    def _coef(self) -> np.ndarray:
        if not hasattr(self, "coef_"):
            self.solve()
        return self.coef_

    def decision_function(self, x: Any) -> np.ndarray:
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
        return x @ self._coef()

    def predict(self, x: Any) -> np.ndarray:
        return np.argmax(self.decision_function(x), axis=1)

    def score(self, x: Any, y: Any) -> float:
        """Accuracy on (x, y)."""
        y = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y).reshape(-1)
        return float(np.mean(self.predict(x) == y)) if y.size else float("nan")

    def __repr__(self) -> str:
        return f"AFLLearner(gamma={self.gamma}, target={self.target!r})"
