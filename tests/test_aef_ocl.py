"""AEF-OCL's learner (fedsim.algorithms.aef_ocl.learner): exactness of the recursive and statistics solvers against an
independent numpy ridge regression, PFG's running statistics against numpy, the balancing plan, and the
federated fold (clients' increments merged = the centralized learner on the union of their streams)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.algorithms.aef_ocl.learner import AEFOCL, PseudoFeatureGenerator, reduce_statistics
from fedsim.frameworks.online import masked_predict


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def buffer_numpy(learner: AEFOCL, x: np.ndarray) -> np.ndarray:
    """The buffer features recomputed here with numpy: relu(x B) with the learner's frozen B."""
    weight = learner.buffer_.weight.double().numpy()
    return np.maximum(x @ weight, 0.0)


def ridge_numpy(h: np.ndarray, y: np.ndarray, num_classes: int, gamma: float) -> np.ndarray:
    targets = np.eye(num_classes)[y]
    return np.linalg.solve(h.T @ h + gamma * np.eye(h.shape[1]), h.T @ targets)


def imbalanced_stream(n: int = 700, dim: int = 40, num_classes: int = 6, seed: int = 0):
    """Gaussian classes with long-tailed frequencies; class 5 never appears before the last batch."""
    rng = np.random.default_rng(seed)
    probs = np.array([0.45, 0.25, 0.14, 0.09, 0.07, 0.0])
    y = rng.choice(num_classes, size=n, p=probs)
    centers = rng.normal(0.0, 1.0, (num_classes, dim))
    x = centers[y] + rng.normal(0.0, 0.7, (n, dim))
    return x, y


BATCHES = [1, 1, 10, 3, 1, 50, 7, 1, 100, 10, 10, 1, 200]  # includes batch size 1 and uneven sizes


@pytest.mark.parametrize("solver", ["recursive", "statistics"])
@pytest.mark.parametrize("gamma", [1e-3, 1.0])
def test_without_pfg_weights_equal_joint_ridge_after_every_batch(solver, gamma):
    x, y = imbalanced_stream()
    x_new = np.random.default_rng(9).normal(2.0, 0.5, (4, x.shape[1]))  # a last batch of a brand-new class
    y_new = np.full(4, 5)
    learner = AEFOCL(gamma=gamma, buffer_width=96, pfg=False, solver=solver, seed=3)
    seen_x, seen_y, start = [], [], 0
    for size in BATCHES + [None]:
        if size is None:
            bx, by = x_new, y_new
        else:
            bx, by = x[start:start + size], y[start:start + size]
            start += size
        learner.partial_fit(bx, by)
        seen_x.append(bx)
        seen_y.append(by)
        xs, ys = np.concatenate(seen_x), np.concatenate(seen_y)
        c = int(ys.max()) + 1
        ref = ridge_numpy(buffer_numpy(learner, xs), ys, c, gamma)
        assert learner.coef_.shape == (96, c)
        assert rel_err(learner.coef_, ref) < 1e-8
    assert learner.n_seen_ == start + 4
    assert np.array_equal(learner.class_counts_, np.bincount(np.concatenate(seen_y), minlength=6))
    # nothing grows with the stream: the state is R (d x d) and W (d x c), or C, Q
    if solver == "recursive":
        assert learner.rls_.R_.shape == (96, 96)


def test_recursive_memory_does_not_grow_with_the_stream():
    x, y = imbalanced_stream(n=400)
    learner = AEFOCL(buffer_width=64, pfg=True, seed=0).partial_fit(x[:100], y[:100])
    sizes = {k: v.nbytes for k, v in vars(learner.rls_).items() if isinstance(v, np.ndarray)}
    learner.partial_fit(x[100:], y[100:])
    assert {k: v.nbytes for k, v in vars(learner.rls_).items() if isinstance(v, np.ndarray)} == sizes


@pytest.mark.parametrize("space", ["backbone", "buffer"])
def test_pfg_running_mean_and_variance_equal_numpy(space):
    x, y = imbalanced_stream(n=500)
    learner = AEFOCL(buffer_width=32, pfg=True, pfg_space=space, seed=1)
    start = 0
    for size in [1, 2, 1, 30, 1, 100, 5, 200, 160]:
        learner.partial_fit(x[start:start + size], y[start:start + size])
        start += size
    feats = x if space == "backbone" else buffer_numpy(learner, x)
    stats = learner.pfg_.stats_
    for c in range(5):
        rows = feats[y == c]
        assert stats.count[c] == len(rows)
        np.testing.assert_allclose(stats.mean[c], rows.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.var[c], rows.var(axis=0, ddof=1), rtol=1e-9, atol=1e-12)


def test_pfg_plan_balances_to_the_largest_or_the_mean_count_and_weights_capped_draws():
    pfg = PseudoFeatureGenerator(balance="max").update(np.zeros((10, 2)), np.array([0] * 6 + [1] * 3 + [3]))
    assert pfg.deficits().tolist() == [0, 3, 0, 5]  # class 2 unseen: never topped up
    assert pfg.draws_for() == [(1, 3, 1.0), (3, 5, 1.0)]
    capped = PseudoFeatureGenerator(balance="max", draws=2).merge(pfg.stats_)
    assert capped.draws_for() == [(1, 2, 1.5), (3, 2, 2.5)]  # m_c * weight = deficit k_c
    mean = PseudoFeatureGenerator(balance="mean").merge(pfg.stats_)
    assert mean.deficits().tolist() == [0, 0, 0, 2]  # round(10 / 3) = 3
    for gen in (pfg, capped):  # rows carry sqrt(weight): sum of squared row weights per class = deficit
        gen.stats_.m2[:] = 1.0
        totals = np.zeros(4)
        for h, yy in gen.sample(lambda a: np.ones((len(a), 1)), num_classes=4, chunk=2):
            np.testing.assert_allclose(h[:, 0], yy.sum(axis=1))  # feature row and target share the factor
            totals += (yy ** 2).sum(axis=0)
        np.testing.assert_allclose(totals, gen.deficits())


def test_pseudo_features_follow_the_class_statistics_and_are_seeded():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(3.0, 2.0, (4000, 3)), rng.normal(-1.0, 0.5, (10, 3))])
    y = np.array([0] * 4000 + [1] * 10)
    pfg = PseudoFeatureGenerator(noise=1.0, seed=5).update(x, y)
    draws = np.concatenate([h for h, _ in pfg.sample(lambda a: a, num_classes=2)])
    assert draws.shape == (3990, 3)
    np.testing.assert_allclose(draws.mean(axis=0), x[4000:].mean(axis=0), atol=0.05)
    np.testing.assert_allclose(draws.std(axis=0), x[4000:].std(axis=0, ddof=1), rtol=0.05)
    again = PseudoFeatureGenerator(noise=1.0, seed=5).update(x, y)
    assert np.array_equal(np.concatenate([h for h, _ in again.sample(lambda a: a, num_classes=2)]), draws)
    second = np.concatenate([h for h, _ in pfg.sample(lambda a: a, num_classes=2)])
    assert not np.array_equal(second, draws)  # each balancing point draws fresh pseudo-features


def _fitted(solver: str, draws, width: int = 64, n: int = 400):
    x, y = imbalanced_stream(n=n)
    learner = AEFOCL(gamma=1e-2, buffer_width=width, pfg=True, draws=draws, solver=solver, num_classes=6, seed=2)
    for start in range(0, n, 25):
        learner.partial_fit(x[start:start + 25], y[start:start + 25])
    return learner, x, y


@pytest.mark.parametrize("draws", [None, 8])  # None: ~500 pseudo rows > width (Gram route); 8: Woodbury route
def test_balanced_weights_are_the_same_in_every_route_and_leave_the_real_state_alone(draws):
    rec, x, y = _fitted("recursive", draws)
    stat, _, _ = _fitted("statistics", draws)
    real = rec.coef_.copy()
    balanced = rec.balanced_coef()
    assert rel_err(balanced, stat.balanced_coef()) < 1e-8  # same seeded draws, three different solves
    assert rel_err(balanced, real) > 1e-2  # pseudo-features changed the classifier
    assert np.array_equal(rec.coef_, real) and rec.balanced_coef() is balanced  # cached, real state untouched
    rec.partial_fit(x[:5], y[:5])  # learning resumes from the real-data state, not the topped-up one
    h = buffer_numpy(rec, np.concatenate([x, x[:5]]))
    assert rel_err(rec.coef_, ridge_numpy(h, np.concatenate([y, y[:5]]), 6, 1e-2)) < 1e-8


def test_balanced_weights_equal_ridge_on_real_plus_the_drawn_pseudo_features():
    learner, x, y = _fitted("recursive", None)
    probe = PseudoFeatureGenerator(seed=learner.pfg_.seed).merge(learner.pfg_.stats_)
    pseudo = [(h, t) for h, t in probe.sample(learner.transform, num_classes=6)]  # the same draws, replayed
    h = np.concatenate([buffer_numpy(learner, x)] + [p[0] for p in pseudo])
    targets = np.concatenate([np.eye(6)[y]] + [p[1] for p in pseudo])
    ref = np.linalg.solve(h.T @ h + 1e-2 * np.eye(64), h.T @ targets)
    assert rel_err(learner.balanced_coef(), ref) < 1e-7
    counts = learner.class_counts_ + np.concatenate([p[1] for p in pseudo]).sum(axis=0).astype(int)
    assert set(counts[:5]) == {learner.class_counts_.max()}  # every seen class topped up to the largest


def test_masked_predict_ignores_classes_never_seen():
    w = np.array([[1.0, 0.0, -1.0], [0.5, 0.0, 0.2]])
    h = np.array([[-1.0, -1.0], [1.0, 0.0]])
    assert masked_predict(h, w).tolist() == [2, 0]  # class 1 (zero column) would win the first row unmasked


@pytest.mark.parametrize("pfg", [False, True])
def test_federated_fold_equals_the_centralized_learner_on_the_union_at_every_sync(pfg):
    x, y = imbalanced_stream(n=900, seed=4)
    rng = np.random.default_rng(1)
    owner = rng.choice(3, size=len(y), p=[0.6, 0.3, 0.1])  # three clients' streams of different lengths
    streams = [np.flatnonzero(owner == k) for k in range(3)]
    batch, segment = 10, 7
    kwargs = dict(gamma=1e-3, buffer_width=80, pfg=pfg, num_classes=6, seed=11)
    server = AEFOCL(solver="statistics", **kwargs)
    central = AEFOCL(solver="recursive", **kwargs)
    longest = max(len(s) for s in streams)
    for start in range(0, longest, batch * segment):
        increments = []
        for s in streams:
            client = AEFOCL(solver="statistics", **kwargs)
            client.partial_fit(np.zeros((0, x.shape[1])), np.zeros(0, int))
            for b in range(start, min(start + batch * segment, len(s)), batch):
                idx = s[b:b + batch]
                client.partial_fit(x[idx], y[idx])
                central.partial_fit(x[idx], y[idx])
            increments.append(client.statistics())
        server.merge(increments[0], in_dim=x.shape[1])
        server.merge(reduce_statistics(increments[1:]), in_dim=x.shape[1])  # a node serving two clients
        assert rel_err(server.coef_, central.coef_) < 1e-8
        assert np.array_equal(server.class_counts_, central.class_counts_)
        np.testing.assert_allclose(server.pfg_.stats_.mean, central.pfg_.stats_.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(server.pfg_.stats_.var, central.pfg_.stats_.var, rtol=1e-9, atol=1e-12)
    assert server.n_seen_ == central.n_seen_ == len(y)


def test_learner_rejects_bad_arguments():
    x, y = imbalanced_stream(n=20)
    for kwargs, match in ((dict(gamma=0.0), "gamma"), (dict(solver="exact"), "solver"),
                          (dict(pfg_space="pixels"), "pfg_space"), (dict(activation="swish"), "activation")):
        with pytest.raises(ValueError, match=match):
            AEFOCL(buffer_width=8, **kwargs).partial_fit(x, y)
    with pytest.raises(ValueError, match="balance"):
        PseudoFeatureGenerator(balance="median").update(x, y)
    learner = AEFOCL(buffer_width=8).partial_fit(x, y)
    with pytest.raises(ValueError, match="features"):
        learner.partial_fit(x[:, :5], y)
    with pytest.raises(RuntimeError, match="statistics"):
        learner.statistics()


def test_deferred_rows_give_the_same_weights_whenever_they_are_read():
    x, y = imbalanced_stream(n=500)
    now = AEFOCL(buffer_width=64, pfg=True, num_classes=6, seed=4)
    later = AEFOCL(buffer_width=64, pfg=True, num_classes=6, seed=4, defer_rows=64)
    for start in range(0, 500, 10):
        now.partial_fit(x[start:start + 10], y[start:start + 10])
        later.partial_fit(x[start:start + 10], y[start:start + 10])
        assert sum(len(p[1]) for p in later._pending) < 64  # bounded: never more than defer_rows rows wait
        if start % 130 == 0:
            assert rel_err(later.coef_, now.coef_) < 1e-10
            assert later._pending == []  # reading the weights folds the waiting rows in
    assert rel_err(later.balanced_coef(), now.balanced_coef()) < 1e-8
    assert np.array_equal(later.class_counts_, now.class_counts_) and later.n_seen_ == now.n_seen_ == 500
