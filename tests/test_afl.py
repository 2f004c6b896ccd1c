"""AFL on real Fashion-MNIST features, through the real Flower apps (inline backend: messages serialized).

Every reference solution here is computed independently with numpy: the features are rebuilt from the saved
model's random projection (relu(x W_proj) in float64) and the ridge system is solved with `np.linalg.solve` on
the union of the data the answering clients hold. AFL must match it to float64 round-off, whatever the split.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import fmnist_slice, scenario_config
from fedsim.engine.accounting import failing_clients
from fedsim.scenario import partition_for, train_split
import fedsim.scenario as engine_client
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError

BASE = f"""
seed = 1
rounds = 1
{fmnist_slice(3000, 1000)}
[model]
feature_map = "random"
feature_dim = 256
[simulation]
backend = "inline"
[strategy]
name = "afl"
gamma = 1.0
"""
TOL = 1e-9


def config_of(tmp_path, *overrides):
    return scenario_config(BASE, tmp_path, *overrides)


def run(tmp_path, name, *overrides):
    config = config_of(tmp_path, *overrides)
    summary = run_scenario(config, tmp_path / name, show_progress=False)
    model = torch.load(tmp_path / name / "model.pt", weights_only=False)
    return config, summary, model


def weights_of(model) -> np.ndarray:
    return model[-1].weight.detach().numpy().T.astype(np.float64)  # (d, c)


def np_features(model, x: torch.Tensor) -> np.ndarray:
    """relu(x W_proj) in float64 numpy, from the projection stored in the saved model (no fedsim code)."""
    proj = model[0].weight.detach().numpy().astype(np.float64)
    return np.maximum(x.reshape(len(x), -1).numpy().astype(np.float64) @ proj, 0.0)


def np_ridge(x: np.ndarray, y: np.ndarray, gamma: float, num_classes: int = 10) -> np.ndarray:
    targets = np.eye(num_classes)[y]
    return np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ targets)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def centralized(tmp_path_factory):
    """The numpy reference on the whole train slice, and its test accuracy."""
    tmp = tmp_path_factory.mktemp("ref")
    config, summary, model = run(tmp, "one", )
    train, test = train_split(config), engine_client.test_split(config)
    w_ref = np_ridge(np_features(model, train.x), train.labels, 1.0)
    acc_ref = float(np.mean((np_features(model, test.x) @ w_ref).argmax(1) == test.labels))
    return {"w": w_ref, "acc": acc_ref, "model": model, "summary": summary, "config": config}


def test_one_client_equals_numpy_ridge(centralized):
    w = weights_of(centralized["model"])
    assert rel_err(w, centralized["w"]) < TOL
    assert centralized["summary"]["final_accuracy"] == centralized["acc"]
    assert centralized["acc"] > 0.75  # measured 0.799 (3000 train samples, 256 random features)


@pytest.mark.parametrize("label, overrides", [
    ("iid-10", ["partition.kind=iid", "partition.num_clients=10"]),
    ("dirichlet-0.01-100", ["partition.kind=dirichlet", "partition.num_clients=100", "partition.alpha=0.01"]),
    ("shards-20", ["partition.kind=shards", "partition.num_clients=20", "partition.classes_per_client=2"]),
    ("dirichlet-0.01-100-solution-grouped", ["partition.kind=dirichlet", "partition.num_clients=100",
                                             "partition.alpha=0.01", "strategy.upload=solution",
                                             "simulation.clients_per_node=7"]),
])
def test_weight_invariance(tmp_path, centralized, label, overrides):
    config, summary, model = run(tmp_path, label, *overrides)
    parts = partition_for(config)
    assert sum(len(p) for p in parts) == 3000  # the splits cover the same data as the single client
    if "dirichlet" in label:
        sizes = pd.read_csv(tmp_path / label / "partition.csv")["size"]
        assert (sizes == 0).sum() > 10  # empty clients included (they upload zeros / (0, gamma I))
    assert rel_err(weights_of(model), centralized["w"]) < TOL
    assert summary["final_accuracy"] == centralized["acc"]
    assert summary["answered_clients"] == config.num_clients and summary["dropped_clients"] == 0


@pytest.mark.parametrize("upload", ["statistics", "solution"])
def test_dropout_gives_the_solution_on_the_survivors(tmp_path, upload):
    config, summary, model = run(tmp_path, "drop", "partition.kind=dirichlet", "partition.num_clients=50",
                                 "partition.alpha=0.1", "simulation.failure_rate=0.2", f"strategy.upload={upload}",
                                 "simulation.clients_per_node=3")
    failed = failing_clients(config.seed, 1, 50, 0.2)
    assert len(failed) == 10
    assert summary["dropped_clients"] == 10 and summary["dropped_client_ids"] == sorted(failed)
    assert summary["answered_clients"] == 40 and summary["failed_client_rounds"] == 10
    parts = partition_for(config)
    keep = np.sort(np.concatenate([parts[k] for k in range(50) if k not in failed]))
    train = train_split(config)
    assert 0 < len(keep) < 3000 and summary["train_samples"] == len(keep)
    w_ref = np_ridge(np_features(model, train.x[keep]), train.labels[keep], 1.0)
    assert rel_err(weights_of(model), w_ref) < TOL
    # and it differs from the all-clients solution: the survivors' data really is a subset
    w_all = np_ridge(np_features(model, train.x), train.labels, 1.0)
    assert rel_err(weights_of(model), w_all) > 1e-3


def test_least_squares_target_is_the_joint_least_squares_solution(tmp_path):
    config, summary, model = run(tmp_path, "ls", "partition.kind=dirichlet", "partition.num_clients=30",
                                 "partition.alpha=0.1", "strategy.target=least-squares", "strategy.upload=solution",
                                 "model.feature_dim=64")
    train = train_split(config)
    x = np_features(model, train.x)
    w_ref = np.linalg.lstsq(x, np.eye(10)[train.labels], rcond=None)[0]
    assert rel_err(weights_of(model), w_ref) < TOL  # measured 5e-13; X^T X has condition 5e4, RI removes 30 gamma I
    assert rel_err(weights_of(model), np_ridge(x, train.labels, 1.0)) > 1e-6  # a different target than ridge


@pytest.mark.parametrize("upload", ["statistics", "solution"])
@pytest.mark.parametrize("target", ["ridge", "least-squares"])
def test_ill_conditioned_more_features_than_data(tmp_path, upload, target):
    """d = 1024 features, 200 training samples over 20 clients, gamma = 1e-6: X^T X is singular (rank <= 200).

    The reference is the dual form X^T (X X^T + gamma I)^-1 Y (an n x n well-posed system; gamma -> 0 gives the
    minimum-norm interpolant for "least-squares"), computed with numpy.
    """
    config, summary, model = run(tmp_path, "ill", "data.max_train=200", "model.feature_dim=1024",
                                 "partition.kind=dirichlet", "partition.num_clients=20", "partition.alpha=0.5",
                                 "strategy.gamma=1e-6", f"strategy.upload={upload}", f"strategy.target={target}")
    train = train_split(config)
    x = np_features(model, train.x)
    y = np.eye(10)[train.labels]
    gamma = 1e-6 if target == "ridge" else 0.0
    w_ref = x.T @ np.linalg.solve(x @ x.T + gamma * np.eye(len(x)), y)
    w = weights_of(model)
    assert np.all(np.isfinite(w))
    assert rel_err(w, w_ref) < TOLERANCE_ILL[target]
    assert np.array_equal((x @ w).argmax(1), train.labels)  # interpolates the 200 training labels
    assert summary["final_accuracy"] > 0.65  # measured 0.722 with 200 training samples


# Measured 3e-7 (ridge) and 1e-12 (least-squares). The ridge system (X^T X + 1e-6 I) has condition ~1e11, so
# any d x d primal solve carries cond * eps ~ 1e-5 of relative error; the minimum-norm solution is well posed.
TOLERANCE_ILL = {"ridge": 1e-5, "least-squares": TOL}


@pytest.mark.parametrize("overrides, message", [
    (["strategy.gamma=0"], "strategy.gamma"),
    (["strategy.gamma=-1"], "strategy.gamma"),
    (["strategy.target=lasso"], "strategy.target"),
    (["strategy.upload=gradients"], "strategy.upload"),
    (["strategy.batch_size=0"], "strategy.batch_size"),
    (["strategy.lr=0.1"], "strategy.lr"),
    (["rounds=5"], "rounds"),
])
def test_bad_config_is_refused_with_the_field_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_of(tmp_path, *overrides)


def test_run_files(tmp_path, centralized):
    config, summary, model = run(tmp_path, "files", "partition.kind=dirichlet", "partition.num_clients=10",
                                 "partition.alpha=0.1", "strategy.upload=statistics")
    metrics = pd.read_csv(tmp_path / "files" / "metrics.csv")
    assert list(metrics["round"]) == [1] and metrics["accuracy"].iloc[0] == summary["final_accuracy"]
    on_disk = json.loads((tmp_path / "files" / "summary.json").read_text())
    assert on_disk["dropped_clients"] == 0 and on_disk["model_file"] == "model.pt"
    # each client uploads its packed Gram (d (d + 1) / 2 float64) and Q (d x 10 float64), plus small metadata
    d = 256
    payload = 8 * (d * (d + 1) // 2 + d * 10)
    assert payload <= summary["bytes_up"] / 10 < payload + 2048
    # the saved module predicts what the server evaluated
    test = engine_client.test_split(config)
    acc = float((model(test.x.double()).argmax(1) == test.y).double().mean())
    assert acc == summary["final_accuracy"]


# -- the learner alone: wire format and estimator (no engine) --------------------------------------------------
def test_packed_symmetric_matrices_round_trip_exactly():
    from fedsim.analytic import pack_upper, unpack_upper

    a = np.random.default_rng(0).normal(size=(37, 37))
    a = a + a.T
    packed = pack_upper(a)
    assert packed.shape == (37 * 38 // 2,)
    assert np.array_equal(unpack_upper(packed, 37), a)
    with pytest.raises(ValueError, match="packed"):
        unpack_upper(packed[:-1], 37)


def test_learner_fit_and_every_upload_form_agree():
    from fedsim.analytic import RidgeStatistics
    from fedsim.algorithms.afl.learner import AFLLearner, encode_reply, reduce_replies

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 30)), rng.integers(0, 4, 400)
    w_ref = np_ridge(x, y, 0.5, num_classes=4)
    central = AFLLearner(gamma=0.5).fit(x, y, num_classes=4)
    assert rel_err(central.coef_, w_ref) < TOL and central.n_clients_ == 1
    parts = np.array_split(rng.permutation(400), 6) + [np.array([], dtype=int)]  # 7 clients, one empty
    stats = [RidgeStatistics.zeros(30, 4).update(x[p], y[p], 4) for p in parts]
    for upload in ("statistics", "solution"):
        replies = [encode_reply(s, upload, 0.5) for s in stats]
        learner = AFLLearner(gamma=0.5)
        learner.add_reply(reduce_replies(replies[:3]), clients=3)  # a node serving 3 clients
        for r in replies[3:]:
            learner.add_reply(r)
        assert learner.n_clients_ == 7 and learner.n_samples_ == 400
        assert rel_err(learner.solve().coef_, w_ref) < TOL
        assert learner.score(x, y) == central.score(x, y)
    with pytest.raises(RuntimeError, match="no client uploads"):
        AFLLearner().solve()


def test_torchvision_backbone_as_the_frozen_feature_map(tmp_path):
    """A torchvision backbone (random init, offline) instead of random features: still one statistics pass.

    Backbones compute in float32, where a sample's features may differ in the last bits with the batch it is in,
    so the split and unsplit weights agree to float32 round-off of the features (measured 1e-8), not 1e-12.
    """
    small = ["data.max_train=48", "data.max_test=16", "model.feature_map=mobilenet_v3_small"]
    _, one, m1 = run(tmp_path, "tv1", *small)
    _, four, m4 = run(tmp_path, "tv4", *small, "partition.kind=dirichlet", "partition.num_clients=4",
                      "partition.alpha=0.3")
    assert one["feature_dim"] == four["feature_dim"] == 1024  # mobilenet_v3_small's penultimate width
    assert rel_err(weights_of(m4), weights_of(m1)) < 1e-6
    assert four["final_accuracy"] == one["final_accuracy"]
