"""FeCAM's learner: per-class prototypes and shrunk, normalized covariances; Mahalanobis decision.

FeCAM (Goswami et al., "FeCAM: Exploiting the Heterogeneity of Class Distributions in Exemplar-Free Continual
Learning", NeurIPS 2023; official code github dipamgoswami/FeCAM, ``models/fecam.py``, ``models/base.py``,
``utils/maha_utils.py``, ``exps/FeCAM_cifar100.json``). The backbone is trained on the first task and frozen; every
class c keeps, from the frozen embeddings z >= 0 of its training samples,

    prototype        mu_c = T(mean_i z_i)                         T(z) = z^beta (Tukey's ladder, beta = 0.5)
    covariance       S_c = cov_i T(z_i)                           (unbiased, np.cov)
    shrinkage (x2)   S <- S + a1 V1 I + a2 V2 (1 1^T - I)         V1 = mean of diag(S), V2 = mean of its non-zero
                                                                  off-diagonal entries; a1 = a2 = 1; applied twice
    normalization    S <- S / (s s^T), s = sqrt(diag(S))          (a correlation matrix)

and a test embedding x is assigned to argmin_c (u - m_c)^T S_c^+ (u - m_c), u = n(T(n(x))), m_c = n(mu_c),
n(v) = v / ||v||. The official code applies the shrinkage twice (``compute_new_cov`` and again in ``_train``: "we
apply covariance shrinkage 2 times"; ``shrink_times = 2``), forms the prototype from the mean of the raw
embeddings (T after the mean) and inverts with ``torch.linalg.pinv``; fedsim takes the same pseudo-inverse from a
float64 eigendecomposition (eigenvalues below lambda_max * d * eps dropped, pinv's rule) and never forms it. The
official code scores the first task by the cosine head's weights (Euclidean, identity covariance) and uses the
Mahalanobis rule only from the second task on; fedsim uses the Mahalanobis rule at every task (the paper's method).

All statistics are sums over samples (count, sum of z, sum of T(z), sum of T(z)^T T(z)), so clients' sums add up
to the centralized ones exactly (federated FeCAM); everything is float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.analytic import pack_upper, unpack_upper
from fedsim.estimator import BaseLearner

__all__ = ["FeCAM", "fecam_sums", "shrink_covariance", "normalize_covariance", "tukey"]


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def tukey(z: Any, beta: float = 0.5) -> np.ndarray:
    """Tukey's ladder of powers: z^beta (log z for beta = 0); z must be >= 0 (post-ReLU embeddings)."""
    z = _np(z)
    return np.log(z) if beta == 0 else np.power(np.maximum(z, 0.0), beta)


def shrink_covariance(cov: Any, alpha1: float = 1.0, alpha2: float = 1.0) -> np.ndarray:
    """S + a1 V1 I + a2 V2 (1 1^T - I): V1 = mean diagonal, V2 = mean of the non-zero off-diagonal entries."""
    s = _np(cov)
    d = s.shape[0]
    off = s[~np.eye(d, dtype=bool)]
    off = off[off != 0.0]
    v1 = float(np.mean(np.diag(s)))
    v2 = float(off.mean()) if off.size else 0.0
    eye = np.eye(d)
    return s + alpha1 * v1 * eye + alpha2 * v2 * (1.0 - eye)


def normalize_covariance(cov: Any) -> np.ndarray:
    """S / (s s^T) with s = sqrt(diag(S)): the correlation matrix."""
    s = _np(cov)
    sd = np.sqrt(np.diag(s))
    return s / np.outer(sd, sd)


def fecam_sums(features: Any, labels: Any, classes: Any, beta: float = 0.5) -> dict[str, np.ndarray]:
    """Additive per-class sums of one share: count, sum z, sum T(z), packed upper triangle of T(Z_c)^T T(Z_c)."""
    z, y = _np(features), np.asarray(labels, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    t = tukey(z, beta)
    d = z.shape[1]
    count = np.array([(y == c).sum() for c in classes], np.int64)
    total = np.zeros((len(classes), d))
    total_t = np.zeros((len(classes), d))
    gram = np.zeros((len(classes), d, d))
    for k, c in enumerate(classes):
        mask = y == c
        total[k], total_t[k] = z[mask].sum(axis=0), t[mask].sum(axis=0)
        gram[k] = t[mask].T @ t[mask]
    return {"classes": classes, "count": count, "sum": total, "sum_t": total_t, "gram_t": pack_upper(gram)}


class FeCAM(BaseLearner):
    """Per-class Mahalanobis classifier over frozen embeddings (sklearn style; see the module docstring).

    ``partial_fit(sums)`` adds the classes of ``fecam_sums`` (summed over clients); stored per class: ``counts_``,
    ``prototypes_`` (k, d: T(mean z)), ``covariances_`` (k, d, d: shrunk ``shrink_times`` times, then normalized if
    ``normalize``), ``classes_``. ``decision_function`` returns minus the squared Mahalanobis distances.
    """

    _fitted_attribute = "classes_"

    def __init__(self, beta: float = 0.5, alpha1: float = 1.0, alpha2: float = 1.0, shrink_times: int = 2,
                 normalize: bool = True) -> None:
        self.beta = beta
        self.alpha1 = alpha1
        self.alpha2 = alpha2
        self.shrink_times = shrink_times
        self.normalize = normalize

    def class_covariance(self, count: int, sum_t: np.ndarray, gram_t: np.ndarray) -> np.ndarray:
        """The unbiased covariance of T(z) from its sums, shrunk and normalized as configured."""
        mean = sum_t / count
        cov = (gram_t - count * np.outer(mean, mean)) / max(count - 1, 1)
        cov = (cov + cov.T) / 2.0
        for _ in range(int(self.shrink_times)):
            cov = shrink_covariance(cov, self.alpha1, self.alpha2)
        return normalize_covariance(cov) if self.normalize else cov

    def partial_fit(self, sums: dict[str, Any]) -> "FeCAM":
        classes = np.asarray(sums["classes"], dtype=np.int64)
        count = np.asarray(sums["count"], dtype=np.int64)
        total, total_t = _np(sums["sum"]), _np(sums["sum_t"])
        d = total.shape[1]
        gram = unpack_upper(sums["gram_t"], d)
        if not hasattr(self, "classes_"):
            self._store: dict[int, tuple[int, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}
        for k, c in enumerate(classes.tolist()):
            n = int(count[k])
            if n < 1:
                continue
            cov = self.class_covariance(n, total_t[k], gram[k])
            values, vectors = np.linalg.eigh(cov)
            keep = values > values.max() * d * np.finfo(np.float64).eps  # torch.linalg.pinv's default cut
            factor = vectors[:, keep] / np.sqrt(values[keep])  # S^+ = factor factor^T
            self._store[c] = (n, tukey(total[k] / n, self.beta), cov, factor)
        self.classes_ = np.array(sorted(self._store), np.int64)
        return self

    @property
    def counts_(self) -> np.ndarray:
        return np.array([self._store[c][0] for c in self.classes_.tolist()], np.int64)

    @property
    def prototypes_(self) -> np.ndarray:
        return np.stack([self._store[c][1] for c in self.classes_.tolist()])

    @property
    def covariances_(self) -> np.ndarray:
        return np.stack([self._store[c][2] for c in self.classes_.tolist()])

    def transform(self, x: Any) -> np.ndarray:
        """n(T(n(x))): the test-side transform of the official ``_eval_maha`` / ``_mahalanobis``."""
        z = _np(x)
        z = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-8)
        t = tukey(z, self.beta)
        return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)

    def decision_function(self, x: Any) -> np.ndarray:
        """Minus the squared Mahalanobis distance (n, k) to each class of ``classes_``."""
        self._check_fitted()
        u = self.transform(x)
        out = np.empty((u.shape[0], len(self.classes_)))
        for k, c in enumerate(self.classes_.tolist()):
            _, proto, _, factor = self._store[c]
            diff = u - proto / max(np.linalg.norm(proto), 1e-12)
            out[:, k] = -((diff @ factor) ** 2).sum(axis=1)
        return out

    def predict(self, x: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(x), axis=1)]
