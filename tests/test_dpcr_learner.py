"""fedsim.algorithms.dpcr.learner against direct numpy computations: reconstruction, TSSP, CIP, federated sums."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.analytic import pack_upper, unpack_upper
from fedsim.algorithms.dpcr.learner import (
    DPCR,
    class_statistics,
    decode_statistics,
    drift_map,
    drift_statistics,
    encode_statistics,
    row_space_projector,
)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_features(n: int = 600, d: int = 16, c: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = np.maximum(rng.normal(size=(c, d))[y] + rng.normal(size=(n, d)), 0.0) + 0.1  # ReLU-like, uncentred
    return x, y


def np_ridge(x: np.ndarray, y: np.ndarray, c: int, gamma: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ np.eye(c)[y])


TASKS = [[0, 1], [2, 3], [4, 5]]


def feed_tasks(learner: DPCR, x_per_task: list[np.ndarray], y: np.ndarray, maps=None) -> DPCR:
    """Task t sees the samples of TASKS[t]; ``maps[t]`` (features before/after) gives its drift statistics."""
    for t, classes in enumerate(TASKS):
        mask = np.isin(y, classes)
        drift = None
        if t > 0:
            drift = drift_statistics(x_per_task[t - 1][mask], x_per_task[t][mask])
        learner.partial_fit(class_statistics(x_per_task[t][mask], y[mask]), drift)
    return learner


@pytest.mark.parametrize("tssp", [False, True])
def test_reconstruction_equals_ridge_on_all_features_when_the_backbone_is_fixed(tssp):
    x, y = make_features()
    gamma = 3.0
    learner = feed_tasks(DPCR(gamma=gamma, tssp=tssp, cip=tssp, class_norm=False), [x, x, x], y)
    direct = np_ridge(x, y, 6, gamma)
    # without TSSP nothing is recalibrated: the sums are X^T X and X^T Y exactly; with TSSP Delta = I up to eps
    assert rel_err(learner.coef_, direct) < (1e-12 if not tssp else 1e-8)
    assert list(learner.classes_) == [0, 1, 2, 3, 4, 5]
    assert np.array_equal(learner.counts_, np.bincount(y, minlength=6))
    # class normalization: the same directions, unit length
    normed = feed_tasks(DPCR(gamma=gamma, tssp=tssp, cip=tssp, class_norm=True), [x, x, x], y)
    assert np.allclose(np.linalg.norm(normed.coef_, axis=0), 1.0)
    assert rel_err(normed.coef_, direct / np.linalg.norm(direct, axis=0)) < 1e-8
    assert np.array_equal(normed.predict(x), np.argmax(x @ (direct / np.linalg.norm(direct, axis=0)), axis=1))


def test_unseen_classes_are_never_predicted():
    x, y = make_features()
    mask = np.isin(y, [0, 1])
    learner = DPCR(gamma=1.0).fit(class_statistics(x[mask], y[mask]))
    assert set(np.unique(learner.predict(x))) <= {0, 1}
    learner.partial_fit(class_statistics(x[y == 4], y[y == 4]), drift_statistics(x[y == 4], x[y == 4]))
    assert list(learner.classes_) == [0, 1, 4]
    assert np.isneginf(learner.decision_function(x[:3])[:, 2]).all()


@pytest.mark.parametrize("cip", [False, True])
def test_tssp_recovers_a_linear_drift_and_calibrates_to_the_mapped_statistics(cip):
    x, y = make_features(n=900, d=12)
    a = np.random.default_rng(5).normal(size=(12, 12)) + 3 * np.eye(12)  # invertible
    assert abs(np.linalg.det(a)) > 1.0
    learner = DPCR(gamma=1.0, tssp=True, cip=cip, class_norm=False)
    old = np.isin(y, [0, 1, 2])
    learner.fit(class_statistics(x[old], y[old]))
    new = ~old
    drift = drift_statistics(x[new], x[new] @ a)
    assert rel_err(drift_map(drift, 1e-9), a) < 1e-9
    learner.partial_fit(class_statistics(x[new] @ a, y[new]), drift)
    assert rel_err(learner.drift_, a) < 1e-9
    mapped = x @ a
    for c in [0, 1, 2]:  # old classes: calibrated statistics are those of the mapped features
        xc = mapped[y == c]
        assert rel_err(learner.means_[c], xc.mean(axis=0)) < 1e-8
        assert rel_err(learner.grams_[c], xc.T @ xc) < 1e-8
        if cip:
            assert learner.cip_ranks_[c] == 12  # full-rank classes: P_c = I
    # ... so the classifier is ridge regression on the mapped features of every class
    assert rel_err(learner.coef_, np_ridge(mapped, y, 6, 1.0)) < 1e-8


def test_cip_rank_with_a_relative_tolerance_is_the_data_rank():
    rng = np.random.default_rng(1)
    d = 20
    for n, rank in [(5, 5), (40, 7)]:
        xc = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))  # rank min(n, rank) < d
        gram = xc.T @ xc
        proj, r = row_space_projector(gram, tol="rank")
        assert r == rank == np.linalg.matrix_rank(xc)
        assert np.allclose(proj @ proj, proj) and np.allclose(proj, proj.T)
        assert np.allclose(xc @ proj, xc)  # the class's own features are untouched
        _, r_rel = row_space_projector(gram, tol=1e-10)
        assert r_rel == rank
        # the official test S > 0 keeps the round-off directions too: about the identity
        _, r_official = row_space_projector(gram, tol=0.0)
        assert r_official > rank
    full = rng.normal(size=(100, d))
    assert row_space_projector(full.T @ full, tol="rank")[1] == d
    with pytest.raises(ValueError, match="cip_tol: 'ranks' is not allowed"):
        row_space_projector(full.T @ full, tol="ranks")


@pytest.mark.parametrize("dead", [[0, 1], [3, 7], [8, 9]])
def test_the_default_cip_is_the_official_s_greater_than_zero(dead):
    """The default tolerance keeps every direction with S > 0 (the official ``torch.where(S > 0)``): exact zeros
    (dead channels, wherever they sit) are dropped, tiny but non-zero singular values are kept."""
    d = 10
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(d - len(dead), d - len(dead))))
    live = [j for j in range(d) if j not in dead]
    s = np.array([1e3, 50.0, 1.0, 0.5, 0.1, 1e-13, 1e-14, 1e-15])  # the last three below S_max d eps
    gram = np.zeros((d, d))
    gram[np.ix_(live, live)] = q @ np.diag(s) @ q.T
    assert DPCR().cip_tol == 0.0
    proj, rank = row_space_projector(gram)  # the default: S > 0
    u = np.zeros((d, len(live)))
    u[live] = q
    assert rank == len(live)
    np.testing.assert_allclose(proj, u @ u.T, atol=1e-12)  # every live direction, the tiny ones included
    assert np.all(proj[dead] == 0) and np.all(proj[:, dead] == 0)  # the dead channels exactly cut
    proj_rank, rank_rank = row_space_projector(gram, tol="rank")  # numerical rank: S > 1e3 * 10 * 2.2e-16
    assert rank_rank == int((s > 1e3 * d * np.finfo(float).eps).sum()) == 5
    kept = u[:, s > 1e3 * d * np.finfo(float).eps]
    np.testing.assert_allclose(proj_rank, kept @ kept.T, atol=1e-10)
    assert row_space_projector(gram, tol=2e-4)[1] == 4  # S > 0.2


def test_cip_removes_the_directions_a_low_rank_class_never_used():
    x, y = make_features(n=900, d=10)
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(3, 10))
    x0 = np.abs(rng.normal(size=(50, 3))) @ basis  # class 0 lives in a 3-dim subspace
    learner = DPCR(gamma=1.0, cip=True, cip_tol="rank", class_norm=False)
    learner.fit(class_statistics(x0, np.zeros(50, int)))
    delta_src = x[y > 0]
    b = rng.normal(size=(10, 10)) + 2 * np.eye(10)
    drift = drift_statistics(delta_src, delta_src @ b)
    learner.partial_fit(class_statistics(delta_src @ b, y[y > 0]), drift)
    assert learner.cip_ranks_ == {0: 3}
    proj = row_space_projector(x0.T @ x0, tol="rank")[0]
    w = drift_map(drift) @ proj
    assert rel_err(learner.means_[0], x0.mean(axis=0) @ w) < 1e-9
    assert rel_err(learner.grams_[0], w.T @ x0.T @ x0 @ w) < 1e-9
    assert np.linalg.matrix_rank(learner.grams_[0]) == 3


def test_federated_sums_equal_the_centralized_reconstruction():
    """Per-client class and TSSP statistics summed over clients give the centralized learner (any split)."""
    x, y = make_features(n=1200, d=14)
    rng = np.random.default_rng(7)
    # three "backbones": the features drift nonlinearly from task to task
    feats = [x, np.tanh(x @ rng.normal(size=(14, 14)) * 0.3) + x, np.maximum(x @ rng.normal(size=(14, 14)), 0) + x]
    owner = rng.dirichlet(0.3 * np.ones(5), size=6)  # label-skewed split over 5 clients
    client = np.array([rng.choice(5, p=owner[c]) for c in y])
    central = feed_tasks(DPCR(gamma=2.0), feats, y)
    fed = DPCR(gamma=2.0)
    for t, classes in enumerate(TASKS):
        stats, drift = 0, 0
        for k in range(5):
            m = np.isin(y, classes) & (client == k)
            stats = stats + class_statistics(feats[t][m], y[m], dim=14)
            if t > 0:
                drift = drift + drift_statistics(feats[t - 1][m], feats[t][m])
        fed.partial_fit(stats, drift if t > 0 else None)
    assert rel_err(fed.coef_, central.coef_) < 1e-10
    assert rel_err(fed.grams_, central.grams_) < 1e-10
    assert np.array_equal(fed.counts_, central.counts_)
    assert np.array_equal(fed.predict(feats[2]), central.predict(feats[2]))


def test_tssp_needs_drift_statistics_after_the_first_task():
    x, y = make_features()
    learner = DPCR().fit(class_statistics(x[y == 0], y[y == 0]))
    with pytest.raises(ValueError, match="TSSP needs the drift statistics"):
        learner.partial_fit(class_statistics(x[y == 1], y[y == 1]))
    DPCR(tssp=False, cip=False).fit(class_statistics(x[y == 0], y[y == 0])).partial_fit(
        class_statistics(x[y == 1], y[y == 1]))


def test_statistics_memory():
    x, y = make_features(d=16)
    learner = DPCR().fit(class_statistics(x, y))
    assert learner.statistics_nbytes() == 6 * 8 + 6 * (16 + 256) * 8
    assert learner.statistics_nbytes(np.float32) == 6 * 8 + 6 * (16 + 256) * 4


def test_wire_format_round_trip_and_client_sums():
    """encode -> add over clients -> decode gives the statistics of the union (Grams travel as upper triangles)."""
    x, y = make_features(n=500, d=9)
    x_old = x * 0.5 + 0.1
    parts = np.arange(500) % 3
    classes = [1, 4]
    mask = np.isin(y, classes)
    enc = [encode_statistics(class_statistics(x[mask & (parts == k)], y[mask & (parts == k)], dim=9), classes,
                             drift_statistics(x_old[mask & (parts == k)], x[mask & (parts == k)]))
           for k in range(3)]
    assert enc[0]["gram"].shape == (2, 45) and enc[0]["drift_gram"].shape == (45,)
    total = {k: (enc[0][k] if k == "classes" else sum(e[k] for e in enc)) for k in enc[0]}
    stats, drift = decode_statistics(total, num_classes=6)
    direct = class_statistics(x[mask], y[mask], dim=9)
    assert stats.num_classes == 6 and list(stats.count) == [0, *direct.count[1:2], 0, 0, *direct.count[4:5], 0]
    for c in classes:
        assert np.allclose(stats.mean[c], direct.mean[c]) and np.allclose(stats.gram[c], direct.gram[c])
        assert np.allclose(stats.var[c], direct.var[c])
    ref = drift_statistics(x_old[mask], x[mask])
    assert np.allclose(drift.gram, ref.gram) and np.allclose(drift.cross, ref.cross) and drift.count == mask.sum()
    a = np.random.default_rng(0).normal(size=(7, 7))
    assert np.array_equal(unpack_upper(pack_upper(a + a.T), 7), a + a.T)
    with pytest.raises(ValueError, match="has 28 entries"):
        unpack_upper(np.zeros(27), 7)
