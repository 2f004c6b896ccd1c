"""SDC, LDC, FeCAM, online EWC and reservoir ER (issue #25): each update rule against a hand computation on small
data, the federated sums against the centralized statistics, field-named errors, and one short real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_config_error_names, fmnist_slice, scenario_config
from fedsim.algorithms.er.learner import reservoir_update
from fedsim.algorithms.ewc.learner import accumulate_fisher, ewc_penalty, fisher_from_sums, fisher_sums
from fedsim.algorithms.fecam.learner import FeCAM, fecam_sums, normalize_covariance, shrink_covariance, tukey
from fedsim.algorithms.ldc.learner import fit_projector, initial_projector
from fedsim.algorithms.sdc.learner import PrototypeNCM, class_sums, drift_sums, sdc_shift


def official_displacement(y1: np.ndarray, y2: np.ndarray, embedding_old: np.ndarray, sigma: float) -> np.ndarray:
    """The official LwF + SDC (github alviur/ldc, LDC_supervised/models/lwf.py: displacement), verbatim math."""
    dy = y2 - y1
    distance = np.sum((np.tile(y1[None, :, :], [embedding_old.shape[0], 1, 1])
                       - np.tile(embedding_old[:, None, :], [1, y1.shape[0], 1])) ** 2, axis=2)
    w = np.exp(-distance / (2 * sigma ** 2)) + 1e-5
    w_norm = w / np.tile(np.sum(w, axis=1)[:, None], [1, w.shape[1]])
    return np.sum(np.tile(w_norm[:, :, None], [1, 1, dy.shape[1]]) * np.tile(dy[None, :, :], [w.shape[0], 1, 1]),
                  axis=1)


# ------------------------------------------------------------------------------------------------------ SDC
def test_sdc_shift_is_the_kernel_weighted_drift_by_hand():
    old = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    new = old + np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    proto = np.array([[0.0, 0.0]])
    sums = drift_sums(old, new, proto, sigma=1.0, floor=0.0)
    w = np.array([1.0, np.exp(-0.5), np.exp(-2.0)])  # exp(-||z_old - mu||^2 / 2): distances 0, 1, 4
    expected = (w[0] * np.array([1.0, 0.0]) + w[1] * np.array([0.0, 1.0]) + w[2] * np.array([2.0, 2.0])) / w.sum()
    np.testing.assert_allclose(sdc_shift(sums)[0], expected, rtol=1e-14)
    np.testing.assert_allclose(sums["weight"], [w.sum()], rtol=1e-14)
    # the floor: with sigma tiny every kernel but the exact match underflows and the floor shares the rest
    tiny = drift_sums(old, new, proto, sigma=1e-3, floor=1e-5)
    np.testing.assert_allclose(sdc_shift(tiny)[0], (np.array([1.0, 0.0]) * (1 + 1e-5) + 1e-5 * np.array([2.0, 3.0]))
                               / (1 + 3e-5), rtol=1e-12)
    # no weight at all (floor 0, everything underflowed): the prototype is not moved, no NaN
    far = drift_sums(old, new, np.array([[100.0, 100.0]]), sigma=0.1, floor=0.0)
    assert far["weight"][0] == 0.0 and np.all(sdc_shift(far) == 0.0)


def test_sdc_matches_the_official_displacement_and_its_sums_add_over_clients():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(60, 5)) * 0.3
    new = old @ (np.eye(5) + 0.1 * rng.normal(size=(5, 5))) + 0.05
    protos = rng.normal(size=(4, 5)) * 0.3
    whole = drift_sums(old, new, protos, sigma=0.3, floor=1e-5)
    np.testing.assert_allclose(sdc_shift(whole), official_displacement(old, new, protos, 0.3), rtol=1e-12, atol=1e-15)
    parts = [drift_sums(old[s], new[s], protos, 0.3, 1e-5) for s in (slice(0, 7), slice(7, 31), slice(31, 60))]
    summed = {k: sum(p[k] for p in parts) for k in whole}
    np.testing.assert_allclose(sdc_shift(summed), sdc_shift(whole), rtol=1e-12, atol=1e-15)


def test_prototype_ncm_means_shifts_maps_and_normalized_nearest_mean():
    z = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    y = np.array([5, 5, 7, 7])
    counts, sums = class_sums(z, y, [5, 7])
    ncm = PrototypeNCM().add_classes([5, 7], counts, sums)
    np.testing.assert_array_equal(ncm.matrix(), [[3.0, 0.0], [0.0, 2.0]])
    # nearest mean after L2 normalization of both: direction, not length, decides
    assert ncm.predict(np.array([[100.0, 1.0], [0.01, 0.02]])).tolist() == [5, 7]
    ncm.shift([7], np.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(ncm.matrix([7]), [[1.0, 1.0]])
    ncm.transform(np.array([[0.0, 1.0], [1.0, 0.0]]))  # mu <- mu M: swap coordinates
    np.testing.assert_array_equal(ncm.matrix(), [[0.0, 3.0], [1.0, 1.0]])


# ------------------------------------------------------------------------------------------------------ LDC
def test_ldc_first_adam_step_by_hand_and_least_squares_limit():
    rng = np.random.default_rng(1)
    x_old = rng.normal(size=(16, 3)).astype(np.float32)
    x_new = rng.normal(size=(16, 3)).astype(np.float32)
    w0 = initial_projector(3, seed=4)
    assert np.all(np.abs(w0) <= 1 / np.sqrt(3)) and np.array_equal(w0, initial_projector(3, seed=4))
    # one full batch, one Adam step: m_hat / sqrt(v_hat) = g / |g|, so W1 = W0 - lr g / (|g| + eps)
    w0f = w0.astype(np.float32).astype(np.float64)
    g = 2.0 / (16 * 3) * x_old.T.astype(np.float64) @ (x_old @ w0f - x_new)  # d mean((X W - Y)^2) / dW
    w1 = fit_projector(x_old, x_new, w0, epochs=1, lr=1e-3, batch_size=16, seed=0)
    np.testing.assert_allclose(w1, w0f - 1e-3 * g / (np.abs(g) + 1e-8), atol=1e-6)
    # an exactly linear drift is recovered: W -> A
    a = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.2, 0.0, 0.8]])
    x = rng.normal(size=(256, 3)).astype(np.float32)
    w = fit_projector(x, x @ a, w0, epochs=200, lr=1e-2, batch_size=64, seed=0)
    np.testing.assert_allclose(w, a, atol=2e-3)


# ---------------------------------------------------------------------------------------------------- FeCAM
def test_fecam_shrinkage_and_normalization_by_hand():
    cov = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, -2.0], [0.0, -2.0, 3.0]])
    # V1 = mean diag = 3; V2 = mean of the non-zero off-diagonal entries (1, 1, -2, -2) = -0.5
    expected = cov + 3.0 * np.eye(3) - 0.5 * (np.ones((3, 3)) - np.eye(3))
    np.testing.assert_allclose(shrink_covariance(cov), expected, rtol=1e-15)
    np.testing.assert_allclose(shrink_covariance(cov, alpha1=2.0, alpha2=0.0), cov + 6.0 * np.eye(3), rtol=1e-15)
    corr = normalize_covariance(expected)
    np.testing.assert_allclose(np.diag(corr), 1.0)
    np.testing.assert_allclose(corr[0, 1], expected[0, 1] / np.sqrt(expected[0, 0] * expected[1, 1]), rtol=1e-15)


def _features(n: int = 300, d: int = 6, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    return np.maximum(rng.normal(size=(c, d))[y] + rng.normal(size=(n, d)), 0.0) + 0.05, y  # post-ReLU-like


def test_fecam_mahalanobis_decision_equals_the_official_computation():
    z, y = _features()
    learner = FeCAM().partial_fit(fecam_sums(z, y, [0, 1, 2]))
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(size=(40, 6))) + 0.01
    expected = np.empty((40, 3))
    for c in range(3):  # models/base.py + utils/maha_utils.py, in float64
        t = np.sqrt(z[y == c])
        cov = np.cov(t.T)
        for _ in range(2):
            cov = shrink_covariance(cov)
        sd = np.sqrt(np.diag(cov))
        cov = cov / np.outer(sd, sd)
        mu = np.sqrt(z[y == c].mean(axis=0))
        u = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
        u = np.sqrt(u)
        diff = u / np.linalg.norm(u, axis=1, keepdims=True) - mu / np.linalg.norm(mu)
        expected[:, c] = -np.einsum("nd,de,ne->n", diff, np.linalg.pinv(cov), diff)
        np.testing.assert_allclose(learner.covariances_[c], cov, rtol=1e-10)
    np.testing.assert_allclose(learner.decision_function(x), expected, rtol=1e-9)
    assert np.array_equal(learner.predict(x), np.argmax(expected, axis=1))
    np.testing.assert_allclose(tukey(np.array([4.0, 9.0])), [2.0, 3.0])


def test_fecam_federated_sums_equal_the_centralized_fit():
    z, y = _features(n=600, seed=5)
    central = FeCAM().partial_fit(fecam_sums(z, y, [0, 1, 2]))
    splits = np.array_split(np.random.default_rng(0).permutation(len(y)), 4)
    parts = [fecam_sums(z[s], y[s], [0, 1, 2]) for s in splits]
    summed = {k: (parts[0][k] if k == "classes" else sum(p[k] for p in parts)) for k in parts[0]}
    federated = FeCAM().partial_fit(summed)
    assert np.array_equal(federated.counts_, central.counts_)
    np.testing.assert_allclose(federated.prototypes_, central.prototypes_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(federated.covariances_, central.covariances_, rtol=1e-8, atol=1e-12)
    x, _ = _features(n=50, seed=9)
    np.testing.assert_allclose(federated.decision_function(x), central.decision_function(x), rtol=1e-8)


# ------------------------------------------------------------------------------------------------------ EWC
def test_ewc_fisher_of_batch_gradients_by_hand():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0], [0.0, 0.3], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-1.0, 0.0], [2.0, 1.0]])
    y = torch.tensor([0, 2, 1, 0])
    sums, batches = fisher_sums(model, x, y, nn.functional.cross_entropy, batch_size=2, seed=0)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    expected = np.zeros((3, 2))
    w = model.weight.detach().double().numpy()
    for idx in (perm[:2].numpy(), perm[2:].numpy()):  # batch-mean CE gradient: (softmax - onehot)^T x / b
        xb, yb = x.double().numpy()[idx], y.numpy()[idx]
        logits = xb @ w.T
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - np.eye(3)[yb]).T @ xb / len(idx)
        expected += grad ** 2
    assert batches == 2
    np.testing.assert_allclose(sums["weight"], expected, rtol=1e-5)
    clipped = fisher_from_sums(sums, batches, fisher_max=1e-2)
    np.testing.assert_allclose(clipped["weight"], np.minimum(expected / 2, 1e-2), rtol=1e-5)


def test_ewc_online_accumulation_and_penalty_by_hand():
    f1 = {"w": np.array([1.0, 4.0])}
    f2 = {"w": np.array([3.0, 0.0])}
    assert accumulate_fisher(None, f1, 0, 2)["w"].tolist() == [1.0, 4.0]
    # PyCIL: alpha = known / total = 2 / 4
    np.testing.assert_allclose(accumulate_fisher(f1, f2, 2, 4)["w"], [2.0, 2.0])
    # Schwarz et al.: gamma F + F_t
    np.testing.assert_allclose(accumulate_fisher(f1, f2, 2, 4, gamma=0.5)["w"], [3.5, 2.0])
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 4.0]]))
    fisher = {"weight": torch.tensor([[1.0, 2.0]])}
    anchor = {"weight": torch.tensor([[1.0, 1.0]])}
    penalty = ewc_penalty(model, fisher, anchor, lam=10.0)
    assert penalty.item() == pytest.approx(0.5 * 10.0 * (1.0 * 1.0 + 2.0 * 9.0))
    penalty.backward()  # d/dtheta = lambda F (theta - theta*)
    np.testing.assert_allclose(model.weight.grad.numpy(), [[10.0, 60.0]])


# ------------------------------------------------------------------------------------------------------- ER
def test_reservoir_size_and_inclusion_probability():
    rng = np.random.default_rng(0)
    buf, seen = reservoir_update([], 0, np.arange(3), 5, rng)
    assert buf.tolist() == [0, 1, 2] and seen == 3  # not full: everything enters
    buf, seen = reservoir_update(buf, seen, np.arange(3, 20), 5, rng)
    assert len(buf) == 5 and seen == 20 and len(set(buf.tolist())) == 5
    trials = 4000
    hits = np.zeros(20)
    for k in range(trials):  # in two offers (tasks), as a client does: every item kept with probability 5 / 20
        r = np.random.default_rng(100 + k)
        b, s = reservoir_update([], 0, np.arange(8), 5, r)
        b, _ = reservoir_update(b, s, np.arange(8, 20), 5, r)
        hits[b] += 1
    np.testing.assert_allclose(hits / trials, 0.25, atol=0.03)  # binomial sd 0.007


# ------------------------------------------------------------------------------------------- configuration
ONE_CLIENT = 'kind = "iid"\nnum_clients = 1'
TWO_CLIENTS = 'kind = "iid"\nnum_clients = 2'
BASE = f"""
seed = 0
{fmnist_slice(600, 300, ONE_CLIENT)}
[stream]
kind = "class-incremental"
tasks = 2
[model]
name = "cnn"
width = 8
[simulation]
backend = "inline"
[strategy]
name = "sdc"
"""


@pytest.mark.parametrize("override,field,fragment", [
    ("strategy.sigma=0", "strategy.sigma", "must be a finite number > 0"),
    ("strategy.floor=-1", "strategy.floor", "must be a finite number >= 0"),
    ('strategy.name="ldc";strategy.projector_epochs=0', "strategy.projector_epochs", "an integer >= 1"),
    ('strategy.name="ldc";strategy.projector_lr=0', "strategy.projector_lr", "> 0"),
    ('strategy.name="fecam";strategy.beta=-0.5', "strategy.beta", ">= 0"),
    ('strategy.name="fecam";strategy.shrink_times=1.5', "strategy.shrink_times", "an integer"),
    ('strategy.name="ewc";strategy.ewc_lambda=-1', "strategy.ewc_lambda", ">= 0"),
    ('strategy.name="ewc";strategy.fisher_max=0', "strategy.fisher_max", "> 0"),
    ('strategy.name="er";strategy.buffer_size=0', "strategy.buffer_size", "an integer >= 1"),
    ('strategy.name="er";strategy.replay_batch_size=0', "strategy.replay_batch_size", "an integer >= 1"),
    ('strategy.name="er";strategy.buffer=10', "strategy.buffer", "unknown setting"),
])
def test_bad_parameters_name_the_field(tmp_path, override, field, fragment):
    assert_config_error_names(field, fragment, lambda: scenario_config(BASE, tmp_path, *override.split(";")))


# --------------------------------------------------------------------------------------------- a real run
def test_short_fashion_mnist_runs(tmp_path):
    """Each method end to end on 2,000 Fashion-MNIST images, 2 clients, 2 tasks (6 + 4 classes)."""
    from fedsim.engine.runner import run_scenario

    text = f"""
seed = 0
{fmnist_slice(2000, 1000, TWO_CLIENTS)}
[stream]
kind = "class-incremental"
tasks = 2
first_task_classes = 6
[model]
name = "cnn"
width = 8
[client]
epochs = 2
batch_size = 64
lr = 0.05
[simulation]
backend = "inline"
[strategy]
name = "sdc"
"""
    results = {}
    for name, extra in (("sdc", []), ("ldc", ["strategy.projector_epochs=2"]), ("fecam", []), ("ewc", []),
                        ("er", ["strategy.buffer_size=200"])):
        config = scenario_config(text, tmp_path, f'strategy.name="{name}"', *extra)
        results[name] = run_scenario(config, tmp_path / name, show_progress=False)
        assert results[name]["status"] == "completed"
    # the first task (6 classes) is learned by every method; FeCAM's frozen backbone keeps it
    for name, summary in results.items():
        matrix = json.loads((tmp_path / name / "summary.json").read_text())
        assert matrix["num_tasks"] == 2
    assert results["fecam"]["final_accuracy"] > 0.5
    assert results["sdc"]["final_accuracy"] > 0.3 and results["ldc"]["final_accuracy"] > 0.3
    er = json.loads((tmp_path / "er" / "summary.json").read_text())
    assert er["uses_exemplars"] is True and er["exemplars"] == 400  # 200 per client, both full
    import pandas as pd

    sdc = pd.read_csv(tmp_path / "sdc" / "metrics.csv")
    assert "acc_ncm_frozen" in sdc and np.isfinite(sdc["sdc_shift_norm"].iloc[-1])
