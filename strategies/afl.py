"""AFL: Analytic Federated Learning (Zhuang et al., "AFL: A Single-Round Analytic Approach for Federated Learning
with Pre-trained Models", arXiv 2405.16240; official code github.com/ZHUANGHP/Analytic-federated-learning).

A frozen feature map phi gives each client k the rows X_k = phi(its data) and one-hot labels Y_k. In a single
round every client uploads either its raw statistics (C_k = X_k^T X_k, Q_k = X_k^T Y_k) or, as in the paper, its
local ridge solution W_k = (C_k + gamma I)^-1 Q_k together with C_k^r = C_k + gamma I. The server applies the
Absolute Aggregation law with the Regularization Intermediary:

    sum_k C_k^r = X^T X + K gamma I,        sum_k C_k^r W_k = X^T Y          (K = clients that answered)

    target "ridge" (default):     W = (X^T X + gamma I)^-1 X^T Y      remove (K - 1) gamma I; Cholesky solve
    target "least-squares":       W = (X^T X)^+ X^T Y                 remove all K gamma I (minimum-norm lstsq)

Both targets are weight-invariant: W is the centralized solution on the union of the answering clients' data,
whatever the split (IID, Dirichlet, shards, empty clients, any K). The paper's published numbers come from the
official code, whose `clean_regularization` removes all K gamma I, i.e. the "least-squares" target; fedsim defaults
to "ridge" because it stays well posed when X^T X is (near) singular (d > n, duplicated features).

The server folds each reply into running sums as it arrives (`ctx.stream`; memory O(d^2) for any number of
clients), solves once (O(K d^2 + d^3), against the official pairwise O(K d^3)), and evaluates on the test set.
Clients that fail or time out are left out; the result is then exactly the solution on the clients that
answered, and `dropped_clients` is reported. The saved model (`model.pt`) is the feature map followed by a linear
head holding W: `torch.load(run_dir / "model.pt", weights_only=False)(x).argmax(1)` predicts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.analytic import one_hot
from fedsim.engine import ServerContext
from fedsim.errors import FedsimError
from fedsim.algorithms.afl.learner import AFLLearner
from fedsim.algorithms.afl import protocol
from fedsim.algorithms.afl.protocol import AFLParams
from fedsim.nn.training import per_class_accuracy


class AllClientsFailed(FedsimError):
    """No client answered, so there is nothing to solve."""


def features_of(feature_map, x, batch_size: int) -> np.ndarray:  # noqa: ANN001
    """phi(x) as a float64 (n, d) array (float64 arithmetic where the map allows), `batch_size` rows at a time."""
    out = np.empty((len(x), int(feature_map.dim)), dtype=np.float64)
    for start in range(0, len(x), batch_size):
        out[start:start + batch_size] = feature_map(x[start:start + batch_size], dtype=torch.float64).numpy()
    return out


def evaluate_weights(weights: np.ndarray, feature_map, data, batch_size: int) -> dict[str, float]:  # noqa: ANN001
    """Accuracy and mean squared error (the ridge objective's data term) of argmax(phi(x) W) on `data`."""
    if len(data) == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "class_accuracy": None}
    scores = features_of(feature_map, data.x, batch_size) @ weights
    labels = data.labels
    targets = one_hot(labels, weights.shape[1])
    pred = scores.argmax(axis=1)
    return {"accuracy": float(np.mean(pred == labels)),
            "loss": float(np.mean(np.sum((scores - targets) ** 2, axis=1))),
            "class_accuracy": per_class_accuracy(pred, labels, weights.shape[1])}


class ToDouble(nn.Module):
    """Casts features to float64, so the saved head computes exactly what the server evaluated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def afl_module(feature_map, weights: np.ndarray) -> nn.Sequential:  # noqa: ANN001
    """The trained model as one torch module: the frozen feature map, then a bias-free float64 linear head (W).

    `model(x.double())` reproduces the server's float64 evaluation for the identity and random maps.
    """
    head = nn.Linear(weights.shape[0], weights.shape[1], bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights.T)))
    return nn.Sequential(copy.deepcopy(feature_map.module).cpu(), nn.Flatten(1), ToDouble(), head)


class AFLServer:
    """One round: stream the clients' uploads into the AA-law sums, solve, evaluate, save."""

    def __init__(self, params: AFLParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        p = self.params
        ctx.set_total_steps(1)
        feature_map = ctx.feature_map()
        dim = int(feature_map.dim)
        learner = AFLLearner(gamma=p.gamma, target=p.target)
        errors: list[str] = []
        aggregate_seconds = 0.0
        t_round = time.perf_counter()
        for reply in ctx.stream(protocol.request(p), round=1):  # fold each reply in as it arrives, then drop it
            if reply.error:
                errors.append(reply.error)
            if reply.ok and reply.partition_ids:
                t0 = time.perf_counter()
                learner.add_reply(protocol.parse_reply(reply.content)[0], clients=len(reply.partition_ids))
                aggregate_seconds += time.perf_counter() - t0
        exchange = ctx.last_exchange
        answered = exchange.answered
        dropped = sorted(exchange.failed + exchange.silent)  # failed clients and silent nodes (timeout)
        if not answered:
            detail = f" (first error: {errors[0]})" if errors else ""
            raise AllClientsFailed(f"AFL: none of the {len(ctx.partition_ids)} clients answered{detail}")
        collect_seconds = time.perf_counter() - t_round
        t0 = time.perf_counter()
        weights = learner.solve().coef_
        solve_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        test = ctx.test_data()
        result = evaluate_weights(weights, feature_map, test, p.batch_size)
        evaluate_seconds = time.perf_counter() - t0
        module = afl_module(feature_map, weights)
        ctx.log(1, accuracy=result["accuracy"], loss=result["loss"], dropped_clients=len(dropped),
                answered_clients=len(answered), **ctx.client_accuracy(result["class_accuracy"], model=module))
        ctx.save_model(module)  # the engine's clients.csv lists each client's samples, bytes and failure
        ctx.summary(final_accuracy=result["accuracy"], test_loss=result["loss"], dropped_clients=len(dropped),
                    answered_clients=len(answered), dropped_client_ids=sorted(dropped),
                    train_samples=int(learner.n_samples_), feature_dim=dim, gamma=p.gamma, target=p.target,
                    upload=p.upload, collect_seconds=round(collect_seconds, 4),
                    aggregate_seconds=round(aggregate_seconds, 4), solve_seconds=round(solve_seconds, 4),
                    evaluate_seconds=round(evaluate_seconds, 4))
