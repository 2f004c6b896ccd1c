"""Analytic-learning math shared by AFL, AEF-OCL and DPCR: float64, solved (never inverted).

Everything here is a sufficient statistic or an exact update of one, so the centralized, streaming and federated
forms of an analytic learner give the same weights up to float round-off:

- `RidgeStatistics`: C = X^T X, Q = X^T Y, n; merged by addition (associative), solved once by `ridge_solve`.
- `ridge_solve`: (C + gamma I) W = Q by Cholesky; `lstsq` (minimum norm) when gamma == 0 or the system is
  numerically singular.
- `AnalyticAggregator` / `aggregate_uploads` / `regularized_upload`: AFL's Absolute Aggregation law with the
  Regularization Intermediary; raw statistics and the paper's (W_k, C_k + gamma I) uploads fold into one accumulator.
- `RecursiveLeastSquares`: AEF-OCL / ACIL's classifier, an O(d^2 b) per-batch exact update of the ridge solution.
- `pack_upper` / `unpack_upper`: symmetric matrices (Grams) on the wire as their upper triangles.
- `ClassStatistics`: per-class count, mean, centred sum of squares (Chan et al. merging) and optional Gram matrices
  (AEF-OCL's pseudo-feature generator, DPCR's stored class Grams, FuseFL's virtual features).

Inputs may be numpy arrays or torch tensors (converted to numpy on the CPU); outputs are numpy.
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg import blas as _blas

from fedsim.errors import ConfigError
from fedsim.estimator import BaseLearner

__all__ = [
    "one_hot",
    "ridge_solve",
    "RidgeStatistics",
    "regularized_upload",
    "AnalyticAggregator",
    "aggregate_uploads",
    "absolute_aggregation",
    "RecursiveLeastSquares",
    "ClassStatistics",
    "TARGETS",
    "pack_upper",
    "unpack_upper",
]

#: AFL aggregation targets (ALGORITHMS.md section 1): "ridge" = centralized ridge on all data (default),
#: "least-squares" = unregularized joint least squares (what the official AFL code computes).
TARGETS = ("ridge", "least-squares")

# Rows converted to float64 at a time in `update`: bounds the temporary copy (~64 MB at d = 2048).
_ROW_CHUNK_BYTES = 64 * 2**20
# Largest batch the RLS update handles in one step: bounds the b x b system; larger batches are split (exact).
_RLS_MAX_CHUNK = 1024


def _to_numpy(a: Any, dtype: Any = np.float64) -> np.ndarray:
    """numpy array of `dtype` from a numpy array, list or torch tensor (detached, moved to the CPU)."""
    if hasattr(a, "detach"):  # torch.Tensor without importing torch here
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def one_hot(y: Any, num_classes: int) -> np.ndarray:
    """One-hot float64 matrix (n, num_classes) of integer labels `y`; labels outside [0, num_classes) are errors."""
    y = _to_numpy(y, dtype=np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    out = np.zeros((y.size, num_classes), dtype=np.float64)
    out[np.arange(y.size), y] = 1.0
    return out


def _targets(y: Any, num_classes: int | None, current: int, dtype: Any = np.float64) -> np.ndarray:
    """Targets as a float matrix with at least `current` columns: 1-D class indices or 2-D one-hot/soft targets."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 1:
        labels = y.astype(np.int64)
        c = max(current, num_classes or 0, int(labels.max()) + 1 if labels.size else 0)
        return one_hot(labels, c).astype(dtype, copy=False)
    if y.ndim != 2:
        raise ValueError(f"targets must be class indices (n,) or a one-hot matrix (n, c), got shape {y.shape}")
    y = y.astype(dtype, copy=False)
    c = max(current, num_classes or 0, y.shape[1])
    if y.shape[1] < c:
        y = np.pad(y, ((0, 0), (0, c - y.shape[1])))
    return y


def _solve_spd(a: np.ndarray, b: np.ndarray, use_cholesky: bool = True) -> np.ndarray:
    """Solve a x = b for symmetric positive semi-definite `a`; Cholesky when well posed, else minimum-norm lstsq.

    The Cholesky result is rejected (-> lstsq) when the factorization fails or its smallest pivot^2 falls below
    d * eps * max(diag(a)): then the regularizer is below the rounding level of the matrix, the same threshold
    under which lstsq's default `rcond` treats a singular value as zero. lstsq returns the minimum-norm solution,
    which is the gamma -> 0 limit of ridge regression, so the result is finite and meaningful either way.
    """
    d = a.shape[0]
    if d == 0:
        return np.zeros_like(b)
    if use_cholesky:
        try:
            factor, lower = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
            pivots = np.diag(factor)
            scale = float(np.max(np.diag(a)))
            if np.all(np.isfinite(pivots)) and float(np.min(pivots)) ** 2 > d * np.finfo(a.dtype).eps * scale:
                x = scipy.linalg.cho_solve((factor, lower), b, check_finite=False)
                if np.all(np.isfinite(x)):
                    return x
        except np.linalg.LinAlgError:
            pass
    x, *_ = scipy.linalg.lstsq(a, b, cond=d * np.finfo(a.dtype).eps, check_finite=False)
    return x


def ridge_solve(gram: Any, cross: Any, gamma: float) -> np.ndarray:
    """Ridge weights W (d x c) solving (gram + gamma I) W = cross.

    Cholesky for gamma > 0 (O(d^3 / 3), no explicit inverse). For gamma == 0, or when gamma is below the rounding
    level of `gram` (near-singular, e.g. d > n with a tiny gamma), falls back to minimum-norm least squares
    (`scipy.linalg.lstsq`), i.e. pinv(gram) @ cross: the result is always finite.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    gram = _to_numpy(gram)
    cross = _to_numpy(cross)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or cross.shape[0] != gram.shape[0]:
        raise ValueError(f"gram must be (d, d) and cross (d, c); got {gram.shape} and {cross.shape}")
    a = gram + gamma * np.eye(gram.shape[0]) if gamma else gram
    return _solve_spd(a, cross, use_cholesky=gamma > 0)


def _syrk_lower(gram: np.ndarray, x: np.ndarray) -> None:
    """gram += x^T x on the lower triangle only, in place (`gram` C-contiguous float64, `x` C-contiguous (n, d)).

    gram's transpose is a Fortran-ordered view whose upper triangle is gram's lower one, and x^T is a Fortran
    (d, n) view, so BLAS dsyrk ("C = A A^T + C", upper) runs on both without copying either.
    """
    out = _blas.dsyrk(1.0, x.T, beta=1.0, c=gram.T, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(out, gram):  # not updated in place (unexpected layout): copy the triangle back
        lower = np.tril_indices(gram.shape[0])
        gram[lower] = out.T[lower]


def gram_factor(x: Any, block_rows: int = 4096) -> np.ndarray:
    """R (min(n, d) x d) with R^T R = X^T X, from a QR decomposition of X (n x d), float64.

    C = X^T X determines X up to an orthogonal transform, so R carries exactly the information of C, in
    8 min(n, d) d bytes instead of 8 d (d + 1) / 2 for the packed Gram. Rows are folded in blocks (TSQR: the
    factor of [R; X_block]), so memory stays O((block_rows + d) d) for a tall X.
    """
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    n, d = x.shape
    if n <= max(block_rows, d):
        return np.linalg.qr(x, mode="r") if n else np.zeros((0, d))
    r = np.linalg.qr(x[:block_rows], mode="r")
    for start in range(block_rows, n, block_rows):
        r = np.linalg.qr(np.vstack([r, x[start:start + block_rows]]), mode="r")
    return r


def pack_upper(a: Any) -> np.ndarray:
    """Upper triangles, row by row, of symmetric (..., d, d) matrices as float64 (..., d (d + 1) / 2): exact, half
    the bytes on the wire. Copies row segments (no index arrays: 33 MB of them at d = 2048)."""
    a = _to_numpy(a)
    d = a.shape[-1]
    out = np.empty(a.shape[:-2] + (d * (d + 1) // 2,), dtype=np.float64)
    pos = 0
    for i in range(d):
        out[..., pos:pos + d - i] = a[..., i, i:]
        pos += d - i
    return out


def unpack_upper(packed: Any, dim: int) -> np.ndarray:
    """Inverse of `pack_upper`: the full symmetric (..., dim, dim) float64 matrices."""
    packed = _to_numpy(packed)
    if packed.shape[-1] != dim * (dim + 1) // 2:
        raise ValueError(f"a packed {dim} x {dim} symmetric matrix has {dim * (dim + 1) // 2} entries, "
                         f"got {packed.shape[-1]}")
    out = np.empty(packed.shape[:-1] + (dim, dim), dtype=np.float64)
    pos = 0
    for i in range(dim):  # contiguous row writes of the upper triangle, then the blocked mirror to the lower one
        out[..., i, i:] = packed[..., pos:pos + dim - i]
        pos += dim - i
    _mirror_lower(out.swapaxes(-1, -2))  # the transpose's lower triangle is `out`'s upper one
    return out


def _mirror_lower(a: np.ndarray, block: int = 256) -> None:
    """Copy the strict lower triangle of square (..., d, d) `a` onto its upper one, in place, a block of rows at a
    time (no d x d temporary)."""
    d = a.shape[-1]
    for i in range(0, d, block):
        j = min(i + block, d)
        diag = a[..., i:j, i:j]
        rows, cols = np.triu_indices(j - i, 1)
        diag[..., rows, cols] = diag[..., cols, rows]
        a[..., i:j, j:] = a[..., j:, i:j].swapaxes(-1, -2)


class RidgeStatistics:
    """Sufficient statistics of ridge regression: `gram` = X^T X (d x d), `cross` = X^T Y (d x c), `count` = n.

    Additive over disjoint data, so client statistics merged in any order and grouping equal the centralized ones
    (up to float round-off); solving once on the sum is AFL's aggregation. Classes are label indices: statistics with
    fewer classes are widened with zero columns when merged (`grow_classes`).
    """

    def __init__(self, gram: np.ndarray, cross: np.ndarray, count: int = 0) -> None:
        self.gram = gram
        self.cross = _to_numpy(cross)
        self.count = int(count)
        if self._gram.ndim != 2 or self._gram.shape[0] != self._gram.shape[1] or self.cross.ndim != 2 \
                or self.cross.shape[0] != self._gram.shape[0]:
            raise ValueError(f"gram must be (d, d) and cross (d, c); got {self._gram.shape} and {self.cross.shape}")

    @property
    def gram(self) -> np.ndarray:
        """X^T X, symmetric. `update` accumulates one triangle in place; the other is filled in on first read."""
        self._fold_pending()
        if self._upper_stale:
            _mirror_lower(self._gram)
            self._upper_stale = False
        return self._gram

    @gram.setter
    def gram(self, value: Any) -> None:
        value = _to_numpy(value)
        self._gram = value if value.flags.c_contiguous else np.ascontiguousarray(value)
        self._upper_stale = False
        self._pending: list[np.ndarray] = []  # factors not yet folded in (add_factor)
        self._pending_rows = 0

    @classmethod
    def zeros(cls, dim: int, num_classes: int) -> "RidgeStatistics":
        return cls(np.zeros((dim, dim)), np.zeros((dim, num_classes)), 0)

    @classmethod
    def from_data(cls, x: Any, y: Any, num_classes: int) -> "RidgeStatistics":
        x = _to_numpy(x)
        stats = cls.zeros(x.shape[1], num_classes)
        stats.update(x, y)
        return stats

    @property
    def dim(self) -> int:
        return self._gram.shape[0]

    @property
    def num_classes(self) -> int:
        return self.cross.shape[1]

    def update(self, x: Any, y: Any, num_classes: int | None = None) -> "RidgeStatistics":
        """Add a batch: x (n, d) any float dtype, y class indices (n,) or one-hot (n, c). Returns self.

        Rows are converted to float64 in chunks (bounded memory); X^T X of a chunk is added by BLAS syrk in place
        into one triangle of `gram` (no d x d temporary: about 4x faster than `gram += x.T @ x` for a small batch
        at d = 2048); the other triangle is mirrored when `gram` is next read, so it is exactly symmetric.
        """
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (n, {self.dim}), got {x.shape}")
        targets = _targets(y, num_classes, self.num_classes)
        if targets.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {targets.shape[0]}")
        self.grow_classes(targets.shape[1])
        step = max(1, _ROW_CHUNK_BYTES // (8 * max(self.dim, 1)))
        for start in range(0, x.shape[0], step):
            xc = np.ascontiguousarray(x[start:start + step], dtype=np.float64)
            _syrk_lower(self._gram, xc)
            self._upper_stale = True
            self.cross += xc.T @ targets[start:start + step]
        self.count += x.shape[0]
        return self

    def add_factor(self, factor: Any, cross: Any, count: int) -> "RidgeStatistics":
        """Add statistics given by a factor R (r x d, R^T R = X^T X), X^T Y and n. Returns self.

        Small factors are stacked and folded in by one syrk once they reach `_ROW_CHUNK_BYTES` (or when `gram` is
        read): a rank-r update reads and writes all d^2 / 2 entries of the Gram, so folding 10,000 clients of 6
        rows each one by one moved 160 GB of memory at d = 2048, while the stacked rows cost their flops only.
        """
        factor = np.asarray(_to_numpy(factor), dtype=np.float64)
        if factor.ndim != 2 or factor.shape[1] != self.dim:
            raise ValueError(f"factor must be (r, {self.dim}), got {factor.shape}")
        cross = _to_numpy(cross)
        self.grow_classes(cross.shape[1])
        if factor.shape[0]:
            self._pending.append(factor)
            self._pending_rows += factor.shape[0]
            if self._pending_rows * 8 * self.dim >= _ROW_CHUNK_BYTES:
                self._fold_pending()
        self.cross[:, : cross.shape[1]] += cross
        self.count += int(count)
        return self

    def _fold_pending(self) -> None:
        """One syrk of the stacked pending factors into the Gram's lower triangle."""
        if not self._pending:
            return
        stacked = np.ascontiguousarray(self._pending[0] if len(self._pending) == 1 else np.vstack(self._pending))
        self._pending, self._pending_rows = [], 0
        _syrk_lower(self._gram, stacked)
        self._upper_stale = True

    def grow_classes(self, num_classes: int) -> "RidgeStatistics":
        """Widen `cross` with zero columns up to `num_classes` (new classes seen nowhere yet). Returns self."""
        if num_classes > self.num_classes:
            self.cross = np.pad(self.cross, ((0, 0), (0, num_classes - self.num_classes)))
        return self

    def __iadd__(self, other: "RidgeStatistics") -> "RidgeStatistics":
        if not isinstance(other, RidgeStatistics):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        self.grow_classes(other.num_classes)
        self.gram += other.gram
        self.cross[:, : other.num_classes] += other.cross
        self.count += other.count
        return self

    def __add__(self, other: "RidgeStatistics") -> "RidgeStatistics":
        if not isinstance(other, RidgeStatistics):
            return NotImplemented
        out = self.copy()
        out += other
        return out

    def __radd__(self, other: Any) -> "RidgeStatistics":
        """Lets `sum(list_of_stats)` work (0 + stats)."""
        if isinstance(other, int) and other == 0:
            return self.copy()
        return NotImplemented

    def copy(self) -> "RidgeStatistics":
        return RidgeStatistics(self.gram.copy(), self.cross.copy(), self.count)

    def solve(self, gamma: float) -> np.ndarray:
        """Ridge weights W (d x c) on everything accumulated; zeros when empty (gamma > 0)."""
        return ridge_solve(self.gram, self.cross, gamma)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a message (e.g. a Flower ArrayRecord); inverse of `from_arrays`."""
        return {"gram": self.gram, "cross": self.cross, "count": np.array([self.count], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> "RidgeStatistics":
        return cls(arrays["gram"], arrays["cross"], int(_to_numpy(arrays["count"], np.int64).reshape(-1)[0]))

    def __repr__(self) -> str:
        return f"RidgeStatistics(dim={self.dim}, num_classes={self.num_classes}, count={self.count})"


def regularized_upload(stats: RidgeStatistics, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """AFL's upload form: the local ridge solution W_k = (C_k + gamma I)^-1 Q_k and C_k^r = C_k + gamma I.

    Carries the same information as (C_k, Q_k) because C_k^r W_k = Q_k; an empty client uploads (0, gamma I).
    """
    if gamma <= 0:
        raise ValueError(f"the regularized upload needs gamma > 0, got {gamma}")
    c_reg = stats.gram + gamma * np.eye(stats.dim)
    return _solve_spd(c_reg, stats.cross), c_reg


class AnalyticAggregator(BaseLearner):
    """AFL's Absolute Aggregation (AA) law with the Regularization Intermediary (RI), as an associative accumulator.

    Each of K clients contributes C_k^r = C_k + gamma I and C_k^r W_k (= Q_k), either from raw statistics
    (`add_statistics`) or from the paper's upload (W_k, C_k^r) (`add_upload`); both land in the same two sums

        A = sum_k C_k^r = X^T X + K gamma I,        B = sum_k C_k^r W_k = X^T Y,

    so the two forms agree to float round-off (the only difference is C_k^r W_k vs Q_k). `solve(target)`:

    - "ridge": remove (K - 1) gamma I, W = (X^T X + gamma I)^-1 X^T Y: centralized ridge on all data (Cholesky).
    - "least-squares": remove all K gamma I, W = lstsq(X^T X, X^T Y) (minimum norm): the official code's target.

    Both are weight-invariant: any split of the data (IID, Dirichlet, empty clients, any K) gives the same W.
    Summing then solving once costs O(K d^2 + d^3) against the official pairwise O(K d^3). Accumulators merge with
    `+`, so a server can fold replies in as they arrive and re-solve after dropouts. All clients must use one gamma.
    Learned state, from the first upload on: `c_reg_` (sum_k C_k^r), `cw_` (sum_k C_k^r W_k); `num_uploads_` is K
    (empty clients included).
    """

    _fitted_attribute = "c_reg_"
    _fit_hint = "call add_statistics or add_upload"

    def __init__(self, gamma: float) -> None:
        if gamma <= 0:
            raise ValueError(f"AFL needs gamma > 0 (the regularization intermediary), got {gamma}")
        self.gamma = float(gamma)
        self.num_uploads_ = 0

    def _fold(self, c_reg: np.ndarray, cw: np.ndarray) -> None:
        if not self.is_fitted:
            self.c_reg_, self.cw_ = c_reg.copy(), cw.copy()
        else:
            if c_reg.shape != self.c_reg_.shape:
                raise ValueError(f"cannot aggregate dimension {c_reg.shape[0]} into {self.c_reg_.shape[0]}")
            if cw.shape[1] > self.cw_.shape[1]:
                self.cw_ = np.pad(self.cw_, ((0, 0), (0, cw.shape[1] - self.cw_.shape[1])))
            self.c_reg_ += c_reg
            self.cw_[:, : cw.shape[1]] += cw
        self.num_uploads_ += 1

    def add_statistics(self, stats: RidgeStatistics) -> "AnalyticAggregator":
        """Fold in one client's raw statistics (C_k, Q_k) as C_k + gamma I and Q_k. Returns self."""
        self._fold(stats.gram + self.gamma * np.eye(stats.dim), stats.cross)
        return self

    def add_upload(self, weights: Any, c_reg: Any) -> "AnalyticAggregator":
        """Fold in one client's upload (W_k, C_k^r) from `regularized_upload`. Returns self."""
        c_reg = _to_numpy(c_reg)
        self._fold(c_reg, c_reg @ _to_numpy(weights))
        return self

    def __iadd__(self, other: "AnalyticAggregator") -> "AnalyticAggregator":
        if not isinstance(other, AnalyticAggregator):
            return NotImplemented
        if other.gamma != self.gamma:
            raise ValueError(f"cannot merge aggregators with gamma {self.gamma} and {other.gamma}")
        if other.is_fitted:
            k = self.num_uploads_
            self._fold(other.c_reg_, other.cw_)
            self.num_uploads_ = k + other.num_uploads_
        return self

    def __add__(self, other: "AnalyticAggregator") -> "AnalyticAggregator":
        if not isinstance(other, AnalyticAggregator):
            return NotImplemented
        out = _copy.deepcopy(self)
        out += other
        return out

    def solve(self, target: str = "ridge") -> np.ndarray:
        """Global weights (d x c) for `target` in TARGETS (see the class docstring)."""
        if target not in TARGETS:
            raise ConfigError(f"strategy.target: unknown target {target!r}; allowed: {', '.join(TARGETS)}")
        self._check_fitted()
        eye = np.eye(self.c_reg_.shape[0])
        if target == "ridge":
            return _solve_spd(self.c_reg_ - (self.num_uploads_ - 1) * self.gamma * eye, self.cw_)
        return _solve_spd(self.c_reg_ - self.num_uploads_ * self.gamma * eye, self.cw_, use_cholesky=False)


def aggregate_uploads(uploads: Iterable[tuple[Any, Any]], gamma: float, target: str = "ridge") -> np.ndarray:
    """Global AFL weights from the clients' (W_k, C_k^r) uploads; see `AnalyticAggregator` for the math."""
    agg = AnalyticAggregator(gamma)
    for weights, c_reg in uploads:
        agg.add_upload(weights, c_reg)
    return agg.solve(target)


#: The paper's name for `aggregate_uploads` (AA law + RI).
absolute_aggregation = aggregate_uploads


def _symmetrize_from_lower(a: np.ndarray, block: int = 512) -> np.ndarray:
    """Copy the lower triangle onto the upper one in place, block by block (no d x d temporaries)."""
    d = a.shape[0]
    for j0 in range(0, d, block):
        j1 = min(d, j0 + block)
        diag = a[j0:j1, j0:j1]
        diag[...] = np.tril(diag) + np.tril(diag, -1).T
        if j1 < d:
            a[j0:j1, j1:] = a[j1:, j0:j1].T
    return a


class RecursiveLeastSquares(BaseLearner):
    """Exact streaming ridge regression (recursive least squares): AEF-OCL / ACIL's analytic classifier.

    State: R_ = (X^T X + gamma I)^-1 over all data seen (starts at I / gamma) and W_ = R_ X^T Y. A batch (X, Y) of
    b rows updates them with the Woodbury identity, ordered so that nothing costs more than O(d^2 b):

        RX = R X^T (d x b, one pass over R),  S = I_b + X RX = L L^T (b x b Cholesky),
        W += RX S^-1 (Y - X W)                (because R_new X^T = RX S^-1; no pass over R),
        R -= V V^T with V = RX L^-T           (one symmetric rank-b update in place, BLAS syrk).

    Only the lower triangle of the internal matrix is maintained (symm/syrk read and write that half), which
    halves the memory traffic and keeps R exactly symmetric; `R_` returns the full symmetric matrix. Memory is
    O(d^2 + d c) whatever the stream length. New class indices append zero columns to W_. Invariant: after any
    sequence of batches, W_ equals the ridge solution with this gamma on everything seen (to round-off).
    """

    _fitted_attribute = "_r"
    _repr_params = ("gamma",)

    def __init__(self, gamma: float = 1e-3, dtype: Any = np.float64) -> None:
        self.gamma = gamma
        self.dtype = dtype

    # ---- state -----------------------------------------------------------------------------------------------
    @property
    def R_(self) -> np.ndarray:
        """(X^T X + gamma I)^-1 over everything seen, as a new full symmetric (d x d) array."""
        self._check_fitted()
        return _symmetrize_from_lower(self._r.copy(order="F"))

    @property
    def num_classes_(self) -> int:
        self._check_fitted()
        return self.W_.shape[1]

    @property
    def dim_(self) -> int:
        self._check_fitted()
        return self.W_.shape[0]

    def _init_state(self, dim: int, num_classes: int) -> None:
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        dt = np.dtype(self.dtype)
        self._r = np.asfortranarray(np.eye(dim, dtype=dt) / dt.type(self.gamma))
        self.W_ = np.zeros((dim, num_classes), dtype=dt)
        self.n_seen_ = 0

    # ---- learning --------------------------------------------------------------------------------------------
    def partial_fit(self, x: Any, y: Any, num_classes: int | None = None) -> "RecursiveLeastSquares":
        """Absorb a batch: x (b, d), y class indices (b,) or one-hot (b, c). Returns self.

        Unseen class indices (or `num_classes` larger than seen so far) widen W_ with zero columns first. Batches
        larger than 1024 rows are split (exact; bounds the b x b system).
        """
        dt = np.dtype(self.dtype)
        x = _to_numpy(x, dt)
        if x.ndim != 2:
            raise ValueError(f"x must be (b, d), got shape {x.shape}")
        if not self.is_fitted:
            self._init_state(x.shape[1], 0)
        if x.shape[1] != self.dim_:
            raise ValueError(f"x has {x.shape[1]} features, the model {self.dim_}")
        targets = _targets(y, num_classes, self.W_.shape[1], dt)
        if targets.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {targets.shape[0]}")
        if targets.shape[1] > self.W_.shape[1]:
            self.W_ = np.pad(self.W_, ((0, 0), (0, targets.shape[1] - self.W_.shape[1])))
        for start in range(0, x.shape[0], _RLS_MAX_CHUNK):
            self._update(x[start:start + _RLS_MAX_CHUNK], targets[start:start + _RLS_MAX_CHUNK])
        return self

    def _update(self, x: np.ndarray, y: np.ndarray) -> None:
        b = x.shape[0]
        if b == 0:
            return
        symm, syrk = _blas.get_blas_funcs(("symm", "syrk"), (self._r,))
        rx = symm(1.0, self._r, np.asfortranarray(x.T), side=0, lower=1)        # R X^T, (d, b)
        s = x @ rx
        s[np.diag_indices(b)] += 1.0
        chol = np.linalg.cholesky(s)                                              # S = L L^T, S is SPD
        self.W_ += rx @ scipy.linalg.cho_solve((chol, True), y - x @ self.W_, check_finite=False)
        v = scipy.linalg.solve_triangular(chol, rx.T, lower=True, check_finite=False).T  # RX L^-T
        self._r = syrk(-1.0, v, beta=1.0, c=self._r, lower=1, overwrite_c=1)      # in place (Fortran order)
        self.n_seen_ += b

    def fit(self, x: Any, y: Any, num_classes: int | None = None) -> "RecursiveLeastSquares":
        """Forget everything, then `partial_fit` on (x, y)."""
        for name in ("_r", "W_", "n_seen_"):
            self.__dict__.pop(name, None)
        return self.partial_fit(x, y, num_classes)

    # ---- inference -------------------------------------------------------------------------------------------
    def decision_function(self, x: Any) -> np.ndarray:
        """Scores X W_ (n, c)."""
        self._check_fitted()
        return _to_numpy(x, self.W_.dtype) @ self.W_

    def predict(self, x: Any) -> np.ndarray:
        """Class indices argmax(X W_) (n,)."""
        return np.argmax(self.decision_function(x), axis=1)

    # ---- snapshots -------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """Copies of R (full symmetric) and W, plus the sample count; `set_state` restores them exactly."""
        self._check_fitted()
        return {"R": self.R_, "W": self.W_.copy(), "n_seen": np.array([self.n_seen_], dtype=np.int64)}

    def set_state(self, state: dict[str, Any]) -> "RecursiveLeastSquares":
        """Restore a `get_state()` snapshot (R may be full symmetric; only its lower triangle is read)."""
        dt = np.dtype(self.dtype)
        self._r = np.array(_to_numpy(state["R"], dt), order="F", copy=True)
        self.W_ = np.array(_to_numpy(state["W"], dt), copy=True)
        self.n_seen_ = int(_to_numpy(state.get("n_seen", [0]), np.int64).reshape(-1)[0])
        return self

    def copy(self) -> "RecursiveLeastSquares":
        """Independent deep copy (cheap: no symmetrization); e.g. to apply a pseudo-feature top-up and discard it."""
        return _copy.deepcopy(self)

    def _repr_state(self) -> str:
        return f"dim={self.dim_}, num_classes={self.num_classes_}" if self.is_fitted else ""


class ClassStatistics:
    """Per-class running statistics of feature vectors: count, mean, centred sum of squares, optional Gram and
    optional centred scatter matrix.

    Used by AEF-OCL's pseudo-feature generator (mean and per-dimension variance), DPCR (per-class Gram
    Phi_c = X_c^T X_c, uncentred, and means) and the one-shot head recalibration of FuseFL and the recalibrated
    ensemble (full per-class covariance: `track_scatter`, `covariance`). Batches and other instances are merged
    with Chan et al.'s pairwise formula on (count, mean, M2) and, when tracked, on the scatter
    S_c = sum_i (x_i - mu_c)(x_i - mu_c)^T (S = S_a + S_b + (n_a n_b / n) d d^T, d = mu_b - mu_a), which is stable
    where sum-of-squares minus squared-sum cancels; `sum` and `sumsq` are derived. Classes are label indices and
    grow on demand. State: `count` (c,), `mean` (c, d), `m2` (c, d), `gram` (c, d, d) or None, `scatter`
    (c, d, d) or None.
    """

    def __init__(self, count: Any, mean: Any, m2: Any, gram: Any | None = None, scatter: Any | None = None) -> None:
        self.count = _to_numpy(count, np.int64).reshape(-1)
        self._mean = _to_numpy(mean)
        self.m2 = _to_numpy(m2)
        self.gram = None if gram is None else _to_numpy(gram)
        self.scatter = None if scatter is None else _to_numpy(scatter)
        c = self.count.shape[0]
        if self._mean.shape[0] != c or self.m2.shape != self._mean.shape or self._mean.ndim != 2:
            raise ValueError(f"count (c,), mean and m2 (c, d) expected; got {self.count.shape}, "
                             f"{self._mean.shape}, {self.m2.shape}")
        if self.gram is not None and self.gram.shape != (c, self.dim, self.dim):
            raise ValueError(f"gram must be ({c}, {self.dim}, {self.dim}), got {self.gram.shape}")
        if self.scatter is not None and self.scatter.shape != (c, self.dim, self.dim):
            raise ValueError(f"scatter must be ({c}, {self.dim}, {self.dim}), got {self.scatter.shape}")

    @classmethod
    def zeros(cls, dim: int, num_classes: int = 0, track_gram: bool = False,
              track_scatter: bool = False) -> "ClassStatistics":
        return cls(np.zeros(num_classes, np.int64), np.zeros((num_classes, dim)), np.zeros((num_classes, dim)),
                   np.zeros((num_classes, dim, dim)) if track_gram else None,
                   np.zeros((num_classes, dim, dim)) if track_scatter else None)

    @classmethod
    def from_sums(cls, count: Any, sum: Any, sumsq: Any, gram: Any | None = None) -> "ClassStatistics":
        """From raw per-class sums (the official PFG's form); less stable than merging instances."""
        count = _to_numpy(count, np.int64).reshape(-1)
        total, sumsq = _to_numpy(sum), _to_numpy(sumsq)
        n = np.maximum(count, 1)[:, None]
        mean = total / n
        return cls(count, mean, np.maximum(sumsq - total * mean, 0.0), gram)

    # ---- shape -----------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.count.shape[0]

    @property
    def dim(self) -> int:
        return self._mean.shape[1]

    @property
    def track_gram(self) -> bool:
        return self.gram is not None

    @property
    def track_scatter(self) -> bool:
        return self.scatter is not None

    def grow_classes(self, num_classes: int) -> "ClassStatistics":
        """Add empty classes up to `num_classes`. Returns self."""
        extra = num_classes - self.num_classes
        if extra > 0:
            self.count = np.pad(self.count, (0, extra))
            self._mean = np.pad(self._mean, ((0, extra), (0, 0)))
            self.m2 = np.pad(self.m2, ((0, extra), (0, 0)))
            if self.gram is not None:
                self.gram = np.pad(self.gram, ((0, extra), (0, 0), (0, 0)))
            if self.scatter is not None:
                self.scatter = np.pad(self.scatter, ((0, extra), (0, 0), (0, 0)))
        return self

    # ---- statistics ------------------------------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        """Per-class mean (c, d); zeros for classes never seen."""
        return self._mean

    @property
    def var(self) -> np.ndarray:
        """Unbiased per-dimension variance (c, d); 0 where count < 2."""
        denom = (self.count - 1).astype(np.float64)[:, None]
        return np.where(denom > 0, self.m2 / np.maximum(denom, 1.0), 0.0)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def sum(self) -> np.ndarray:
        return self._mean * self.count[:, None]

    @property
    def sumsq(self) -> np.ndarray:
        """Per-class, per-dimension sum of squares (c, d)."""
        return self.m2 + self.count[:, None] * self._mean**2

    def gram_of(self, c: int) -> np.ndarray:
        """Uncentred Gram X_c^T X_c (d x d) of class c (needs track_gram=True)."""
        if self.gram is None:
            raise ValueError("this ClassStatistics was built with track_gram=False")
        if c >= self.num_classes:
            return np.zeros((self.dim, self.dim))
        return self.gram[c]

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased per-class covariance S_c / (n_c - 1) (c, d, d); 0 where count < 2 (needs track_scatter=True)."""
        if self.scatter is None:
            raise ValueError("this ClassStatistics was built with track_scatter=False")
        denom = np.maximum(self.count - 1, 1).astype(np.float64)[:, None, None]
        return np.where((self.count >= 2)[:, None, None], self.scatter / denom, 0.0)

    # ---- accumulation ----------------------------------------------------------------------------------------
    def _merge_class(self, c: int, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray,
                     scatter_b: np.ndarray | None = None) -> None:
        n_a = int(self.count[c])
        n = n_a + n_b
        if n_b == 0:
            return
        delta = mean_b - self._mean[c]
        if self.scatter is not None:
            self.scatter[c] += scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._mean[c] += delta * (n_b / n)
        self.m2[c] += m2_b + delta**2 * (n_a * n_b / n)
        self.count[c] = n

    def update(self, x: Any, y: Any) -> "ClassStatistics":
        """Add a batch: x (n, d), y class indices (n,). Returns self."""
        x = _to_numpy(x)
        y = _to_numpy(y, np.int64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] != y.shape[0]:
            raise ValueError(f"x must be (n, {self.dim}) with one label per row; got {x.shape} and {y.shape}")
        if y.size == 0:
            return self
        if y.min() < 0:
            raise ValueError("labels must be >= 0")
        self.grow_classes(int(y.max()) + 1)
        for c in np.unique(y):
            xc = x[y == c]
            mean_b = xc.mean(axis=0)
            centred = xc - mean_b
            self._merge_class(int(c), xc.shape[0], mean_b, (centred ** 2).sum(axis=0),
                              centred.T @ centred if self.scatter is not None else None)
            if self.gram is not None:
                self.gram[c] += xc.T @ xc
        return self

    def __iadd__(self, other: "ClassStatistics") -> "ClassStatistics":
        if not isinstance(other, ClassStatistics):
            return NotImplemented
        if other.dim != self.dim or other.track_gram != self.track_gram or other.track_scatter != self.track_scatter:
            raise ValueError("cannot merge ClassStatistics of different dim, track_gram or track_scatter")
        self.grow_classes(other.num_classes)
        for c in np.flatnonzero(other.count):
            self._merge_class(int(c), int(other.count[c]), other._mean[c], other.m2[c],
                              None if other.scatter is None else other.scatter[c])
        if self.gram is not None:
            self.gram[: other.num_classes] += other.gram
        return self

    def __add__(self, other: "ClassStatistics") -> "ClassStatistics":
        if not isinstance(other, ClassStatistics):
            return NotImplemented
        out = self.copy()
        out += other
        return out

    def __radd__(self, other: Any) -> "ClassStatistics":
        if isinstance(other, int) and other == 0:
            return self.copy()
        return NotImplemented

    def copy(self) -> "ClassStatistics":
        return ClassStatistics(self.count.copy(), self._mean.copy(), self.m2.copy(),
                               None if self.gram is None else self.gram.copy(),
                               None if self.scatter is None else self.scatter.copy())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a message; inverse of `from_arrays`."""
        out = {"count": self.count, "mean": self._mean, "m2": self.m2}
        if self.gram is not None:
            out["gram"] = self.gram
        if self.scatter is not None:
            out["scatter"] = self.scatter
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> "ClassStatistics":
        return cls(arrays["count"], arrays["mean"], arrays["m2"], arrays.get("gram"), arrays.get("scatter"))

    def __repr__(self) -> str:
        scatter = ", track_scatter=True" if self.track_scatter else ""
        return (f"ClassStatistics(dim={self.dim}, num_classes={self.num_classes}, track_gram={self.track_gram}"
                f"{scatter})")
