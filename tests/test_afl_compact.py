"""AFL's compact exact uploads (issue #14): a client sends a factor R_k (R_k^T R_k = C_k) when it is smaller than
the packed Gram; the server folds it in with one syrk. Weights must equal the packed-Gram run and an independent
numpy ridge solution to float64 round-off, for clients with n_k < d, n_k = d, n_k > d and empty ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import scenario_config
from fedsim.analytic import RidgeStatistics, gram_factor
from fedsim.engine.runner import run_scenario
from fedsim.algorithms.afl.learner import AFLLearner, factor_is_smaller, reduce_replies
from fedsim.scenario import partition_for, train_split

D, C = 64, 10
BASE = f"""
seed = 2
rounds = 1
[data]
name = "fashion-mnist"
max_train = 1500
max_test = 300
[partition]
kind = "quantity"
num_clients = 12
quantity_alpha = 0.3
[model]
feature_map = "random"
feature_dim = {D}
[simulation]
backend = "inline"
[strategy]
name = "afl"
"""
TOL = 1e-9


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(tmp_path, name, *overrides):
    config = scenario_config(BASE, tmp_path, *overrides)
    summary = run_scenario(config, tmp_path / name, show_progress=False)
    model = torch.load(tmp_path / name / "model.pt", weights_only=False)
    table = pd.read_csv(tmp_path / name / "clients.csv")
    return config, summary, model[-1].weight.detach().numpy().T.astype(np.float64), table, model


def numpy_ridge(config, model, gamma=1.0) -> np.ndarray:
    proj = model[0].weight.detach().numpy().astype(np.float64)
    train = train_split(config)
    x = np.maximum(train.x.reshape(len(train), -1).numpy().astype(np.float64) @ proj, 0.0)
    return np.linalg.solve(x.T @ x + gamma * np.eye(D), x.T @ np.eye(C)[train.labels])


def test_factor_reproduces_the_gram_for_every_shape():
    rng = np.random.default_rng(0)
    for n in (0, 5, D - 1, D, D + 7, 3 * D):
        x = rng.normal(size=(n, D))
        r = gram_factor(x, block_rows=40)  # blockwise (TSQR) for the tall ones
        assert r.shape == (min(n, D), D)
        np.testing.assert_allclose(r.T @ r, x.T @ x, rtol=0, atol=1e-10 * max(1.0, np.abs(x.T @ x).max()))
    assert factor_is_smaller(D // 2, D) and not factor_is_smaller(D // 2 + 1, D)


@pytest.mark.parametrize("upload", ["auto", "factor"])
def test_compact_uploads_give_the_packed_gram_weights(tmp_path, upload):
    config, packed, w_packed, t_packed, model = run(tmp_path, "packed", "strategy.upload=statistics")
    sizes = np.array([len(p) for p in partition_for(config)])
    assert (sizes < D // 2).any() and (sizes >= D).any() and (sizes == 0).any()  # small, large and empty clients
    _, compact, w, table, _ = run(tmp_path, upload, f"strategy.upload={upload}")
    assert rel_err(w, w_packed) < TOL and rel_err(w, numpy_ridge(config, model)) < TOL
    assert compact["final_accuracy"] == packed["final_accuracy"]
    # bytes: a factor client sends 8 r d (r = min(n, d)) + its Q (8 d c) + record overhead, a Gram client the
    # packed Gram; "auto" sends whichever is smaller, so it never exceeds either form
    gram_bytes = t_packed["bytes_up"].to_numpy()
    per_client = table["bytes_up"].to_numpy()
    for n, got, gram in zip(sizes, per_client, gram_bytes):
        payload = 8 * min(n, D) * D + 8 * D * C
        if upload == "factor" or factor_is_smaller(n, D):
            assert payload < got < payload + 1024, (n, got)
        else:
            assert got == gram
    if upload == "auto":
        assert compact["bytes_up"] < packed["bytes_up"]


def test_grouped_nodes_mixing_small_and_large_clients_match_single_nodes(tmp_path):
    _, single, w1, t1, _ = run(tmp_path, "single", "strategy.upload=auto")
    _, grouped, w4, t4, _ = run(tmp_path, "grouped", "strategy.upload=auto", "simulation.clients_per_node=4")
    assert rel_err(w4, w1) < TOL
    assert list(t4["bytes_up"]) == list(t1["bytes_up"]) and grouped["messages_up"] == 3


def test_reduce_stacks_small_factors_and_folds_large_ones():
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(n, D)) for n in (3, 4, 0, 20, 50, 2)]
    ys = [rng.integers(0, C, len(x)) for x in xs]
    ref = RidgeStatistics.zeros(D, C)
    for x, y in zip(xs, ys):
        ref.update(x, y, C)

    def factor_reply(x, y):
        return {"factor": gram_factor(x), "cross": x.T @ np.eye(C)[y], "count": np.array([len(x)])}

    small = reduce_replies(factor_reply(x, y) for x, y in zip(xs[:3], ys[:3]))
    assert set(small) == {"factor", "cross", "count"} and small["factor"].shape == (7, D)  # stacked, still small
    mixed = reduce_replies([factor_reply(x, y) for x, y in zip(xs, ys)]
                           + [{"gram": RidgeStatistics.zeros(D, C).update(xs[4], ys[4], C).to_arrays()["gram"]
                               [np.triu_indices(D)], "cross": xs[4].T @ np.eye(C)[ys[4]], "count": np.array([50])}])
    assert "gram" in mixed and int(mixed["count"][0]) == sum(len(x) for x in xs) + 50
    learner = AFLLearner(gamma=0.5).add_reply(mixed, clients=7)
    expected = ref.gram + xs[4].T @ xs[4], ref.cross + xs[4].T @ np.eye(C)[ys[4]]
    w_ref = np.linalg.solve(expected[0] + 0.5 * np.eye(D), expected[1])
    assert rel_err(learner.solve().coef_, w_ref) < TOL
