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

from typing import Any

import numpy as np

from fedsim.analytic import TARGETS, AnalyticAggregator, RidgeStatistics, regularized_upload, ridge_solve

__all__ = [
    "UPLOADS",
    "TARGETS",
    "AFLLearner",
    "client_statistics",
    "encode_reply",
    "decode_reply",
    "reduce_replies",
    "pack_symmetric",
    "unpack_symmetric",
]

#: What a client uploads: its raw statistics (C_k, Q_k) or the paper's (W_k, C_k + gamma I).
UPLOADS = ("statistics", "solution")

# Reply kinds on the wire (the arrays a reply carries, see `encode_reply`):
#   "statistics": gram (packed), cross, count           - one or more clients' summed raw statistics
#   "solution":   weights, c_reg (packed), count        - one client's (W_k, C_k^r), the paper's upload
#   "aggregate":  c_reg (packed), cw, count             - a group's AA-law partial sums (sum C^r, sum C^r W)
KINDS = ("statistics", "solution", "aggregate")


# ---------------------------------------------------------------------------------------------- wire format
def pack_symmetric(a: np.ndarray) -> np.ndarray:
    """Upper triangle of the symmetric (d x d) `a`, row by row, as a flat float64 vector of d (d + 1) / 2."""
    a = np.asarray(a, dtype=np.float64)
    d = a.shape[0]
    out = np.empty(d * (d + 1) // 2, dtype=np.float64)
    pos = 0
    for i in range(d):
        out[pos:pos + d - i] = a[i, i:]
        pos += d - i
    return out


def unpack_symmetric(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of `pack_symmetric`: the full symmetric (dim x dim) float64 matrix."""
    packed = np.asarray(packed, dtype=np.float64).reshape(-1)
    if packed.size != dim * (dim + 1) // 2:
        raise ValueError(f"a packed {dim} x {dim} symmetric matrix has {dim * (dim + 1) // 2} entries, "
                         f"got {packed.size}")
    out = np.empty((dim, dim), dtype=np.float64)
    pos = 0
    for i in range(dim):
        row = packed[pos:pos + dim - i]
        out[i, i:] = row
        out[i:, i] = row
        pos += dim - i
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
        return {"gram": pack_symmetric(stats.gram), "cross": stats.cross, "count": count}
    if upload == "solution":
        weights, c_reg = regularized_upload(stats, gamma)
        return {"weights": weights, "c_reg": pack_symmetric(c_reg), "count": count}
    raise ValueError(f"upload must be one of {UPLOADS}, got {upload!r}")


def _kind(arrays: dict[str, Any]) -> str:
    if "gram" in arrays:
        return "statistics"
    if "weights" in arrays:
        return "solution"
    if "cw" in arrays:
        return "aggregate"
    raise ValueError(f"not an AFL reply: arrays {sorted(arrays)}")


def decode_reply(arrays: dict[str, Any], dim: int) -> tuple[str, dict[str, Any]]:
    """(kind, fields) of a reply's arrays, with packed symmetric matrices expanded to (dim x dim)."""
    kind = _kind(arrays)
    count = int(np.asarray(arrays["count"]).reshape(-1)[0])
    if kind == "statistics":
        return kind, {"stats": RidgeStatistics(unpack_symmetric(arrays["gram"], dim), arrays["cross"], count)}
    if kind == "solution":
        return kind, {"weights": np.asarray(arrays["weights"], np.float64),
                      "c_reg": unpack_symmetric(arrays["c_reg"], dim), "count": count}
    return kind, {"c_reg": unpack_symmetric(arrays["c_reg"], dim), "cw": np.asarray(arrays["cw"], np.float64),
                  "count": count}


def reduce_replies(replies: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Combine several clients' uploads into one (a node serving a group of clients).

    Raw statistics are summed (still "statistics"). Paper-form uploads are folded with the AA law into the
    group's partial sums sum C_k^r and sum C_k^r W_k ("aggregate"), which the server adds like any upload. How
    many clients a combined reply stands for (K, needed to remove the K gamma I of the RI) is not in the arrays:
    the server takes it from the engine's per-client accounting of the reply.
    """
    kinds = {_kind(r) for r in replies}
    if len(kinds) != 1:
        raise ValueError(f"cannot combine different upload forms {sorted(kinds)}")
    kind = kinds.pop()
    count = np.array([sum(int(np.asarray(r["count"]).reshape(-1)[0]) for r in replies)], dtype=np.int64)
    if kind == "statistics":
        gram = np.sum([np.asarray(r["gram"], np.float64) for r in replies], axis=0)
        cross = _sum_padded([np.asarray(r["cross"], np.float64) for r in replies])
        return {"gram": gram, "cross": cross, "count": count}
    # the RI sums: C^r is packed in both forms and adds entrywise in packed form; C^r W needs the full matrix
    c_reg = np.sum([np.asarray(r["c_reg"], np.float64) for r in replies], axis=0)
    dim = int(round((np.sqrt(8 * c_reg.size + 1) - 1) / 2))
    parts = []
    for r in replies:
        if "weights" in r:
            parts.append(unpack_symmetric(r["c_reg"], dim) @ np.asarray(r["weights"], np.float64))
        else:
            parts.append(np.asarray(r["cw"], np.float64))
    return {"c_reg": c_reg, "cw": _sum_padded(parts), "count": count}


def _sum_padded(arrays: list[np.ndarray]) -> np.ndarray:
    width = max(a.shape[1] for a in arrays)
    out = np.zeros((arrays[0].shape[0], width))
    for a in arrays:
        out[:, : a.shape[1]] += a
    return out


# ---------------------------------------------------------------------------------------------- estimator
class AFLLearner:
    """AFL as an sklearn-style estimator over clients' uploads (see the module docstring for the math).

    `partial_fit(x, y)` adds one client's features; `add_statistics`, `add_upload`, `add_aggregate` add a client's
    (or a group's) upload as it arrives over the wire; `fit(x, y)` is the centralized run (one client holding
    everything). The learned weights `coef_` (d x c) are (re)computed by `solve()` and on first use.

    Raw statistics are kept as plain sums (so "least-squares" never subtracts gamma I from them); paper-form
    uploads go through `fedsim.analytic.AnalyticAggregator` (AA law + RI). Learned attributes: `coef_`,
    `n_clients_` (K, empty clients included), `n_samples_`.
    """

    def __init__(self, gamma: float = 1.0, target: str = "ridge") -> None:
        self.gamma = gamma
        self.target = target

    # ---- accumulation ----------------------------------------------------------------------------------------
    def _check(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"AFL needs gamma > 0 (the regularization intermediary), got {self.gamma}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")

    def _ensure(self) -> None:
        if not hasattr(self, "n_clients_"):
            self._check()
            self.statistics_: RidgeStatistics | None = None
            self.aggregator_ = AnalyticAggregator(self.gamma)
            self.n_clients_ = 0
            self.n_samples_ = 0
        self.__dict__.pop("coef_", None)

    def add_statistics(self, stats: RidgeStatistics, clients: int = 1) -> "AFLLearner":
        """Fold in raw statistics (C, Q, n) standing for `clients` clients. Returns self."""
        self._ensure()
        self.statistics_ = stats.copy() if self.statistics_ is None else self.statistics_ + stats
        self.n_clients_ += int(clients)
        self.n_samples_ += stats.count
        return self

    def add_upload(self, weights: Any, c_reg: Any, count: int = 0) -> "AFLLearner":
        """Fold in one client's paper-form upload (W_k, C_k^r = C_k + gamma I). Returns self."""
        self._ensure()
        self.aggregator_.add_upload(weights, c_reg)
        self.n_clients_ += 1
        self.n_samples_ += int(count)
        return self

    def add_aggregate(self, c_reg: Any, cw: Any, clients: int, count: int = 0) -> "AFLLearner":
        """Fold in a group's AA-law partial sums (sum_k C_k^r, sum_k C_k^r W_k over `clients` clients)."""
        self._ensure()
        part = AnalyticAggregator(self.gamma)
        part.c_reg_, part.cw_, part.num_uploads_ = np.asarray(c_reg, np.float64), np.asarray(cw, np.float64), \
            int(clients)
        self.aggregator_ += part
        self.n_clients_ += int(clients)
        self.n_samples_ += int(count)
        return self

    def add_reply(self, arrays: dict[str, Any], dim: int, clients: int = 1) -> "AFLLearner":
        """Fold in a reply's arrays as `encode_reply` / `reduce_replies` wrote them. Returns self."""
        kind, fields = decode_reply(arrays, dim)
        if kind == "statistics":
            return self.add_statistics(fields["stats"], clients)
        if kind == "solution":
            if clients != 1:
                raise ValueError(f"a 'solution' reply stands for one client, not {clients}")
            return self.add_upload(fields["weights"], fields["c_reg"], fields["count"])
        return self.add_aggregate(fields["c_reg"], fields["cw"], clients, fields["count"])

    def partial_fit(self, x: Any, y: Any, num_classes: int | None = None) -> "AFLLearner":
        """Add one client holding features `x` (n, d) and labels `y`. Returns self."""
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
        stats = RidgeStatistics.zeros(x.shape[1], num_classes or 0).update(x, y, num_classes)
        return self.add_statistics(stats)

    def fit(self, x: Any, y: Any, num_classes: int | None = None) -> "AFLLearner":
        """Centralized AFL: forget everything, then one client holding (x, y); solves. Returns self."""
        for name in ("statistics_", "aggregator_", "n_clients_", "n_samples_", "coef_"):
            self.__dict__.pop(name, None)
        return self.partial_fit(x, y, num_classes).solve()

    # ---- solving ---------------------------------------------------------------------------------------------
    def solve(self) -> "AFLLearner":
        """Compute `coef_` (d x c) for `target` from everything folded in so far. Returns self."""
        if not hasattr(self, "n_clients_") or self.n_clients_ == 0:
            raise RuntimeError("AFLLearner has no client uploads yet")
        gamma = self.gamma
        if self.aggregator_.c_reg_ is None:  # raw statistics only: solve on the plain sums
            s = self.statistics_
            self.coef_ = ridge_solve(s.gram, s.cross, gamma if self.target == "ridge" else 0.0)
            return self
        agg = self.aggregator_
        if self.statistics_ is not None:  # mixed forms: raw statistics join the AA-law sums
            agg = agg + AnalyticAggregator(gamma).add_statistics(self.statistics_)
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
