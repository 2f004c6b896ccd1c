"""The analytic continual family of issue #25: ACIL / G-ACIL, DS-AL, AIR and the generalized (Si-Blurry) stream.

- each update rule against a hand computation on small data (numpy written out here, the official recursion with
  its explicit inverse included);
- ACIL's weight invariance: any batching, order or task split gives the joint ridge weights (1e-8), and a run's
  saved classifier equals joint ridge on the frozen features of every training sample (also on a generalized
  stream, where classes recur);
- each federated form equals its centralized form on the union of the clients' data (1e-8): the statistics sum,
  and end to end (same backbone: no base-training epochs, so both runs keep the initial network);
- the generalized stream: classes recur, every sample once, new classes disjoint, seeded, the blurry share exact,
  bad settings named.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_config_error_names
from fedsim.algorithms.acil.learner import ACIL, decode_statistics, encode_statistics
from fedsim.algorithms.air.learner import AIR, reduce_statistics
from fedsim.algorithms.dsal.learner import DSAL, residual_targets
from fedsim.analytic import RidgeStatistics, one_hot
from fedsim.config import config_from_dict
from fedsim.data.streams import generalized_class_incremental
from fedsim.engine.runner import run_scenario

RTOL = 1e-8


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max()), 1e-300)
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


def _data(n=90, d=7, c=4, seed=0):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((n, d)))
    y = rng.integers(0, c, n)
    return x, y


def _ridge(x, targets, gamma):
    return np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ targets)


# ------------------------------------------------------------------------------------------------------- ACIL
def _official_recursion(batches, d, c, gamma):
    """analytic/AnalyticLinear.py RecursiveLinear.fit, written out with its explicit inverse."""
    r, w = np.eye(d) / gamma, np.zeros((d, c))
    for x, y in batches:
        yy = one_hot(y, c)
        k = np.linalg.inv(np.eye(len(x)) + x @ r @ x.T)
        r = r - r @ x.T @ k @ x @ r
        w = w + r @ x.T @ (yy - x @ w)
    return w


def test_acil_recursion_and_statistics_equal_joint_ridge_for_any_batching():
    x, y = _data()
    gamma, c = 0.1, 4
    joint = _ridge(x, one_hot(y, c), gamma)
    splits = [np.arange(90), np.arange(0, 90, 13), np.array([5, 6, 40, 41, 89])]
    for cuts in splits:
        batches = [(x[s], y[s]) for s in np.split(np.arange(90), cuts[1:] if cuts[0] == 0 else cuts)]
        _close(_official_recursion(batches, 7, c, gamma), joint)
        rec, stat = ACIL(gamma, solver="recursive"), ACIL(gamma)
        for xb, yb in batches:
            rec.partial_fit(xb, yb, c)
            stat.add_statistics(RidgeStatistics.from_data(xb, yb, c))
        _close(rec.coef_, joint)
        _close(stat.coef_, joint)
    order = np.random.default_rng(1).permutation(90)  # another order, classes interleaved (the generalized case)
    rec = ACIL(gamma, solver="recursive")
    for s in np.array_split(order, 7):
        rec.partial_fit(x[s], y[s], c)
    _close(rec.coef_, joint)
    with pytest.raises(ValueError, match="solver"):
        ACIL(gamma).partial_fit(x, y)


def test_acil_federated_statistics_equal_the_union():
    x, y = _data(n=120)
    parts = np.array_split(np.random.default_rng(2).permutation(120), 4)
    wire = [encode_statistics(RidgeStatistics.from_data(x[p], y[p], 4), [0, 1]) for p in parts]
    summed = {k: sum(w[k] for w in wire) for k in ("gram", "cross", "count")}
    union = RidgeStatistics.from_data(x, y, 4)
    got = decode_statistics(summed, 7)
    _close(got.gram, union.gram)
    assert got.count == 120
    _close(ACIL(0.1).add_statistics(got).coef_, _ridge(x, one_hot(y, 4), 0.1))


# ------------------------------------------------------------------------------------------------------ DS-AL
def test_dsal_two_tasks_against_a_hand_computation():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((80, 6))
    y = np.where(np.arange(80) < 40, rng.integers(0, 2, 80), rng.integers(2, 4, 80))
    tasks = [(slice(0, 40), [0, 1]), (slice(40, 80), [2, 3])]
    gm, gc, ratio = 0.1, 0.3, 0.6
    learner = DSAL(gm, gc, ratio)
    hm_all, hc_all, comp_targets = [], [], []
    for s, new in tasks:
        learner.partial_fit(z[s], y[s], new, 4)
        hm, hc = np.maximum(z[s], 0), np.tanh(z[s])
        hm_all.append(hm)
        hc_all.append(hc)
        w_main = _ridge(np.vstack(hm_all), one_hot(y[: s.stop], 4), gm)  # main: joint ridge on tasks so far
        residual = one_hot(y[s], 4) - hm @ w_main
        mask = np.zeros(4, bool)
        mask[new] = True
        residual[:, ~mask] = 0.0  # previous label cleansing
        comp_targets.append(residual)
        w_comp = _ridge(np.vstack(hc_all), np.vstack(comp_targets), gc)
        _close(learner.coef_main_, w_main)
        _close(learner.coef_comp_, w_comp)
        _close(residual_targets(hm, y[s], w_main, new, 4), residual)
    scores = np.maximum(z, 0) @ w_main + ratio * np.tanh(z) @ w_comp
    _close(learner.decision_function(z), scores)
    np.testing.assert_array_equal(learner.predict(z, [0, 1, 2, 3]), scores.argmax(1))


def test_dsal_equals_the_official_per_batch_step_when_a_task_is_one_batch():
    """analytic/DSAL.py DSAL.fit on one batch: main RLS fit, residual under the updated W_m, compensation RLS fit."""
    rng = np.random.default_rng(4)
    z = rng.standard_normal((60, 5))
    y = np.concatenate([rng.integers(0, 2, 30), rng.integers(2, 3, 30)])
    learner = DSAL(0.1, 0.1, 1.0)
    batches_main, batches_comp = [], []
    r_m, w_m = np.eye(5) / 0.1, np.zeros((5, 3))
    r_c, w_c = np.eye(5) / 0.1, np.zeros((5, 3))
    for s, new in ((slice(0, 30), [0, 1]), (slice(30, 60), [2])):
        learner.partial_fit(z[s], y[s], new, 3)
        xm, xc, yy = np.maximum(z[s], 0), np.tanh(z[s]), one_hot(y[s], 3)
        k = np.linalg.inv(np.eye(len(xm)) + xm @ r_m @ xm.T)
        r_m = r_m - r_m @ xm.T @ k @ xm @ r_m
        w_m = w_m + r_m @ xm.T @ (yy - xm @ w_m)
        y_comp = yy - xm @ w_m
        # Y_comp[:, :-increase_size] = 0 with the label columns so far (2 at task 0, 3 at task 1): only the new
        # classes' columns keep their residual
        y_comp[:, [k for k in range(3) if k not in new]] = 0.0
        k = np.linalg.inv(np.eye(len(xc)) + xc @ r_c @ xc.T)
        r_c = r_c - r_c @ xc.T @ k @ xc @ r_c
        w_c = w_c + r_c @ xc.T @ (y_comp - xc @ w_c)
    _close(learner.coef_main_, w_m, 1e-7)
    _close(learner.coef_comp_, w_c, 1e-7)


# -------------------------------------------------------------------------------------------------------- AIR
def test_air_is_class_reweighted_ridge_and_its_statistics_add():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 3], [200, 40, 7])  # long-tailed, class 2 never seen
    rng.shuffle(y)
    h = np.abs(rng.standard_normal((len(y), 8)))
    counts = np.bincount(y, minlength=4)
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    w = inv * 3 / inv.sum()  # the official normalization over the seen classes (3 here)
    d = np.diag(w[y])
    expected = np.linalg.solve(h.T @ d @ h + 0.1 * np.eye(8), h.T @ d @ one_hot(y, 4))
    for defer in (1, 50, 10_000):
        learner = AIR(0.1, num_classes=4, defer_rows=defer)
        for s in np.array_split(np.arange(len(y)), 25):
            learner.partial_fit(h[s], y[s])
        _close(learner.class_weights(), w)
        _close(learner.coef_, expected)
    assert not learner.coef_[:, 2].any()
    # federated: per-client statistics summed = the union's
    parts = np.array_split(rng.permutation(len(y)), 3)
    client_stats = [AIR(0.1, 4).partial_fit(h[p], y[p]).statistics() for p in parts]
    server = AIR(0.1, 4).merge(reduce_statistics(client_stats[:2]), 8).merge(client_stats[2], 8)
    _close(server.coef_, expected)


# ---------------------------------------------------------------------------------------- generalized streams
def test_generalized_stream_properties():
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(labels)
    tasks = generalized_class_incremental(labels, tasks=5, seed=3, disjoint_fraction=0.5, blurry_fraction=0.1)
    every = np.sort(np.concatenate([t.indices for t in tasks]))
    np.testing.assert_array_equal(every, np.arange(len(labels)))  # every sample exactly once
    new = [c for t in tasks for c in t.classes]
    assert sorted(new) == list(range(10)) and len(set(new)) == 10  # new classes disjoint, all covered
    assert all(t.classes for t in tasks)  # every task brings a new class
    presence = {c: [t.index for t in tasks if c in t.present] for c in range(10)}
    recurring = [c for c, ts in presence.items() if len(ts) > 1]
    assert len(recurring) == 5  # the 5 blurry classes recur, the 5 disjoint ones do not
    for t in tasks:
        assert set(t.present) == set(np.unique(labels[t.indices]).tolist())
        assert set(t.classes) <= set(t.present)
    for c, ts in presence.items():
        moved = 50 - max(np.sum(labels[t.indices] == c) for t in tasks)
        # M = 10% of each blurry class is dealt to all tasks (some of it back home): 0 < outside its home <= 5
        assert (0 < moved <= 5) if c in recurring else moved == 0
    again = generalized_class_incremental(labels, tasks=5, seed=3)
    other = generalized_class_incremental(labels, tasks=5, seed=4)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(tasks, again))
    assert any(not np.array_equal(a.indices, b.indices) for a, b in zip(tasks, other))


def test_generalized_stream_bad_settings_are_named():
    labels = np.repeat(np.arange(10), 20)
    assert_config_error_names("stream.disjoint_fraction", "one new class per task",
                              lambda: generalized_class_incremental(labels, 5, 0, disjoint_fraction=0.3))
    assert_config_error_names("stream.blurry_fraction", "[0, 1]",
                              lambda: generalized_class_incremental(labels, 5, 0, blurry_fraction=1.5))
    base = {"data": {"name": "digits"}, "model": {"name": "cnn", "width": 8}, "strategy": {"name": "g-acil"},
            "simulation": {"backend": "inline"}}
    assert_config_error_names("stream.generalized", "class-incremental", lambda: config_from_dict(
        {**base, "stream": {"kind": "online", "generalized": True}}))
    assert_config_error_names("stream.first_task_classes", "disjoint_fraction", lambda: config_from_dict(
        {**base, "stream": {"kind": "class-incremental", "tasks": 2, "generalized": True, "first_task_classes": 4}}))
    # a strategy whose clients take every sample of a task's classes refuses a generalized stream
    from fedsim.frameworks.class_incremental import CILServer

    config = config_from_dict({**base, "strategy": {"name": "lwf"},
                               "stream": {"kind": "class-incremental", "tasks": 2, "generalized": True}})
    ctx = SimpleNamespace(config=config, train_data=lambda: SimpleNamespace(labels=labels))
    assert_config_error_names("stream.generalized", "acil, g-acil, ds-al",
                              lambda: CILServer(config.strategy.params).tasks(ctx))


# ---------------------------------------------------------------------------------------------- end to end
def _tree(name, clients, **extra):
    tree = {"seed": 1, "data": {"name": "digits", "max_train": 500, "max_test": 200},
            "partition": {"kind": "dirichlet" if clients > 1 else "iid", "num_clients": clients, "alpha": 1.0},
            "model": {"name": "cnn", "width": 8}, "client": {"epochs": 0, "batch_size": 32, "lr": 0.05},
            "simulation": {"backend": "inline"}, "stream": {"kind": "class-incremental", "tasks": 2},
            "strategy": {"name": name, "buffer_width": 96}}
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    return tree


def _run(tree, out):
    summary = run_scenario(config_from_dict(tree), out, show_progress=False)
    return summary, torch.load(out / "model.pt", weights_only=False)


@pytest.mark.parametrize("name, generalized", [("acil", False), ("ds-al", False), ("g-acil", True)])
def test_federated_equals_centralized_end_to_end(name, generalized, tmp_path):
    """Same (initial) backbone: 3 Dirichlet clients' summed statistics give the 1-client classifier (1e-8); G-ACIL
    on the generalized stream, where classes recur and each client takes its partition's part of a task's indices."""
    extra = {"stream__generalized": True} if generalized else {}
    central, m1 = _run(_tree(name, 1, **extra), tmp_path / "one")
    federated, m3 = _run(_tree(name, 3, **extra), tmp_path / "three")
    for i in range(len(m1.activations)):
        _close(getattr(m3, f"weights_{i}").numpy(), getattr(m1, f"weights_{i}").numpy())
    assert federated["final_accuracy"] == central["final_accuracy"]


@pytest.mark.parametrize("generalized", [False, True])
def test_acil_run_weights_equal_joint_ridge_on_the_frozen_features(generalized, tmp_path):
    """After the last task, W = ridge on the buffer features of every training sample (base training included;
    on the generalized stream too, where classes recur)."""
    from fedsim.algorithms.acil.learner import buffer_features
    from fedsim.scenario import train_split

    tree = _tree("g-acil", 2, client__epochs=1, stream__generalized=generalized)
    summary, model = _run(tree, tmp_path / "run")
    config = config_from_dict(tree)
    train = train_split(config)
    h = buffer_features(model.backbone, model.buffer, train.x)
    _close(model.weights_0.numpy(), _ridge(h, one_hot(train.labels, 10), 0.1))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["generalized"] is generalized and summary["final_accuracy"] > 0.6
    if generalized:
        present = saved["task_present_classes"]
        assert set(present[0]) & set(present[1])  # classes recur across the two tasks


def test_air_federated_equals_centralized_on_the_union(tmp_path):
    tree = {"seed": 1, "data": {"name": "digits", "max_train": 500, "max_test": 200},
            "partition": {"kind": "iid", "num_clients": 2}, "model": {"feature_map": "identity"},
            "simulation": {"backend": "inline"}, "rounds": 3,
            "stream": {"kind": "online", "batch_size": 20, "imbalance": "long-tail", "imbalance_ratio": 10},
            "strategy": {"name": "air", "buffer_width": 64, "eval_every": 5}}
    fed, mf = _run(tree, tmp_path / "fed")
    tree["strategy"]["mode"] = "centralized"
    cen, mc = _run(tree, tmp_path / "cen")
    _close(mf[-1].weight.detach().numpy(), mc[-1].weight.detach().numpy())
    assert fed["final_accuracy"] == cen["final_accuracy"] > 0.5
