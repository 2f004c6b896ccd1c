"""fedsim.analytic against references computed independently with numpy only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.analytic import (
    AnalyticAggregator,
    ClassStatistics,
    RecursiveLeastSquares,
    RidgeStatistics,
    absolute_aggregation,
    aggregate_uploads,
    one_hot,
    regularized_upload,
    ridge_solve,
)
from fedsim.errors import ConfigError


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def np_ridge(x: np.ndarray, y_onehot: np.ndarray, gamma: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ y_onehot)


def np_onehot(y: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c)[y]


def make_data(n: int = 240, d: int = 24, c: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    centers = rng.normal(size=(c, d))
    x = centers[y] + rng.normal(size=(n, d))
    return x, y


def test_one_hot():
    out = one_hot(np.array([2, 0, 1]), 4)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np_onehot(np.array([2, 0, 1]), 4))
    with pytest.raises(ValueError):
        one_hot([4], 4)


# ---------------------------------------------------------------- recursive least squares
@pytest.mark.parametrize("batch_size", [1, 7, 64, 240])
@pytest.mark.parametrize("gamma", [1e-3, 1.0])
def test_rls_equals_ridge_on_everything_seen(batch_size, gamma):
    x, y = make_data()
    # class-incremental order: classes 0-2 first, classes 3-5 appear mid-stream
    order = np.concatenate([np.flatnonzero(y < 3), np.flatnonzero(y >= 3)])
    x, y = x[order], y[order]
    rls = RecursiveLeastSquares(gamma=gamma)
    for start in range(0, len(y), batch_size):
        rls.partial_fit(x[start:start + batch_size], y[start:start + batch_size])
        seen = slice(0, start + batch_size)
        c = int(y[seen].max()) + 1
        assert rls.W_.shape == (x.shape[1], c)
    ref = np_ridge(x, np_onehot(y, 6), gamma)
    assert rel_err(rls.W_, ref) < 1e-8
    # R_ is the inverse of the regularized Gram, exactly symmetric
    r_ref = np.linalg.inv(x.T @ x + gamma * np.eye(x.shape[1]))
    assert rel_err(rls.R_, r_ref) < 1e-8
    np.testing.assert_array_equal(rls.R_, rls.R_.T)


def test_rls_intermediate_states_and_onehot_inputs():
    x, y = make_data(n=90, seed=3)
    rls = RecursiveLeastSquares(gamma=0.1)
    for start in range(0, 90, 30):
        # one-hot targets and torch inputs are accepted; num_classes widens before the class is seen
        xb = torch.from_numpy(x[start:start + 30])
        rls.partial_fit(xb, np_onehot(y[start:start + 30], 6), num_classes=8)
        ref = np_ridge(x[: start + 30], np_onehot(y[: start + 30], 8), 0.1)
        assert rel_err(rls.W_, ref) < 1e-8
    assert rls.predict(x).shape == (90,)
    np.testing.assert_allclose(rls.decision_function(x), x @ rls.W_)


def test_rls_large_batch_is_split_exactly():
    x, y = make_data(n=2500, d=8, c=3, seed=5)
    rls = RecursiveLeastSquares(gamma=1e-2).partial_fit(x, y)
    assert rel_err(rls.W_, np_ridge(x, np_onehot(y, 3), 1e-2)) < 1e-8
    assert rls.n_seen_ == 2500


def test_rls_snapshot_restore_and_copy():
    x, y = make_data(seed=7)
    rls = RecursiveLeastSquares(gamma=1e-2).partial_fit(x[:100], y[:100])
    state = rls.get_state()
    before = rls.W_.copy()
    topped = rls.copy().partial_fit(x[100:150], y[100:150])  # e.g. AEF-OCL's pseudo-feature top-up
    assert not np.allclose(topped.W_, before)
    np.testing.assert_array_equal(rls.W_, before)              # the original is untouched
    rls.partial_fit(x[100:], y[100:])
    rls.set_state(state)
    np.testing.assert_array_equal(rls.W_, before)
    rls.partial_fit(x[100:], y[100:])
    assert rel_err(rls.W_, np_ridge(x, np_onehot(y, 6), 1e-2)) < 1e-8


def test_rls_float32_dtype_runs():
    x, y = make_data(n=60, seed=1)
    rls = RecursiveLeastSquares(gamma=1.0, dtype=np.float32).partial_fit(x, y)
    assert rls.W_.dtype == np.float32
    assert rel_err(rls.W_.astype(np.float64), np_ridge(x, np_onehot(y, 6), 1.0)) < 1e-3


# ---------------------------------------------------------------- ridge statistics
def test_ridge_statistics_merge_is_associative_and_centralized():
    x, y = make_data(n=300, seed=2)
    parts = [slice(0, 50), slice(50, 51), slice(51, 300)]
    stats = [RidgeStatistics.zeros(x.shape[1], 6).update(x[p], y[p]) for p in parts]
    left = (stats[0] + stats[1]) + stats[2]
    right = stats[0] + (stats[1] + stats[2])
    central = RidgeStatistics.from_data(x, y, 6)
    assert left.count == right.count == central.count == 300
    for merged in (left, right, sum(stats)):
        assert rel_err(merged.gram, x.T @ x) < 1e-13
        assert rel_err(merged.cross, x.T @ np_onehot(y, 6)) < 1e-13
        assert rel_err(merged.solve(0.5), np_ridge(x, np_onehot(y, 6), 0.5)) < 1e-10
    np.testing.assert_array_equal(central.gram, central.gram.T)


@pytest.mark.parametrize("dim", [1, 7, 300, 600])  # 300, 600: more than one 256-row block when mirrored
def test_ridge_statistics_gram_is_exactly_symmetric_between_and_after_updates(dim):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((90, dim))
    y = rng.integers(0, 4, 90)
    stats = RidgeStatistics.zeros(dim, 4)
    for part in (slice(0, 1), slice(1, 40), slice(40, 90)):
        stats.update(x[part], y[part])
        seen = x[: part.stop]
        np.testing.assert_array_equal(stats.gram, stats.gram.T)
        assert rel_err(stats.gram, seen.T @ seen) < 1e-13
    # float32 and strided (non-contiguous) input: converted, same statistics
    other = RidgeStatistics.zeros(dim, 4).update(np.asfortranarray(x), y)
    assert rel_err(other.gram, x.T @ x) < 1e-13
    stats.update(x.astype(np.float32)[::2], y[::2])
    np.testing.assert_array_equal(stats.gram, stats.gram.T)


def test_ridge_statistics_grow_classes_empty_and_roundtrip():
    x, y = make_data(n=120, seed=4)
    few = RidgeStatistics.zeros(x.shape[1], 2).update(x[y < 2], y[y < 2])
    many = RidgeStatistics.zeros(x.shape[1], 2).update(x[y >= 2], y[y >= 2])  # widens itself to 6 classes
    assert many.num_classes == 6
    merged = few + many
    assert merged.num_classes == 6
    order = np.concatenate([np.flatnonzero(y < 2), np.flatnonzero(y >= 2)])
    assert rel_err(merged.solve(1.0), np_ridge(x[order], np_onehot(y[order], 6), 1.0)) < 1e-10
    empty = RidgeStatistics.zeros(x.shape[1], 6)
    assert empty.count == 0
    np.testing.assert_array_equal(empty.solve(1.0), np.zeros((x.shape[1], 6)))
    assert np.all(np.isfinite(empty.solve(0.0)))
    back = RidgeStatistics.from_arrays(merged.to_arrays())
    np.testing.assert_array_equal(back.gram, merged.gram)
    assert back.count == merged.count
    with pytest.raises(ValueError):
        empty.update(x[:, :3], y)


# ---------------------------------------------------------------- AFL aggregation
def _clients(n_clients: int, n: int, seed: int) -> list[np.ndarray]:
    """Uneven (Dirichlet-like) index sets, some empty."""
    rng = np.random.default_rng(seed)
    owner = rng.choice(n_clients, size=n, p=rng.dirichlet(np.full(n_clients, 0.3)))
    return [np.flatnonzero(owner == k) for k in range(n_clients)]


@pytest.mark.parametrize("target", ["ridge", "least-squares"])
def test_afl_upload_forms_agree_and_are_weight_invariant(target):
    x, y = make_data(n=400, d=20, c=5, seed=11)
    yy = np_onehot(y, 5)
    gamma = 1.0
    results = []
    for n_clients, seed in [(7, 0), (30, 1), (1, 2)]:
        parts = _clients(n_clients, len(y), seed)
        stats = [RidgeStatistics.zeros(20, 5).update(x[p], y[p], num_classes=5) for p in parts]
        by_stats = AnalyticAggregator(gamma)
        for s in stats:
            by_stats.add_statistics(s)
        uploads = [regularized_upload(s, gamma) for s in stats]
        by_upload = aggregate_uploads(uploads, gamma, target=target)
        w_stats = by_stats.solve(target)
        assert rel_err(by_upload, w_stats) < 1e-10
        # folding half the clients into one accumulator and merging is the same
        half = len(stats) // 2
        a, b = AnalyticAggregator(gamma), AnalyticAggregator(gamma)
        for s in stats[:half]:
            a.add_statistics(s)
        for w, c in uploads[half:]:
            b.add_upload(w, c)
        merged = a + b
        assert merged.num_uploads_ == n_clients
        assert rel_err(merged.solve(target), w_stats) < 1e-10
        results.append(w_stats)
    if target == "ridge":
        ref = np_ridge(x, yy, gamma)
    else:
        ref = np.linalg.lstsq(x, yy, rcond=None)[0]
    for w in results:
        assert rel_err(w, ref) < 1e-10
    assert rel_err(absolute_aggregation(uploads, gamma, target), ref) < 1e-10


def test_afl_empty_client_upload_and_bad_target():
    w, c = regularized_upload(RidgeStatistics.zeros(4, 3), 2.0)
    np.testing.assert_array_equal(w, np.zeros((4, 3)))
    np.testing.assert_array_equal(c, 2.0 * np.eye(4))
    with pytest.raises(ConfigError, match="strategy.target"):
        AnalyticAggregator(1.0).add_upload(w, c).solve("lasso")


# ---------------------------------------------------------------- ill-conditioned solves
@pytest.mark.parametrize("gamma", [0.0, 1e-14])
def test_ridge_solve_underdetermined_gives_minimum_norm(gamma):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 60))  # d > n: X^T X is singular
    yy = np_onehot(rng.integers(0, 4, 20), 4)
    w = ridge_solve(x.T @ x, x.T @ yy, gamma)
    assert np.all(np.isfinite(w))
    ref = np.linalg.pinv(x) @ yy  # minimum-norm interpolant, the gamma -> 0 limit of ridge
    assert rel_err(w, ref) < 1e-6
    np.testing.assert_allclose(x @ w, yy, atol=1e-6)


def test_ridge_solve_exactly_singular_least_squares_target():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 5))
    x = np.hstack([base, base[:, :2]])  # duplicated columns: rank 5 of 7
    yy = np_onehot(rng.integers(0, 3, 50), 3)
    w = aggregate_uploads([regularized_upload(RidgeStatistics.from_data(x, yy, 3), 1.0)], 1.0, "least-squares")
    assert np.all(np.isfinite(w))
    assert rel_err(w, np.linalg.pinv(x) @ yy) < 1e-8


# ---------------------------------------------------------------- class statistics
def test_class_statistics_match_numpy():
    rng = np.random.default_rng(3)
    n, d = 500, 6
    y = rng.integers(0, 5, n)
    y[y == 4] = 3
    y[0] = 4  # class 4 has a single sample -> variance 0
    x = 1e4 + rng.normal(size=(n, d)) * (1 + y[:, None])  # large offset: naive sumsq would cancel badly
    stats_batches = ClassStatistics.zeros(d, track_gram=True)
    for start in range(0, n, 37):
        stats_batches.update(x[start:start + 37], y[start:start + 37])
    pieces = [ClassStatistics.zeros(d, track_gram=True).update(x[s], y[s])
              for s in (slice(0, 3), slice(3, 200), slice(200, n))]
    merged = (pieces[0] + pieces[1]) + pieces[2]
    for stats in (stats_batches, merged):
        assert stats.num_classes == 5
        for c in range(5):
            xc = x[y == c]
            assert stats.count[c] == len(xc)
            if len(xc) == 0:
                np.testing.assert_array_equal(stats.var[c], 0.0)
                continue
            np.testing.assert_allclose(stats.mean[c], xc.mean(axis=0), rtol=1e-12)
            np.testing.assert_allclose(stats.sum[c], xc.sum(axis=0), rtol=1e-12)
            expected_var = np.var(xc, axis=0, ddof=1) if len(xc) > 1 else np.zeros(d)
            np.testing.assert_allclose(stats.var[c], expected_var, rtol=1e-8, atol=0)
            np.testing.assert_allclose(stats.sumsq[c], (xc**2).sum(axis=0), rtol=1e-12)
            np.testing.assert_allclose(stats.gram_of(c), xc.T @ xc, rtol=1e-12)
    back = ClassStatistics.from_arrays(merged.to_arrays())
    np.testing.assert_array_equal(back.var, merged.var)


def test_class_statistics_from_sums_and_no_gram():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 3))
    y = np.arange(40) % 2
    s = ClassStatistics.zeros(3).update(x, y)
    again = ClassStatistics.from_sums(s.count, s.sum, s.sumsq)
    np.testing.assert_allclose(again.var, s.var, rtol=1e-10)
    with pytest.raises(ValueError):
        s.gram_of(0)
