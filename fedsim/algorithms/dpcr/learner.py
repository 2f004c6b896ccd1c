"""DPCR's learner: the statistics, the drift estimate, the calibration and the classifier reconstruction.

Dual-Projection shift estimation and Classifier Reconstruction (He et al., "Dual-Projection Shift Estimation and
Classifier Reconstruction for Exemplar-Free Class-Incremental Learning", ICML 2025, arXiv 2503.05423; official
code github RHe502/ICML25-DPCR). Features are row vectors x = f(image) of the backbone (d = its embedding width).

Per class c the learner stores only the count n_c, the mean mu_c (1 x d) and the uncentred Gram
Phi_c = X_c^T X_c (d x d). After the backbone moved from f_old to f_new on task t:

    TSSP  (task-wise shift)      Delta = (X_old^T X_old + eps I)^-1 X_old^T X_new      over the current task's data
    CIP   (class row space)      P_c = U_c U_c^T, U_c = eigenvectors of Phi_c with eigenvalue above a tolerance
    calibration, old classes     W_c = Delta P_c;   Phi_c <- W_c^T Phi_c W_c;   mu_c <- mu_c W_c
    reconstruction (all classes) W = (sum_c Phi_c + gamma I)^-1 (sum_c n_c mu_c^T e_c)    (ridge regression)
    class normalization (CN)     w_c <- w_c / ||w_c||

With the backbone unchanged the reconstruction *is* ridge regression on all features, because sum_c Phi_c = X^T X
and sum_c n_c mu_c^T e_c = X^T Y. If the drift is linear, X_new = X_old A with X_old of full column rank, TSSP
returns Delta = A (to the eps regularization) and the calibrated statistics are those of the mapped features.
CIP then projects the mapped class onto the row space of its stored Gram (W_c = Delta P_c, the paper's and the
official code's order): for a class whose features span all d dimensions P_c = I and nothing changes; for a
class of lower rank the directions it never occupied, about which the task-level map (fitted on other classes'
data) knows nothing reliable for this class, are cut off.

The CIP tolerance (`cip_tol`): 0 (default) keeps every singular value S > 0, the official code's test
(`get_projector_svd`: `torch.where(S > 0)`), the operator behind the paper's numbers. Exactly-zero singular values
come from feature channels that are 0 for every sample of the class (dead ReLU channels): they are split off before
the eigendecomposition, so they are dropped wherever they sit (LAPACK returns an exact 0 for them in some positions
and a round-off value in others); round-off directions elsewhere are kept, so on a Gram without dead channels P_c
is about the identity. "rank" keeps S > S_max * d * machine eps (numpy's matrix_rank rule, the numerical rank); a
float t > 0 keeps S > t * S_max.

All statistics are sums over samples, so per-client statistics summed on a server equal the centralized ones
(federated DPCR, which none of the published systems has): clients upload per-class (n_c, mu_c, Phi_c) from
`fedsim.analytic.ClassStatistics` and the TSSP pair (X_old^T X_old, X_old^T X_new) as a
`fedsim.analytic.RidgeStatistics` whose "targets" are the new features. Sums, solves and class statistics come
from `fedsim.analytic`; everything is float64.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from fedsim.analytic import ClassStatistics, RidgeStatistics, pack_upper, ridge_solve, unpack_upper
from fedsim.estimator import BaseLearner

__all__ = [
    "DPCR",
    "class_statistics",
    "drift_statistics",
    "drift_map",
    "row_space_projector",
    "NUMERICAL_RANK",
    "encode_statistics",
    "decode_statistics",
]


#: Below this feature width the d x d algebra runs on one BLAS thread: on a shared 2-core machine OpenBLAS's
#: spinning threads made a 128 x 128 eigh 200x slower (0.6 s instead of 3 ms), and one thread is fast enough.
SINGLE_THREAD_DIM = 512


def _blas_scope(dim: int):  # noqa: ANN202
    return threadpool_limits(1, user_api="blas") if dim <= SINGLE_THREAD_DIM else contextlib.nullcontext()


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def class_statistics(features: Any, labels: Any, dim: int | None = None) -> ClassStatistics:
    """Per-class count, mean and uncentred Gram of ``features`` (n, d) grouped by ``labels`` (n,)."""
    x = _np(features)
    d = int(dim) if dim is not None else x.shape[1]
    return ClassStatistics.zeros(d, 0, track_gram=True).update(x.reshape(-1, d), labels)


def drift_statistics(old_features: Any, new_features: Any) -> RidgeStatistics:
    """TSSP's sufficient statistics: gram = X_old^T X_old, cross = X_old^T X_new, count = n (additive)."""
    x_old, x_new = _np(old_features), _np(new_features)
    if x_old.shape != x_new.shape:
        raise ValueError(f"old and new features must have the same shape, got {x_old.shape} and {x_new.shape}")
    stats = RidgeStatistics.zeros(x_old.shape[1], x_new.shape[1])
    return stats.update(x_old, x_new)


def drift_map(stats: RidgeStatistics, eps: float = 1e-9) -> np.ndarray:
    """TSSP's Delta = (X_old^T X_old + eps I)^-1 X_old^T X_new (d x d), solved, never inverted."""
    return ridge_solve(stats.gram, stats.cross, eps)


#: ``cip_tol`` value for the numerical-rank tolerance (S > S_max * d * machine eps).
NUMERICAL_RANK = "rank"


def row_space_projector(gram: Any, tol: float | str = 0.0) -> tuple[np.ndarray, int]:
    """CIP's projector P = U U^T onto the row space of X_c from its Gram Phi_c = X_c^T X_c, and its rank.

    The singular values of the symmetric PSD Gram are the absolute values of its eigenvalues (``eigh``).
    ``tol`` 0: keep S > 0 (the official code); ``"rank"``: keep S > S_max * d * eps (numerical rank); ``tol`` > 0:
    keep S > tol * S_max. Channels whose Gram row is exactly 0 (Phi_jj = 0: x_j = 0 for every sample) have S = 0
    exactly and are never kept; the eigendecomposition runs on the other channels.
    """
    if isinstance(tol, str) and tol != NUMERICAL_RANK:
        raise ValueError(f"cip_tol: {tol!r} is not allowed; use a number >= 0 or {NUMERICAL_RANK!r}")
    g = _np(gram)
    d = g.shape[0]
    live = np.flatnonzero(np.diagonal(g) != 0)
    block = g[np.ix_(live, live)]
    values, vectors = np.linalg.eigh((block + block.T) / 2.0)
    s = np.abs(values)
    s_max = float(s.max()) if s.size else 0.0
    if tol == NUMERICAL_RANK:
        threshold = s_max * d * np.finfo(np.float64).eps
    elif tol == 0:
        threshold = 0.0
    else:
        threshold = float(tol) * s_max
    keep = s > threshold
    u = np.zeros((d, int(keep.sum())))
    u[live] = vectors[:, keep]
    return u @ u.T, int(keep.sum())


class DPCR(BaseLearner):
    """Exemplar-free class-incremental classifier over a drifting backbone (sklearn style; see the module doc).

    ``partial_fit(new_stats, drift)`` is one task: calibrate the stored classes with the TSSP statistics of this
    task (ignored on the first task, and unused when ``tssp`` is False), add the new classes' statistics, rebuild
    the classifier. Learned state: ``counts_`` (C,), ``means_`` (C, d), ``grams_`` (C, d, d), ``coef_`` (d, C),
    ``classes_`` (labels with data), ``drift_`` (the last Delta or None), ``cip_ranks_`` (rank of each P_c used in
    the last calibration). Switching ``tssp``, ``cip`` and ``class_norm`` off gives the ablation rows; all off is
    the ridge classifier on un-calibrated statistics. Fitted once a task has been learned (``coef_``).
    """

    def __init__(self, gamma: float = 1.0, tssp: bool = True, cip: bool = True, cip_tol: float | str = 0.0,
                 class_norm: bool = True, tssp_eps: float = 1e-9) -> None:
        self.gamma = gamma
        self.tssp = tssp
        self.cip = cip
        self.cip_tol = cip_tol
        self.class_norm = class_norm
        self.tssp_eps = tssp_eps

    # ---- state -----------------------------------------------------------------------------------------------
    @property
    def dim_(self) -> int:
        return self.means_.shape[1]

    @property
    def num_classes_(self) -> int:
        return self.counts_.shape[0]

    def statistics_nbytes(self, dtype: Any = np.float64) -> int:
        """Memory of the stored statistics (counts, means, Grams of the classes seen) at ``dtype`` precision."""
        k = len(self.classes_)
        d = self.dim_
        return int(k * 8 + k * (d + d * d) * np.dtype(dtype).itemsize)

    def _grow(self, num_classes: int, dim: int) -> None:
        if not hasattr(self, "counts_"):
            self.counts_ = np.zeros(0, np.int64)
            self.means_ = np.zeros((0, dim))
            self.grams_ = np.zeros((0, dim, dim))
            self.drift_ = None
            self.cip_ranks_ = {}
        if dim != self.means_.shape[1]:
            raise ValueError(f"statistics of dimension {dim} do not match the learner's {self.means_.shape[1]}")
        extra = num_classes - self.counts_.shape[0]
        if extra > 0:
            self.counts_ = np.pad(self.counts_, (0, extra))
            self.means_ = np.pad(self.means_, ((0, extra), (0, 0)))
            self.grams_ = np.pad(self.grams_, ((0, extra), (0, 0), (0, 0)))

    # ---- learning --------------------------------------------------------------------------------------------
    def calibrate(self, delta: Any) -> "DPCR":
        """Move every stored class into the new feature space: W_c = Delta P_c (P_c = I without CIP)."""
        delta = _np(delta)
        ranks = {}
        for c in np.flatnonzero(self.counts_):
            if self.cip:
                proj, ranks[int(c)] = row_space_projector(self.grams_[c], self.cip_tol)
                w = delta @ proj
            else:
                w = delta
            self.grams_[c] = w.T @ self.grams_[c] @ w
            self.grams_[c] = (self.grams_[c] + self.grams_[c].T) / 2.0
            self.means_[c] = self.means_[c] @ w
        self.cip_ranks_ = ranks
        self.drift_ = delta
        return self

    def add_statistics(self, stats: ClassStatistics) -> "DPCR":
        """Merge class statistics (count-weighted means, summed Grams) into the stored ones."""
        if not stats.track_gram:
            raise ValueError("DPCR needs class Grams: build the ClassStatistics with track_gram=True")
        self._grow(stats.num_classes, stats.dim)
        for c in np.flatnonzero(stats.count):
            n_old, n_new = int(self.counts_[c]), int(stats.count[c])
            n = n_old + n_new
            self.means_[c] = (n_old * self.means_[c] + n_new * stats.mean[c]) / n
            self.grams_[c] += stats.gram[c]
            self.counts_[c] = n
        return self

    def reconstruct(self) -> "DPCR":
        """W = (sum_c Phi_c + gamma I)^-1 sum_c n_c mu_c^T e_c, then unit-norm class vectors if ``class_norm``."""
        gram = self.grams_.sum(axis=0)
        cross = (self.means_ * self.counts_[:, None]).T  # (d, C): column c = n_c mu_c^T
        coef = ridge_solve(gram, cross, self.gamma)
        self.classes_ = np.flatnonzero(self.counts_)
        if self.class_norm:
            norms = np.linalg.norm(coef[:, self.classes_], axis=0)
            coef[:, self.classes_] /= np.where(norms > 0, norms, 1.0)
        self.coef_ = coef
        return self

    def partial_fit(self, stats: ClassStatistics, drift: RidgeStatistics | None = None) -> "DPCR":
        """One task: calibrate the old classes with this task's TSSP statistics, add ``stats``, reconstruct."""
        with _blas_scope(stats.dim):
            if self.is_fitted and self.tssp and len(self.classes_):
                if drift is None:
                    raise ValueError("TSSP needs the drift statistics (X_old^T X_old, X_old^T X_new) of this task")
                self.calibrate(drift_map(drift, self.tssp_eps))
            self.add_statistics(stats)
            return self.reconstruct()

    def fit(self, stats: ClassStatistics) -> "DPCR":
        """Forget everything, then learn from ``stats`` (one task, no calibration)."""
        for name in ("counts_", "means_", "grams_", "coef_", "classes_", "drift_", "cip_ranks_"):
            self.__dict__.pop(name, None)
        return self.partial_fit(stats)

    # ---- inference -------------------------------------------------------------------------------------------
    def decision_function(self, x: Any) -> np.ndarray:
        """Scores X W (n, C); columns of classes without data are -inf."""
        self._check_fitted()
        scores = _np(x) @ self.coef_
        unseen = np.ones(self.coef_.shape[1], bool)
        unseen[self.classes_] = False
        scores[:, unseen] = -np.inf
        return scores

    def predict(self, x: Any) -> np.ndarray:
        return np.argmax(self.decision_function(x), axis=1)

    # ---- snapshots -------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts_.copy(), "means": self.means_.copy(), "grams": self.grams_.copy(),
                "coef": self.coef_.copy()}


# ------------------------------------------------------------------------------------------------ wire format
def encode_statistics(stats: ClassStatistics, classes: Any, drift: RidgeStatistics | None = None
                      ) -> dict[str, np.ndarray]:
    """Additive arrays for a message: per class of ``classes`` its count, feature sum and Gram, plus the TSSP pair.

    Every array is a plain sum over samples (the symmetric Grams as their upper triangles), so replies of any group
    of clients combine by adding them array by array (``classes`` excepted) and the server's total equals the
    centralized statistics.
    """
    classes = np.asarray(classes, dtype=np.int64)
    stats = stats.copy().grow_classes(int(classes.max()) + 1 if classes.size else 0)
    out = {
        "classes": classes,
        "count": stats.count[classes],
        "sum": stats.sum[classes],
        "gram": pack_upper(stats.gram[classes]),
    }
    if drift is not None:
        out.update(drift_gram=pack_upper(drift.gram), drift_cross=drift.cross,
                   drift_count=np.array([drift.count], np.int64))
    return out


def decode_statistics(arrays: dict[str, Any], num_classes: int | None = None
                      ) -> tuple[ClassStatistics, RidgeStatistics | None]:
    """Inverse of ``encode_statistics``: ClassStatistics (with Grams) over label indices, and the TSSP pair."""
    classes = np.asarray(arrays["classes"], dtype=np.int64)
    count, total = np.asarray(arrays["count"]), np.asarray(arrays["sum"], dtype=np.float64)
    d = total.shape[-1]
    gram = unpack_upper(arrays["gram"], d)
    c = max(int(num_classes or 0), int(classes.max()) + 1 if classes.size else 0)
    full_count, full_sum = np.zeros(c, np.int64), np.zeros((c, d))
    full_gram = np.zeros((c, d, d))
    full_count[classes], full_sum[classes], full_gram[classes] = count, total, gram
    sumsq = np.diagonal(full_gram, axis1=1, axis2=2)
    stats = ClassStatistics.from_sums(full_count, full_sum, sumsq, full_gram)
    drift = None
    if "drift_gram" in arrays:
        drift = RidgeStatistics(unpack_upper(arrays["drift_gram"], d), arrays["drift_cross"],
                                int(np.asarray(arrays["drift_count"]).reshape(-1)[0]))
    return stats, drift
