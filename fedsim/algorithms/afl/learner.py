"""AFL's learner: the math both the client and the server part use, and a centralized run reuses.

Analytic Federated Learning (Zhuang et al., "AFL: A Single-Round Analytic Approach for Federated Learning with
Pre-trained Models", arXiv 2405.16240). With a frozen feature map phi (rows X_k = phi(data of client k)), one-hot
labels Y_k and a ridge parameter gamma > 0:

    client k (one pass, no gradients):  C_k = X_k^T X_k (d x d),  Q_k = X_k^T Y_k (d x c),  n_k
    upload "statistics":                (C_k, Q_k)
    upload "factor":                    (R_k, Q_k) with R_k^T R_k = C_k, R_k = the R of a QR of X_k (min(n_k, d) x d)
    upload "auto" (default):            whichever of "factor" and "statistics" is smaller for this client
    upload "solution" (the paper's):    W_k = (C_k + gamma I)^-1 Q_k  and  C_k^r = C_k + gamma I
    server (AA law + RI, any order):    sum_k C_k^r = X^T X + K gamma I,   sum_k C_k^r W_k = X^T Y
    target "ridge":                     W = (X^T X + gamma I)^-1 X^T Y   (centralized ridge on all answered data)
    target "least-squares":             W = (X^T X)^+ X^T Y              (the official code's target)

The sums are associative, so the server folds replies in as they arrive (memory O(d^2) for any number of clients)
and the result does not depend on how the data is split (weight invariance) nor on who dropped out beyond the
data they held. The statistics/AA-law sums and solves come from `fedsim.analytic`; this module adds the wire
format (symmetric matrices travel as their upper triangle: exact, half the bytes; a client with fewer rows than
about d / 2 sends the factor R_k instead, which C_k determines up to a rotation, so it reveals nothing more and
costs 8 n_k d bytes), the per-client feature pass and an sklearn-style estimator `AFLLearner` that accepts every
form.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from fedsim.analytic import (
    TARGETS,
    AnalyticAggregator,
    gram_factor,
    RidgeStatistics,
    pack_upper,
    regularized_upload,
    ridge_solve,
    unpack_upper,
)
from fedsim.estimator import BaseLearner, NotFittedError

__all__ = [
    "UPLOADS",
    "TARGETS",
    "AFLLearner",
    "client_statistics",
    "client_upload",
    "client_form",
    "group_upload",
    "factor_is_smaller",
    "encode_reply",
    "reduce_replies",
    "packed_symmetric_matmul",
]

#: What a client uploads: the smaller exact form ("auto"), its raw statistics (C_k, Q_k), a factor of C_k with
#: Q_k, or the paper's (W_k, C_k + gamma I). Mirrored in fedsim.algorithms.afl.protocol.UPLOADS (torch-free; tested).
UPLOADS = ("auto", "statistics", "factor", "solution")

# Reply kinds on the wire (the arrays a reply carries, see `encode_reply`):
#   "statistics": gram (packed), cross, count           - one or more clients' summed raw statistics
#   "factor":     factor (r x d), cross, count          - raw statistics as R^T R (one client or a stacked group)
#   "solution":   weights, c_reg (packed), count        - one client's (W_k, C_k^r), the paper's upload
#   "aggregate":  c_reg (packed), cw, count             - a group's AA-law partial sums (sum C^r, sum C^r W)
KINDS = ("statistics", "factor", "solution", "aggregate")


def factor_is_smaller(rows: int, dim: int) -> bool:
    """Whether a factor of `rows` rows (8 rows d bytes) is smaller than the packed Gram (8 d (d + 1) / 2)."""
    return 2 * rows < dim + 1


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

    `x` (n, C, H, W) images, `y` (n,) labels; `feature_map` a `fedsim.nn.features.FeatureMap`. Features are
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


def client_upload(x: Any, y: Any, feature_map: Any, num_classes: int, upload: str, gamma: float,
                  batch_size: int = 1024) -> dict[str, np.ndarray]:
    """One client's reply arrays in the form `upload` names (see the module docstring); "auto" picks the smaller.

    The factor form computes the client's features once and takes the R of their QR (blockwise for a tall X,
    so memory stays O((rows per block + d) d)); the Gram forms accumulate C_k batch by batch as before.
    """
    import torch

    if upload not in UPLOADS:
        raise ValueError(f"upload must be one of {UPLOADS}, got {upload!r}")
    n, dim = int(len(y)), int(feature_map.dim)
    if upload == "factor" or (upload == "auto" and factor_is_smaller(n, dim)):
        r = np.zeros((0, dim))
        cross = np.zeros((dim, num_classes))
        step = max(batch_size, dim)
        for start in range(0, n, step):
            feats = feature_map(x[start:start + step], dtype=torch.float64)
            feats = np.asarray(feats.detach().cpu().numpy() if hasattr(feats, "detach") else feats, np.float64)
            cross += feats.T @ _one_hot(y[start:start + step], num_classes)
            r = gram_factor(np.vstack([r, feats]) if r.size else feats)
        return {"factor": r, "cross": cross, "count": np.array([n], dtype=np.int64)}
    stats = client_statistics(x, y, feature_map, num_classes, batch_size=batch_size)
    return encode_reply(stats, "statistics" if upload == "auto" else upload, gamma)


def client_form(rows: int, dim: int, upload: str) -> tuple[str, int]:
    """(reply kind, rows of its first array) that `client_upload` sends for a client of `rows` rows in the raw
    forms: ("factor", min(rows, d)) or ("statistics", d (d + 1) / 2 packed entries). `upload` "solution" has no
    such shape rule (it is computed per client) and is refused."""
    if upload == "factor" or (upload == "auto" and factor_is_smaller(rows, dim)):
        return "factor", min(int(rows), int(dim))
    if upload in ("auto", "statistics"):
        return "statistics", int(dim) * (int(dim) + 1) // 2
    raise ValueError(f"client_form: upload must be one of ('auto', 'statistics', 'factor'), got {upload!r}")


def group_upload(data: Any, indices: Iterable[Any], feature_map: Any, num_classes: int, upload: str,
                 batch_size: int = 1024) -> dict[str, np.ndarray]:
    """The combined raw statistics of a group of clients (a node serving many), in one pass over all their rows.

    `data` is the training split (a `fedsim.data.LabeledData`), `indices` every client's row indices. The feature
    map runs over the concatenated rows `batch_size` at a time (it is row-wise, and computes in float64 for the
    identity and random maps, so a row's features do not depend on its batch) and C = X^T X, Q = X^T Y are
    accumulated by syrk: the sums `reduce_replies` would make of the clients' own uploads, up to float64
    round-off, without one forward, one QR and one record per client. The reply is a "factor" (the R of a QR of
    the group's features) when every client would have sent a factor (`client_form`) and the group's rows stay
    below the size of a packed Gram, as `reduce_replies` would stack them; else "statistics" (the packed Gram).
    Raw forms only ("auto", "statistics", "factor"): the paper's "solution" is a per-client solve.
    """
    import torch

    if upload not in ("auto", "statistics", "factor"):
        raise ValueError(f"group_upload: upload must be one of ('auto', 'statistics', 'factor'), got {upload!r}")
    parts = [np.asarray(i, dtype=np.int64).reshape(-1) for i in indices]
    dim = int(feature_map.dim)
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    n = int(rows.size)
    stack = (all(client_form(p.size, dim, upload)[0] == "factor" for p in parts)
             and factor_is_smaller(n, dim))
    cross = np.zeros((dim, num_classes))
    stats = None if stack else RidgeStatistics.zeros(dim, num_classes)
    feats_all = []
    for start in range(0, n, batch_size):
        batch = data.subset(rows[start:start + batch_size])
        feats = feature_map(batch.x, dtype=torch.float64)
        feats = np.asarray(feats.detach().cpu().numpy() if hasattr(feats, "detach") else feats, np.float64)
        if stack:
            feats_all.append(feats)
            cross += feats.T @ _one_hot(batch.y, num_classes)
        else:
            stats.update(feats, batch.y, num_classes)
    count = np.array([n], dtype=np.int64)
    if stack:
        r = gram_factor(np.vstack(feats_all)) if feats_all else np.zeros((0, dim))
        return {"factor": r, "cross": cross, "count": count}
    return {"gram": pack_upper(stats.gram), "cross": stats.cross, "count": count}


def _one_hot(y: Any, num_classes: int) -> np.ndarray:
    from fedsim.analytic import one_hot

    y = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y).reshape(-1)
    return one_hot(y, num_classes)


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
    if "factor" in arrays:
        return "factor"
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

    Raw statistics are combined the cheapest exact way: factors are stacked while the stack stays smaller than a
    packed Gram, and folded into a Gram by one rank-r syrk beyond that; packed Grams add entrywise; the result is
    a "factor" reply if every part was a small factor, else "statistics". Paper-form uploads are folded with the
    AA law into the group's partial sums sum C_k^r and sum C_k^r W_k ("aggregate"), which the server adds like any
    upload. How many clients a combined reply stands for (K, needed to remove the K gamma I of the RI) is not in
    the arrays: the server takes it from the engine's per-client accounting of the reply.
    """
    raw: _RawSum | None = None
    acc: dict[str, np.ndarray] | None = None
    count = 0
    for arrays in replies:
        kind = _kind(arrays)
        count += _count(arrays)
        if kind in ("statistics", "factor"):
            if acc is not None:
                raise ValueError("cannot combine raw statistics with paper-form uploads")
            raw = raw or _RawSum()
            raw.add(arrays, kind)
            continue
        if raw is not None:
            raise ValueError("cannot combine raw statistics with paper-form uploads")
        if kind == "solution":
            c_reg = np.asarray(arrays["c_reg"], np.float64)
            part = {"c_reg": c_reg, "cw": packed_symmetric_matmul(c_reg, _dim(c_reg), arrays["weights"])}
        else:
            part = {"c_reg": arrays["c_reg"], "cw": arrays["cw"]}
        if acc is None:
            acc = {k: np.array(v, dtype=np.float64) for k, v in part.items()}
            continue
        for k, v in part.items():
            if v.ndim == 2 and v.shape[1] != acc[k].shape[1]:  # a reply with more classes widens the sum
                acc[k] = _pad_columns(acc[k], max(v.shape[1], acc[k].shape[1]))
                v = _pad_columns(np.asarray(v), acc[k].shape[1])
            acc[k] += v
    if raw is None and acc is None:
        raise ValueError("nothing to reduce")
    out = raw.arrays() if raw is not None else acc
    out["count"] = np.array([count], dtype=np.int64)
    return out


class _RawSum:
    """A group's raw statistics: stacked factors while small, a Gram (syrk-updated, packed parts added) beyond."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []  # small factors, stacked at the end
        self.stacked = 0
        self.gram: RidgeStatistics | None = None  # factors past the size of a packed Gram
        self.packed: np.ndarray | None = None  # sum of packed Grams
        self.cross: np.ndarray | None = None

    def add(self, arrays: dict[str, Any], kind: str) -> None:
        cross = np.asarray(arrays["cross"], np.float64)
        dim = cross.shape[0]
        if self.cross is None:
            self.cross = cross.copy()
        else:
            width = max(cross.shape[1], self.cross.shape[1])
            self.cross = _pad_columns(self.cross, width)
            self.cross[:, : cross.shape[1]] += cross
        if kind == "statistics":
            packed = np.asarray(arrays["gram"], np.float64)
            self.packed = packed.copy() if self.packed is None else self.packed.__iadd__(packed)
            return
        factor = np.asarray(arrays["factor"], np.float64)
        if self.gram is None and self.packed is None and factor_is_smaller(self.stacked + factor.shape[0], dim):
            self.rows.append(factor)
            self.stacked += factor.shape[0]
            return
        if self.gram is None:
            self.gram = RidgeStatistics.zeros(dim, 0)
        for part in self.rows + [factor]:
            self.gram.add_factor(part, np.zeros((dim, 0)), 0)
        self.rows, self.stacked = [], 0

    def arrays(self) -> dict[str, np.ndarray]:
        if self.gram is None and self.packed is None:
            return {"factor": np.vstack(self.rows), "cross": self.cross}
        packed = self.packed if self.packed is not None else 0.0
        if self.gram is not None:
            packed = packed + pack_upper(self.gram.gram)
        if self.rows:  # small factors that came before the first Gram
            extra = RidgeStatistics.zeros(self.cross.shape[0], 0)
            for part in self.rows:
                extra.add_factor(part, np.zeros((self.cross.shape[0], 0)), 0)
            packed = packed + pack_upper(extra.gram)
        return {"gram": np.asarray(packed, np.float64), "cross": self.cross}


def _pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1]))) if a.shape[1] < width else a


# ---------------------------------------------------------------------------------------------- estimator
class AFLLearner(BaseLearner):
    """AFL as an sklearn-style estimator over clients' uploads (see the module docstring for the math).

    `partial_fit(x, y)` adds one client's features; `add_statistics`, `add_upload`, `add_reply` add a client's (or
    a group's) upload as it arrives over the wire; `fit(x, y)` is the centralized run (one client holding
    everything). `solve()` computes the weights `coef_` (d x c).

    Running sums are kept in packed (upper-triangle) form, so folding a reply in is one contiguous vector add and
    memory is O(d^2 / 2 + d c) whatever the number of clients. Raw statistics are kept as plain sums (so
    "least-squares" never subtracts gamma I from them) and solved with `fedsim.analytic.ridge_solve`; paper-form
    uploads are solved through `fedsim.analytic.AnalyticAggregator` (AA law + RI). Learned attributes: `coef_`,
    `n_clients_` (K, empty clients included), `n_samples_`, `dim_`. Fitted (`is_fitted`) once an upload is folded
    in; `coef_` is solved on first use.
    """

    _fitted_attribute = "n_clients_"

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
            self.factor_stats_: RidgeStatistics | None = None  # sum of raw C_k sent as factors (syrk-updated)
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

    def add_factor(self, factor: Any, cross: Any, count: int, clients: int = 1) -> "AFLLearner":
        """Fold in raw statistics given as a factor R (R^T R = C) and Q, n, for `clients` clients: one rank-r
        syrk into the server's Gram, O(r d^2), no d x d temporary. Returns self."""
        cross = np.asarray(cross, dtype=np.float64)
        self._ensure(cross.shape[0])
        if self.factor_stats_ is None:
            self.factor_stats_ = RidgeStatistics.zeros(self.dim_, 0)
        self.factor_stats_.add_factor(factor, np.zeros((self.dim_, 0)), 0)
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
        if kind == "factor":
            return self.add_factor(arrays["factor"], arrays["cross"], count, clients)
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
            raise NotFittedError("AFLLearner has no client uploads yet")
        d = self.dim_
        raw_gram = self._raw_gram()
        if self.c_reg_packed_ is None:  # raw statistics only: solve on the plain sums
            gamma = self.gamma if self.target == "ridge" else 0.0
            self.coef_ = ridge_solve(raw_gram, self.cross_, gamma)
            return self
        agg = AnalyticAggregator(self.gamma)  # AA law + RI on the paper-form sums
        agg.c_reg_ = unpack_upper(self.c_reg_packed_, d)
        agg.cw_ = self.cw_.copy()
        agg.num_uploads_ = self.n_uploads_
        if raw_gram is not None:  # mixed forms: raw statistics join as one more upload
            stats = RidgeStatistics(raw_gram, self.cross_)
            agg += AnalyticAggregator(self.gamma).add_statistics(stats)
        self.coef_ = agg.solve(self.target)
        return self

    def _raw_gram(self) -> np.ndarray | None:
        """Sum of the raw C_k folded in, packed and factor forms together (None if there were none)."""
        parts = []
        if self.gram_packed_ is not None:
            parts.append(unpack_upper(self.gram_packed_, self.dim_))
        if self.factor_stats_ is not None:
            parts.append(self.factor_stats_.gram)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

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
