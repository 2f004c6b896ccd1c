"""AEF-OCL's learner: the math the centralized run, the federated clients and the federated server share.

Analytic Exemplar-Free Online Continual Learning (Zhuang et al., "Online Analytic Exemplar-Free Continual Learning
with Large Models for Imbalanced Autonomous Driving Task", arXiv 2405.17779; official code
github.com/ZHUANGHP/Analytic-continual-learning, `analytic/AEFOCL.py`). With a frozen backbone x = f(image) in
R^D, a frozen buffer layer h = act(x B) in R^d (B seeded, D x d: N(0, 1/D) by default, or U(+-1/sqrt(D)) as the official
buffer with `buffer_init = "uniform"`) and one-hot labels Y:

Classifier (ACIL-style recursive least squares, float64). With R_0 = I / gamma and W_0 = 0, a batch (H_t, Y_t):

    R_t = R_{t-1} - R_{t-1} H_t^T (I + H_t R_{t-1} H_t^T)^-1 H_t R_{t-1}
    W_t = W_{t-1} + R_t H_t^T (Y_t - H_t W_{t-1})

so that after any sequence of batches W_t = (H^T H + gamma I)^-1 H^T Y on everything seen (joint ridge). New
classes add zero columns. Nothing but (R, W) is kept: memory O(d^2 + d c), whatever the stream length. The update
itself is `fedsim.analytic.RecursiveLeastSquares` (O(d^2 b) per batch).

Pseudo-Features Generator (PFG). The stream is class-imbalanced, and ridge regression on it inherits the skew.
PFG keeps, per class c, the count n_c and the running mean mu_c and unbiased per-dimension variance s_c^2 of the
features (`fedsim.analytic.ClassStatistics`, merged recursively; in backbone space by default, as the official
code, or in buffer space). At a balancing point every seen class is topped up to a target count

    target = max_c n_c   (balance = "max", the paper)     or     round(mean_c n_c)   (balance = "mean")

with k_c = target - n_c pseudo-features drawn from N(mu_c, (noise * s_c)^2) (diagonal; noise = 1 by default),
passed through the buffer layer and fed to the same least-squares update. As in the official code the top-up is
applied to a copy: the balanced weights W_bal = ridge(real + pseudo) are used for prediction, the real-data state
is kept, so pseudo-features never pile up across balancing points and are never stored. `draws` caps the number
drawn per class: m_c = min(k_c, draws) samples, each weighted by k_c / m_c (rows and targets scaled by its square
root), so the effective counts are still balanced in expectation at a fraction of the cost (None = k_c, the paper).

Two solvers give the same weights (to round-off):

- "recursive" (centralized stream): the RLS state (R, W); W exact after every batch. The balanced weights come from
  a Woodbury update of a copy (few pseudo rows) or, for m >> d pseudo rows with Gram G and cross P,
  W_bal = (R^-1 + G)^-1 (R^-1 W + P) = (I + R G)^-1 (W + R P)   (one d x d solve, no inverse).
- "statistics" (federated): the sufficient statistics C = H^T H, Q = H^T Y, n (`fedsim.analytic.RidgeStatistics`)
  and the PFG class statistics; W = (C + gamma I)^-1 Q on demand. Statistics of disjoint streams add, so a server
  folding in its clients' increments holds exactly the statistics of the union of their streams, and its W equals
  the recursive learner's on that union; PFG class statistics merge too, so imbalance is corrected globally.

`learner_for(params, config, ...)` is the scenario's factory: the server and every client build the same learner
(PFG settings, and the buffer layer of `fedsim.nn.features.buffer_layer` seeded by
`fedsim.frameworks.online.buffer_seed`, which the online baselines build too). The names the settings may take
(BALANCE_RULES, PFG_SPACES; activations and buffer inits in `fedsim.catalog`) are declared, torch-free, in
`fedsim.algorithms.aef_ocl.protocol`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim.analytic import (
    ClassStatistics,
    RecursiveLeastSquares,
    RidgeStatistics,
    pack_upper,
    unpack_upper,
)
from fedsim.algorithms.aef_ocl.protocol import BALANCE_RULES, PFG_SPACES
from fedsim.catalog import ACTIVATIONS, BUFFER_INITS
from fedsim.estimator import BaseLearner
from fedsim.frameworks.online import buffer_seed, masked_predict
from fedsim.nn.features import buffer_layer

if TYPE_CHECKING:
    from fedsim.config import ScenarioConfig
    from fedsim.algorithms.aef_ocl.protocol import AEFOCLParams

__all__ = [
    "BALANCE_RULES",
    "PFG_SPACES",
    "SOLVERS",
    "AEFOCL",
    "PseudoFeatureGenerator",
    "learner_for",
    "reduce_statistics",
]

SOLVERS = ("recursive", "statistics")

# Rows pushed through the least-squares update (or the Gram) at a time: compute-bound, bounded memory.
_CHUNK = 1024


def _numpy(a: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


class PseudoFeatureGenerator(BaseLearner):
    """PFG: per-class running count, mean and unbiased variance, and the balancing draws (see the module docstring).

    `update(x, y)` folds a batch in (Chan et al.'s recursive merge, `ClassStatistics`); `merge(stats)` adds another
    generator's statistics (a federated client's); `deficits()` gives k_c; `draws_for()` the (class, count, weight)
    plan; `sample(transform)` yields weighted pseudo rows. Each call to `sample` uses a fresh stream of the seeded
    generator (seed, call number), so a run is reproducible. Fitted once it holds class statistics (`stats_`).
    """

    _fitted_attribute = "stats_"
    _fit_hint = "call update or merge"

    def __init__(self, noise: float = 1.0, balance: str = "max", draws: int | None = None, seed: int = 0) -> None:
        self.noise = noise
        self.balance = balance
        self.draws = draws
        self.seed = seed

    def _check(self) -> None:
        if self.balance not in BALANCE_RULES:
            raise ValueError(f"balance must be one of {BALANCE_RULES}, got {self.balance!r}")
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.draws is not None and self.draws < 1:
            raise ValueError(f"draws must be >= 1 or None, got {self.draws}")

    def _ensure(self, dim: int) -> None:
        if not self.is_fitted:
            self._check()
            self.stats_ = ClassStatistics.zeros(dim)
            self.n_samples_ = 0  # number of `sample` calls so far (seeds the next one)

    def update(self, x: Any, y: Any, num_classes: int | None = None) -> "PseudoFeatureGenerator":
        x = _numpy(x)
        self._ensure(x.shape[1])
        self.stats_.update(x, _numpy(y, np.int64))
        if num_classes:
            self.stats_.grow_classes(num_classes)
        return self

    def merge(self, stats: ClassStatistics) -> "PseudoFeatureGenerator":
        self._ensure(stats.dim)
        self.stats_ += stats
        return self

    @property
    def counts_(self) -> np.ndarray:
        return self.stats_.count if self.is_fitted else np.zeros(0, np.int64)

    def deficits(self) -> np.ndarray:
        """k_c = target - n_c for every seen class (0 for unseen classes and those at or above the target)."""
        counts = self.counts_
        seen = counts > 0
        if not seen.any():
            return np.zeros_like(counts)
        target = counts.max() if self.balance == "max" else int(np.rint(counts[seen].mean()))
        return np.where(seen, np.maximum(target - counts, 0), 0).astype(np.int64)

    def draws_for(self) -> list[tuple[int, int, float]]:
        """The balancing plan: (class, number drawn m_c, weight k_c / m_c) for every class with a deficit."""
        plan = []
        for c, k in enumerate(self.deficits()):
            if k > 0:
                m = int(k) if self.draws is None else int(min(k, self.draws))
                plan.append((c, m, float(k) / m))
        return plan

    def sample(self, transform, num_classes: int, chunk: int = _CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (H, Y) chunks of weighted pseudo rows: x ~ N(mu_c, (noise s_c)^2), H = sqrt(w) transform(x),
        Y = sqrt(w) e_c. Nothing is kept: each chunk is dropped once the caller has folded it in."""
        plan = self.draws_for()
        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), int(self.n_samples_)]))
        self.n_samples_ += 1
        mean, std = self.stats_.mean, self.stats_.std * self.noise
        for c, m, w in plan:
            scale = np.sqrt(w)
            for start in range(0, m, chunk):
                n = min(chunk, m - start)
                x = mean[c] + std[c] * rng.standard_normal((n, mean.shape[1]))
                h = transform(x)
                y = np.zeros((n, num_classes))
                y[:, c] = 1.0
                if w != 1.0:
                    h *= scale
                    y *= scale
                yield h, y


class AEFOCL(BaseLearner):
    """AEF-OCL as an sklearn-style online estimator over backbone features (see the module docstring).

    Constructor arguments are stored as given. `partial_fit(x, y)` learns one mini-batch of backbone features
    x (b, D) with labels y (b,); `prequential_step(x, y, weights)` first predicts the batch with `weights` (default:
    the current real-data weights), then learns it, and returns the predictions. `coef_` is W on the real data
    (joint ridge on everything seen), `balanced_coef()` W after the PFG top-up (computed on a copy, cached until
    the next batch). Federated: `statistics()` exports C, Q, n and the PFG statistics as plain arrays, `merge`
    folds such arrays in ("statistics" solver only).

    `defer_rows` (recursive solver) lets up to that many rows wait and folds them into (R, W) in one exact RLS
    update the next time the weights are read (or the limit is reached): the same weights whenever they are
    observed, at a fraction of the per-row cost of small batches. Useful when predictions use other weights than the
    real-data `coef_` (AEF-OCL with PFG predicts with the balanced weights); 0 updates at every batch.

    Learned attributes: `buffer_` (frozen BufferLayer), `pfg_` (PseudoFeatureGenerator, kept with pfg=False too:
    its class counts mark the seen classes), `rls_` (solver "recursive") or `stats_` (solver "statistics"),
    `n_features_in_`, `n_seen_`.
    """

    _fitted_attribute = "buffer_"
    _fit_hint = "call partial_fit or merge"
    _repr_params = ("gamma", "buffer_width", "buffer_init", "pfg", "balance", "draws", "solver")

    def __init__(self, gamma: float = 1e-3, buffer_width: int = 2048, activation: str = "relu", pfg: bool = True,
                 noise: float = 1.0, balance: str = "max", draws: int | None = None, pfg_space: str = "backbone",
                 solver: str = "recursive", num_classes: int | None = None, seed: int = 0,
                 defer_rows: int = 0, buffer_init: str = "normal") -> None:
        self.gamma = gamma
        self.buffer_width = buffer_width
        self.activation = activation
        self.pfg = pfg
        self.noise = noise
        self.balance = balance
        self.draws = draws
        self.pfg_space = pfg_space
        self.solver = solver
        self.num_classes = num_classes
        self.seed = seed
        self.defer_rows = defer_rows
        self.buffer_init = buffer_init

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _check(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.buffer_width < 1:
            raise ValueError(f"buffer_width must be >= 1, got {self.buffer_width}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if self.pfg_space not in PFG_SPACES:
            raise ValueError(f"pfg_space must be one of {PFG_SPACES}, got {self.pfg_space!r}")
        if self.buffer_init not in BUFFER_INITS:
            raise ValueError(f"buffer_init must be one of {BUFFER_INITS}, got {self.buffer_init!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")

    def _ensure(self, in_dim: int) -> None:
        if self.is_fitted:
            if in_dim != self.n_features_in_:
                raise ValueError(f"x has {in_dim} features, the learner was built for {self.n_features_in_}")
            return
        self._check()
        self.n_features_in_ = int(in_dim)
        self.buffer_ = buffer_layer(int(in_dim), int(self.buffer_width), int(self.seed), self.activation,
                                    self.buffer_init)
        self.pfg_ = PseudoFeatureGenerator(self.noise, self.balance, self.draws, seed=int(self.seed) + 1)
        self.pfg_._ensure(in_dim if self.pfg_space == "backbone" else int(self.buffer_width))
        if self.num_classes:
            self.pfg_.stats_.grow_classes(int(self.num_classes))
        width = int(self.num_classes or 0)
        if self.solver == "recursive":
            self.rls_ = RecursiveLeastSquares(self.gamma)  # its state starts with the first batch
        else:
            self.stats_ = RidgeStatistics.zeros(int(self.buffer_width), width)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_seen_ = 0
        self._cache: dict[str, np.ndarray] = {}

    # ---- features --------------------------------------------------------------------------------------------
    def transform(self, x: Any) -> np.ndarray:
        """Buffer features H = act(x B) (n, buffer_width), float64 numpy, of backbone features x (n, D)."""
        x = torch.as_tensor(_numpy(x))
        if not self.is_fitted:
            self._ensure(x.shape[1])
        if x.shape[0] == 0:
            return np.zeros((0, int(self.buffer_width)))
        with torch.inference_mode():
            return self.buffer_(x).numpy()

    # ---- learning --------------------------------------------------------------------------------------------
    def partial_fit(self, x: Any, y: Any) -> "AEFOCL":
        """Learn one mini-batch: backbone features x (b, D), class indices y (b,). Returns self."""
        x = _numpy(x)
        self._ensure(x.shape[1])
        self._absorb(x, self.transform(x), _numpy(y, np.int64).reshape(-1))
        return self

    def prequential_step(self, x: Any, y: Any, weights: np.ndarray | None = None) -> np.ndarray:
        """Predict the batch with `weights` (default: `coef_` on the data so far), then learn it; the predictions.

        The buffer features are computed once for both. Before any data (and with weights=None) every prediction
        is class 0."""
        x = _numpy(x)
        y = _numpy(y, np.int64).reshape(-1)
        self._ensure(x.shape[1])
        h = self.transform(x)
        w = self.coef_ if weights is None else np.asarray(weights, np.float64)
        pred = masked_predict(h, w) if w.shape[1] else np.zeros(len(y), np.int64)
        self._absorb(x, h, y)
        return pred

    def _absorb(self, x: np.ndarray, h: np.ndarray, y: np.ndarray) -> None:
        if y.size == 0:
            return
        width = max(int(self.num_classes or 0), int(y.max()) + 1)
        self.pfg_.update(x if self.pfg_space == "backbone" else h, y, width)
        if self.solver == "recursive" and self.defer_rows <= 1:
            self.rls_.partial_fit(h, y, width)
        else:
            self._pending.append((h, y))
            limit = _CHUNK if self.solver == "statistics" else self.defer_rows
            if sum(len(p[1]) for p in self._pending) >= limit:
                self._flush()
        self.n_seen_ += int(y.size)
        self._cache.clear()

    def _flush(self) -> None:
        """Fold the pending rows into the state at once: one rank-k update of C and Q (statistics solver, up to
        ~1024 rows), or one RLS update of k rows (recursive solver with `defer_rows`; exact, as RLS is for any
        batching, and far cheaper per row than k/b updates of b rows)."""
        if not self._pending:
            return
        h = np.concatenate([p[0] for p in self._pending])
        y = np.concatenate([p[1] for p in self._pending])
        self._pending = []
        width = max(int(self.num_classes or 0), int(y.max()) + 1)
        if self.solver == "statistics":
            self.stats_.update(h, y, max(self.stats_.num_classes, width))
        else:
            self.rls_.partial_fit(h, y, max(self.rls_.W_.shape[1] if self.rls_.is_fitted else 0, width))

    # ---- federated -------------------------------------------------------------------------------------------
    def statistics(self) -> dict[str, np.ndarray]:
        """C (packed upper triangle), Q, n and the PFG class statistics as plain arrays ("statistics" solver)."""
        self._check_fitted()
        if self.solver != "statistics":
            raise RuntimeError("statistics() needs solver='statistics' (the recursive solver keeps R, not C)")
        self._flush()
        cls = self.pfg_.stats_
        return {"gram": pack_upper(self.stats_.gram), "cross": self.stats_.cross,
                "count": np.array([self.stats_.count], np.int64),
                "pfg_count": cls.count, "pfg_mean": cls.mean, "pfg_m2": cls.m2}

    def merge(self, arrays: dict[str, Any], in_dim: int) -> "AEFOCL":
        """Fold in another learner's `statistics()` (a client's increment, or a group's sum). Returns self.

        `in_dim` is the backbone dimension D (the arrays carry only buffer-space matrices)."""
        self._ensure(int(in_dim))
        if self.solver != "statistics":
            raise RuntimeError("merge() needs solver='statistics'")
        self._flush()
        inc = _decode(arrays, int(self.buffer_width))
        self.stats_ += inc["stats"]
        self.pfg_.merge(inc["pfg"])
        self.n_seen_ += inc["stats"].count
        self._cache.clear()
        return self

    # ---- weights ---------------------------------------------------------------------------------------------
    @property
    def num_classes_(self) -> int:
        self._check_fitted()
        if self.solver == "recursive":
            return self.rls_.W_.shape[1] if self.rls_.is_fitted else int(self.num_classes or 0)
        return self.stats_.num_classes

    @property
    def class_counts_(self) -> np.ndarray:
        self._check_fitted()
        return self.pfg_.counts_

    @property
    def coef_(self) -> np.ndarray:
        """W (d x c) on the real data seen so far: joint ridge regression with `gamma` (no pseudo-features)."""
        self._check_fitted()
        if self.solver == "recursive":
            self._flush()
            if not self.rls_.is_fitted:
                return np.zeros((int(self.buffer_width), self.num_classes_))
            return self.rls_.W_
        if "real" not in self._cache:
            self._flush()
            self._cache["real"] = self.stats_.solve(self.gamma)
        return self._cache["real"]

    def balanced_coef(self) -> np.ndarray:
        """W after the PFG top-up (real data + pseudo-features, on a copy); `coef_` when nothing is missing.

        Cached until new data arrives; every new computation draws fresh pseudo-features."""
        self._check_fitted()
        if "balanced" in self._cache:
            return self._cache["balanced"]
        self._flush()
        c = self.num_classes_
        if not self.pfg_.draws_for():
            w = self.coef_.copy()
        elif self.solver == "statistics":
            self._flush()
            total = self.stats_.copy()
            for h, y in self.pfg_.sample(self._pseudo_transform, c):
                total.update(h, y, c)
            w = total.solve(self.gamma)
        else:
            w = self._balanced_recursive(c)
        self._cache["balanced"] = w
        return w

    def _pseudo_transform(self, x: np.ndarray) -> np.ndarray:
        return self.transform(x) if self.pfg_space == "backbone" else np.array(x, dtype=np.float64)

    def _balanced_recursive(self, c: int) -> np.ndarray:
        m = sum(n for _, n, _ in self.pfg_.draws_for())
        if m <= self.buffer_width:  # few rows: Woodbury updates of a copy of (R, W), as the official code
            rls = self.rls_.copy()
            for h, y in self.pfg_.sample(self._pseudo_transform, c):
                rls.partial_fit(h, y, c)
            return rls.W_
        # many rows: their Gram G and cross P, then W_bal = (I + R G)^-1 (W + R P)  (O(m d^2 + d^3))
        pseudo = RidgeStatistics.zeros(self.buffer_width, c)
        for h, y in self.pfg_.sample(self._pseudo_transform, c):
            pseudo.update(h, y, c)
        r = self.rls_.R_
        w = self.rls_.W_
        if w.shape[1] < c:
            w = np.pad(w, ((0, 0), (0, c - w.shape[1])))
        lhs = r @ pseudo.gram
        lhs[np.diag_indices_from(lhs)] += 1.0
        return np.linalg.solve(lhs, w + r @ pseudo.cross)

    def weights(self, balanced: bool | None = None) -> np.ndarray:
        """The weights used for prediction: balanced (PFG) when `balanced` (default: `pfg`), else `coef_`."""
        use = self.pfg if balanced is None else balanced
        return self.balanced_coef() if use else self.coef_

    # ---- inference -------------------------------------------------------------------------------------------
    def decision_function(self, x: Any, balanced: bool | None = None) -> np.ndarray:
        return self.transform(x) @ self.weights(balanced)

    def predict(self, x: Any, balanced: bool | None = None) -> np.ndarray:
        return masked_predict(self.transform(x), self.weights(balanced))


# ------------------------------------------------------------------------------------------------ wire format
def _decode(arrays: dict[str, Any], width: int) -> dict[str, Any]:
    count = int(np.asarray(arrays["count"]).reshape(-1)[0])
    stats = RidgeStatistics(unpack_upper(arrays["gram"], width), np.asarray(arrays["cross"], np.float64), count)
    pfg = ClassStatistics(arrays["pfg_count"], arrays["pfg_mean"], arrays["pfg_m2"])
    return {"stats": stats, "pfg": pfg}


def reduce_statistics(replies: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Sum several learners' `statistics()` arrays into one (a node serving a group of clients): exact, since C, Q,
    n add and the class statistics merge (Chan et al.), so the server sees the union of the group's streams."""
    packed = np.sum([np.asarray(r["gram"], np.float64) for r in replies], axis=0)
    width = max(np.asarray(r["cross"]).shape[1] for r in replies)
    cross = np.zeros((np.asarray(replies[0]["cross"]).shape[0], width))
    for r in replies:
        c = np.asarray(r["cross"], np.float64)
        cross[:, : c.shape[1]] += c
    pfg = sum(ClassStatistics(r["pfg_count"], r["pfg_mean"], r["pfg_m2"]) for r in replies)
    count = sum(int(np.asarray(r["count"]).reshape(-1)[0]) for r in replies)
    return {"gram": packed, "cross": cross, "count": np.array([count], np.int64),
            "pfg_count": pfg.count, "pfg_mean": pfg.mean, "pfg_m2": pfg.m2}


# ------------------------------------------------------------------------------------------- scenario factories
def learner_for(params: AEFOCLParams, config: ScenarioConfig, num_classes: int, solver: str) -> AEFOCL:
    """The scenario's AEF-OCL learner: the same buffer layer (seed) and PFG settings on the server and clients."""
    return AEFOCL(gamma=params.gamma, buffer_width=params.buffer_width, activation=params.activation,
                  pfg=params.pfg, noise=params.noise, balance=params.balance, draws=params.draws,
                  pfg_space=params.pfg_space, solver=solver, num_classes=num_classes,
                  seed=buffer_seed(config), defer_rows=params.defer_rows if solver == "recursive" else 0,
                  buffer_init=params.buffer_init)
