"""FuseFL's head recalibration (CCVR-style, the official `locals/ccvr.py`): class moments, their pooling (correct
and the official form), virtual features, and the head trained on them against the Bayes-optimal rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.analytic import ClassStatistics
from fedsim.frameworks.oneshot import pooled_class_gaussians, recalibrate_head, recalibrated_head, virtual_features
from fedsim.frameworks.oneshot_protocol import RecalibrationParams, pack_class_statistics, unpack_class_statistics


def _moments(x, y, num_classes):
    """Class count, mean and centred scatter of (x, y), as a client computes them for the recalibrated head."""
    return ClassStatistics.zeros(x.shape[1], num_classes, track_scatter=True).update(x, y)


def _clients(rng, num_classes=4, dim=5, sizes=((0, 30, 2, 0), (7, 0, 50, 1), (40, 9, 0, 0))):
    """Three clients' features and labels with skewed, partly missing classes (class 3 has 1 sample)."""
    out = []
    for counts in sizes:
        xs, ys = [], []
        for c, n in enumerate(counts):
            xs.append(rng.normal(loc=c, scale=1.0 + c, size=(n, dim)) @ rng.normal(size=(dim, dim)))
            ys.append(np.full(n, c))
        out.append((np.concatenate(xs), np.concatenate(ys)))
    return out


def test_pooled_covariance_equals_numpys_unbiased_estimate_on_the_pooled_data():
    rng = np.random.default_rng(0)
    data = _clients(rng)
    parts = [_moments(x, y, 4) for x, y in data]
    # batches merged one at a time give the same moments as one pass
    batched = ClassStatistics.zeros(5, 4, track_scatter=True)
    x0, y0 = data[0]
    for i in range(0, len(y0), 7):
        batched.update(x0[i:i + 7], y0[i:i + 7])
    np.testing.assert_allclose(batched.scatter, parts[0].scatter, rtol=1e-12, atol=1e-9)
    count, mean, cov = pooled_class_gaussians(parts, "unbiased")
    x = np.concatenate([d[0] for d in data])
    y = np.concatenate([d[1] for d in data])
    for c in range(3):
        xc = x[y == c]
        assert count[c] == len(xc)
        np.testing.assert_allclose(mean[c], xc.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cov[c], np.cov(xc, rowvar=False, ddof=1), rtol=1e-10, atol=1e-10)
    assert count[3] == 1 and np.all(cov[3] == 0)  # one feature: no covariance


def test_wire_form_carries_the_classes_present_and_round_trips():
    rng = np.random.default_rng(1)
    (x, y), *_ = _clients(rng)
    moments = _moments(x, y, 4)
    arrays = pack_class_statistics(moments)
    assert arrays["classes"].tolist() == [1, 2]  # client 0 holds classes 1 and 2 only
    assert arrays["scatter"].shape == (2, 5 * 6 // 2) and arrays["scatter"].dtype == np.float64
    back = unpack_class_statistics(arrays, 4, 5)
    np.testing.assert_array_equal(back.count, moments.count)
    np.testing.assert_allclose(back.mean, moments.mean, rtol=0, atol=0)
    np.testing.assert_allclose(back.scatter, moments.scatter, rtol=0, atol=0)


def _official_pooled_covariance(data, num_classes):
    """`compute_classes_mean_cov` of FuseFL's locals/ccvr.py, transcribed with torch (its bug included)."""
    means, covs, counts = [], [], []
    for x, y in data:
        f, t = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
        m, c, n = [], [], []
        for k in range(num_classes):
            fea = f[t == k]
            if fea.shape[0] > 0:
                m.append(fea.mean(dim=0))
                c.append(torch.cov(fea.t(), correction=0))
            else:
                m.append(torch.zeros(f.shape[1], dtype=torch.float64))
                c.append(torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64))
            n.append(int(fea.shape[0]))
        means.append(m)
        covs.append(c)
        counts.append(n)
    labels_count = [sum(cnts) for cnts in zip(*counts)]
    out = []
    for k in range(num_classes):
        w = torch.tensor([counts[i][k] for i in range(len(data))], dtype=torch.float64) / labels_count[k]
        mean = torch.sum(torch.stack([means[i][k] for i in range(len(data))], dim=-1) * w, dim=-1)
        cov = torch.zeros_like(covs[0][k])
        for i in range(len(data)):
            cov += (counts[i][k] - 1) / (labels_count[k] - 1) * covs[i][k] + \
                (counts[i][k] / (labels_count[k] - 1)) * (means[i][k].unsqueeze(1) @ means[i][k].unsqueeze(0))
        cov -= (labels_count[k] / labels_count[k] - 1) * (mean.unsqueeze(1) @ mean.unsqueeze(0))
        out.append(cov.numpy())
    return np.stack(out)


def test_official_option_reproduces_the_official_pooling_and_its_missing_centring():
    rng = np.random.default_rng(2)
    data = _clients(rng, sizes=((0, 30, 2, 4), (7, 0, 50, 3), (40, 9, 0, 0)))
    parts = [_moments(x, y, 4) for x, y in data]
    _, mean, official = pooled_class_gaussians(parts, "official")
    np.testing.assert_allclose(official, _official_pooled_covariance(data, 4), rtol=1e-10, atol=1e-10)
    _, _, unbiased = pooled_class_gaussians(parts, "unbiased")
    # official - unbiased = N/(N-1) mu mu^T (the mean term never subtracted) - sum_k S_k / (n_k (N-1)) (biased
    # client covariances weighted as if they were unbiased)
    n = sum(p.count for p in parts).astype(np.float64)
    outer = np.einsum("ci,cj->cij", mean, mean) * (n / (n - 1))[:, None, None]
    shrink = sum(np.where(p.count[:, None, None] > 0, p.scatter / np.maximum(p.count, 1)[:, None, None], 0.0)
                 for p in parts) / (n - 1)[:, None, None]
    np.testing.assert_allclose(official[:3], (unbiased + outer - shrink)[:3], rtol=1e-9, atol=1e-9)
    assert not np.allclose(official, unbiased)


def test_virtual_features_follow_the_class_gaussians_and_skip_absent_classes():
    count = np.array([3, 0, 5])
    mean = np.array([[1.0, -2.0], [0.0, 0.0], [4.0, 4.0]])
    cov = np.array([[[1.0, 0.5], [0.5, 2.0]], np.eye(2), [[0.2, 0.0], [0.0, 0.1]]])
    x, y = virtual_features(count, mean, cov, 20000, seed=3)
    assert x.dtype == np.float32 and set(np.unique(y)) == {0, 2} and len(y) == 40000
    for c in (0, 2):
        np.testing.assert_allclose(x[y == c].mean(axis=0), mean[c], atol=0.05)
        np.testing.assert_allclose(np.cov(x[y == c], rowvar=False), cov[c], atol=0.05)
    again, _ = virtual_features(count, mean, cov, 20000, seed=3)
    np.testing.assert_array_equal(x, again)  # seeded: every process draws the same set


def test_recalibrated_head_recovers_the_bayes_optimal_linear_rule():
    """Three Gaussian classes with a shared covariance, equal priors: the Bayes rule is linear,
    argmax_c x^T S^-1 mu_c - mu_c^T S^-1 mu_c / 2. The clients each hold two classes; the head recalibrated on
    virtual features from their pooled statistics must recover that rule (up to the logits' common shift)."""
    rng = np.random.default_rng(4)
    dim, num_classes = 3, 3
    mu = 2 * np.array([[0.0, 0.0, 0.0], [2.0, 0.5, -1.0], [-1.0, 2.0, 1.0]])  # Bayes accuracy 0.948
    a = rng.normal(size=(dim, dim))
    sigma = a @ a.T / dim + 0.5 * np.eye(dim)
    chol = np.linalg.cholesky(sigma)

    def draw(c, n):
        return mu[c] + rng.normal(size=(n, dim)) @ chol.T

    holdings = [(0, 1), (1, 2), (0, 2)]  # label skew: no client sees all classes
    parts = []
    for classes in holdings:
        x = np.concatenate([draw(c, 3000) for c in classes])
        y = np.repeat(classes, 3000)
        parts.append(_moments(x, y, num_classes))
    head = nn.Sequential(nn.Linear(dim, num_classes))
    with torch.no_grad():  # a head fitted to something else entirely
        head[0].weight.normal_(0, 3)
        head[0].bias.normal_(0, 3)
    params = RecalibrationParams(virtual_per_class=5000, recalibration_epochs=30, recalibration_lr=0.05,
                                 recalibration_momentum=0.9)
    new, facts = recalibrated_head(head, parts, params, seed=5)
    assert facts == {"recalibration_classes": 3, "virtual_features": 15000,
                     "recalibration_loss": pytest.approx(facts["recalibration_loss"])}

    inv = np.linalg.inv(sigma)
    w_bayes = mu @ inv  # (c, d)
    b_bayes = -0.5 * np.einsum("cd,de,ce->c", mu, inv, mu)
    w = new[0].weight.detach().double().numpy()
    b = new[0].bias.detach().double().numpy()
    # logits are identified up to a common shift: compare differences to class 0
    dw, dw_bayes = w[1:] - w[0], w_bayes[1:] - w_bayes[0]
    db, db_bayes = b[1:] - b[0], b_bayes[1:] - b_bayes[0]
    assert np.linalg.norm(dw - dw_bayes) / np.linalg.norm(dw_bayes) < 0.1
    np.testing.assert_allclose(db, db_bayes, atol=0.25 * np.abs(db_bayes).max())
    test_y = np.repeat(np.arange(num_classes), 20000)
    test_x = np.concatenate([draw(c, 20000) for c in range(num_classes)])
    bayes = (test_x @ w_bayes.T + b_bayes).argmax(1)
    with torch.no_grad():
        pred = new(torch.as_tensor(test_x, dtype=torch.float32)).argmax(1).numpy()
    assert np.mean(pred == bayes) > 0.99
    assert np.mean(pred == test_y) >= np.mean(bayes == test_y) - 0.005


def test_recalibrate_head_trains_only_the_last_linear_layer_of_a_copy():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x = np.random.default_rng(6).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    new, loss = recalibrate_head(head, x, y, epochs=1, lr=0.01, batch_size=128, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())  # the original is untouched
    assert not torch.equal(new[2].weight, head[2].weight) and np.isfinite(loss)
    # one epoch of plain SGD at lr 0.01 on one batch: exactly one step w - lr * grad
    fc = nn.Linear(4, 2)
    fc.load_state_dict(head[2].state_dict())
    nn.functional.cross_entropy(fc(torch.as_tensor(x)), torch.as_tensor(y)).backward()
    with torch.no_grad():
        torch.testing.assert_close(new[2].weight, head[2].weight - 0.01 * fc.weight.grad)
