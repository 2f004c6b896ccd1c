"""AEF-OCL: Analytic Exemplar-Free Online Continual Learning (Zhuang et al., "Online Analytic Exemplar-Free Continual
Learning with Large Models for Imbalanced Autonomous Driving Task", arXiv 2405.17779; official code
github.com/ZHUANGHP/Analytic-continual-learning), centralized and federated.

Frozen backbone f (the scenario's `model.feature_map`), frozen buffer layer h = act(f(x) B) (seeded Gaussian B,
width `buffer_width`), linear classifier W learned in one pass over an online stream of mini-batches, exactly:

    R_0 = I / gamma,  R_t = R_{t-1} - R_{t-1} H_t^T (I + H_t R_{t-1} H_t^T)^-1 H_t R_{t-1},
    W_t = W_{t-1} + R_t H_t^T (Y_t - H_t W_{t-1})          =>  W_t = (H^T H + gamma I)^-1 H^T Y on all seen data,

new classes appending zero columns, no exemplars, memory O(d^2). The Pseudo-Features Generator (PFG) keeps per
class the count n_c, mean mu_c and unbiased variance s_c^2 of the backbone features (recursively) and, at a
balancing point, tops every seen class up to max_c n_c (`balance = "max"`; `"mean"`: the mean count) with
pseudo-features ~ N(mu_c, (noise s_c)^2) pushed through the buffer layer and the same least-squares update, on a
copy (the real-data state is kept, nothing is stored). `draws` caps the number drawn per class (weighted so
effective counts stay balanced); None draws the whole deficit, as the paper. See `fedsim/learners/aef_ocl.py`.

Modes (`mode = "auto"`: federated when the partition has more than one client):

- centralized: the server runs the stream itself (the union of the clients' streams, in the order a federated
  server would fold them; with one client, simply its stream). Each batch is predicted before it is learned
  (prequential accuracy; with PFG by the balanced weights, refreshed every `balance_every` batches and whenever a
  new class appears), then learned by the RLS update. With PFG the real-data weights are only read at balancing
  points, so up to `defer_rows` rows are folded in by one (exact) RLS update instead of one per batch.
- federated (none of the published systems has it): every client runs its own stream. At synchronization round r
  the server sends the current global weights; each client predicts and learns the next `sync_every` batches of its
  stream and returns the segment's statistics increments (C = H^T H, Q = H^T Y, n, PFG class statistics), never
  weights or data. The server adds them (exactly as AFL's aggregation), so after every round its real-data weights
  equal the centralized learner's on the union of all streams so far; PFG statistics are merged too, so the
  imbalance is corrected globally. `rounds` is the number of rounds when `sync_every` is unset.

metrics.csv: one row every `eval_every` batches (centralized) or per round (federated): `prequential_accuracy` =
running prequential (predict-then-learn) accuracy over the stream so far, `prequential_mean_class_accuracy`,
`samples` (stream samples so far), and every `test_every` rows (and the last) `accuracy` / `mean_class_accuracy` of
the current model on the (class-balanced) test set, which `fedsim report` plots over the stream. Prequential accuracy
on a long-tailed, class-by-class stream rewards predicting the current head class (online SGD scores ~0.99 there
while forgetting everything else), so the test set is the comparison that matters. summary.json: `final_accuracy`
(test accuracy of the final model), `mean_class_accuracy`, `per_class_accuracy`, `samples_per_second` (stream
samples per second of learning: features, prediction, update, balancing; test evaluations excluded),
`prequential_accuracy`. model.pt: a torch module backbone -> buffer -> float64 head.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clients.aef_ocl import STATS_KEY, AEFOCLClient, from_record, learner_for, segment_request
from fedsim.engine import ServerContext, StrategySpec, register_strategy
from fedsim.engine.client import partition_for, scenario_streams
from fedsim.errors import ConfigError, FedsimError
from fedsim.features import ACTIVATIONS
from fedsim.learners.aef_ocl import BALANCE_RULES, PFG_SPACES, masked_predict
from fedsim.training import per_class_accuracy

MODES = ("auto", "centralized", "federated")


def _int_at_least(path: str, value, low: int) -> None:  # noqa: ANN001
    if value < low:
        raise ConfigError(f"{path}: {value!r} is out of range; it must be an integer >= {low}")


@dataclass
class OnlineParams:
    """Settings every online strategy on a stream shares (AEF-OCL, online-sgd, joint-ridge)."""

    buffer_width: int = 2048  # width d of the random buffer layer (the official code uses 8192)
    activation: str = "relu"  # buffer nonlinearity
    eval_every: int = 100  # centralized: stream batches between rows of metrics.csv
    test_every: int = 1  # rows of metrics.csv between test-set evaluations (the last row always has one)
    sync_every: int | None = None  # batches of each client's stream per federated round (None: split the longest
    # stream into `rounds`); centralized runs on several clients' streams take the union in that order

    def validate(self, path: str = "strategy") -> None:
        _int_at_least(f"{path}.buffer_width", self.buffer_width, 1)
        if self.sync_every is not None:
            _int_at_least(f"{path}.sync_every", self.sync_every, 1)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{path}.activation: {self.activation!r} is not allowed; choose one of "
                              f"{', '.join(map(repr, ACTIVATIONS))}")
        _int_at_least(f"{path}.eval_every", self.eval_every, 1)
        _int_at_least(f"{path}.test_every", self.test_every, 1)


def _check_gamma(path: str, gamma: float) -> None:
    if not (math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"{path}.gamma: {gamma!r} is out of range; it must be a finite number > 0")


@dataclass
class AEFOCLParams(OnlineParams):
    gamma: float = 1e-3  # ridge regularization (R_0 = I / gamma), the official default
    pfg: bool = True  # pseudo-features generator; false = the ACIL-style analytic learner (ablation)
    noise: float = 1.0  # pseudo-features ~ N(mu_c, (noise * std_c)^2)
    balance: str = "max"  # top every seen class up to the largest count ("max", paper) or the mean count
    draws: int | None = None  # pseudo-features drawn per class per balancing (None: the whole deficit, paper)
    pfg_space: str = "backbone"  # class statistics of the backbone features (official) or of the buffer features
    mode: str = "auto"  # "auto" | "centralized" | "federated"
    balance_every: int | None = None  # centralized + PFG: batches between refreshes of the balanced weights
    # (None: eval_every); a new class always triggers one
    defer_rows: int = 256  # centralized: stream rows folded into the RLS state at once when the real-data weights
    # are not read at every batch (PFG predicts with the balanced ones); exact; 0 = update at every batch

    def validate(self, path: str = "strategy") -> None:
        super().validate(path)
        _check_gamma(path, self.gamma)
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"{path}.noise: {self.noise!r} is out of range; it must be a finite number >= 0")
        for name, value, allowed in (("balance", self.balance, BALANCE_RULES), ("pfg_space", self.pfg_space,
                                                                                   PFG_SPACES), ("mode", self.mode, MODES)):
            if value not in allowed:
                raise ConfigError(f"{path}.{name}: {value!r} is not allowed; choose one of "
                                  f"{', '.join(map(repr, allowed))}")
        for name in ("draws", "balance_every"):
            value = getattr(self, name)
            if value is not None:
                _int_at_least(f"{path}.{name}", value, 1)
        _int_at_least(f"{path}.defer_rows", self.defer_rows, 0)


class StreamFailed(FedsimError):
    """Every client failed in a federated round, or the stream is empty."""


# --------------------------------------------------------------------------------------------- shared helpers
def online_streams(ctx: ServerContext) -> list:
    """The clients' online streams, exactly as `env.stream()` builds them on the clients."""
    if ctx.config.stream.kind != "online":
        raise ConfigError(f"stream.kind: {ctx.config.stream.kind!r}; {ctx.config.strategy.name} learns from an "
                          "online stream, set stream.kind = 'online'")
    return scenario_streams(ctx.config, partition_for(ctx.config))


def union_batches(streams: list, segment: int) -> list[np.ndarray]:
    """All clients' batches in the order a federated server folds them: round by round (`segment` batches per
    client per round), clients in partition order. With one client: its stream."""
    longest = max((len(s) for s in streams), default=0)
    out = []
    for start in range(0, longest, max(segment, 1)):
        for s in streams:
            out.extend(s.batches[start:start + segment])
    return out


def segment_length(params, streams: list, rounds: int) -> int:  # noqa: ANN001
    longest = max((len(s) for s in streams), default=0)
    return int(params.sync_every) if params.sync_every else max(1, -(-longest // max(rounds, 1)))


@contextlib.contextmanager
def server_threads(ctx: ServerContext) -> Iterator[None]:
    """Run the server's math on `simulation.num_cpus` BLAS and torch threads (as a client would), then restore.

    The per-batch updates are small, memory-bound products: on a busy 2-core machine oversubscribed BLAS threads
    made them 6x slower than one thread (measured: RLS at width 2048, batch 10, 57 vs 326 samples/s).
    """
    from threadpoolctl import threadpool_limits

    n = max(1, int(ctx.config.simulation.num_cpus))
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


class PrequentialMeter:
    """Running prequential (test-then-train) accuracy over the stream, overall and per class."""

    def __init__(self, num_classes: int) -> None:
        self.correct = np.zeros(num_classes, np.int64)
        self.total = np.zeros(num_classes, np.int64)

    def add(self, pred: np.ndarray, y: np.ndarray) -> None:
        np.add.at(self.total, y, 1)
        np.add.at(self.correct, y[pred == y], 1)

    def add_counts(self, correct: np.ndarray, total: np.ndarray) -> None:
        self.correct += np.asarray(correct, np.int64)
        self.total += np.asarray(total, np.int64)

    @property
    def samples(self) -> int:
        return int(self.total.sum())

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.total.sum()) if self.total.sum() else float("nan")

    @property
    def mean_class_accuracy(self) -> float:
        seen = self.total > 0
        return float(np.mean(self.correct[seen] / self.total[seen])) if seen.any() else float("nan")


class TestEvaluator:
    """Test-set metrics of buffer-feature models; the backbone + buffer features of the test set computed once."""

    def __init__(self, ctx: ServerContext, transform, batch_size: int = 1024) -> None:  # noqa: ANN001
        self.data = ctx.test_data()
        self.labels = self.data.labels
        fmap = ctx.feature_map()
        parts = [transform(fmap(self.data.x[s:s + batch_size], dtype=torch.float64))
                 for s in range(0, len(self.data), batch_size)]
        self.features = np.concatenate(parts) if parts else np.zeros((0, 0))
        self.seconds = 0.0

    def metrics(self, predict) -> dict:  # noqa: ANN001
        """{"accuracy", "mean_class_accuracy", "per_class_accuracy"} of `predict(H) -> labels` on the test set."""
        t0 = time.perf_counter()
        pred = np.asarray(predict(self.features))
        per_class = per_class_accuracy(pred, self.labels, self.data.num_classes)
        self.seconds += time.perf_counter() - t0
        return {"accuracy": float(np.mean(pred == self.labels)), "mean_class_accuracy": float(np.nanmean(per_class)),
                "per_class_accuracy": [None if np.isnan(a) else round(float(a), 6) for a in per_class]}


class OnlineRun:
    """Rows of metrics.csv for an online run: prequential accuracy each row, test metrics every `test_every`."""

    def __init__(self, ctx: ServerContext, params: OnlineParams, evaluator: TestEvaluator, total_rows: int) -> None:
        self.ctx, self.params, self.evaluator = ctx, params, evaluator
        self.total_rows = total_rows
        self.rows = 0
        self.best = float("-inf")
        self.last_test: dict = {}
        ctx.set_total_steps(total_rows)

    def row(self, step: int, meter: PrequentialMeter | None, predict, last: bool, **extra) -> None:  # noqa: ANN001
        """One row: prequential accuracy of `meter` (if any) and, when due, test metrics of `predict(H)`."""
        self.rows += 1
        values = {"accuracy": float("nan")}
        if meter is not None:
            values.update(prequential_accuracy=meter.accuracy,
                          prequential_mean_class_accuracy=meter.mean_class_accuracy, samples=meter.samples)
        values.update(extra)
        if last or self.rows % self.params.test_every == 0:
            self.last_test = self.evaluator.metrics(predict)
            self.best = max(self.best, self.last_test["accuracy"])
            values.update(accuracy=self.last_test["accuracy"],
                          mean_class_accuracy=self.last_test["mean_class_accuracy"])
        self.ctx.log(step, **values)

    def finish(self, meter: PrequentialMeter | None, samples: int, learn_seconds: float, **extra) -> None:  # noqa: ANN001
        """summary.json: the final test metrics, prequential accuracy, throughput, plus `extra`."""
        t = self.last_test
        values = dict(final_accuracy=t["accuracy"], best_accuracy=self.best,
                      mean_class_accuracy=t["mean_class_accuracy"], per_class_accuracy=t["per_class_accuracy"],
                      prequential_accuracy=meter.accuracy if meter is not None else None,
                      prequential_mean_class_accuracy=meter.mean_class_accuracy if meter is not None else None,
                      stream_samples=int(samples),
                      samples_per_second=round(samples / learn_seconds, 2) if learn_seconds > 0 else None,
                      learn_seconds=round(learn_seconds, 3), test_seconds=round(self.evaluator.seconds, 3),
                      buffer_width=self.params.buffer_width)
        values.update(extra)
        self.ctx.summary(**values)


class _Float64(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def linear_model(feature_map, buffer: nn.Module, weights: np.ndarray) -> nn.Sequential:  # noqa: ANN001
    """backbone -> flatten -> float64 -> buffer layer -> bias-free float64 head W: `model(x).argmax(1)` predicts."""
    head = nn.Linear(weights.shape[0], weights.shape[1], bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights.T)))
    return nn.Sequential(copy.deepcopy(feature_map.module).cpu(), nn.Flatten(1), _Float64(),
                         copy.deepcopy(buffer).double(), head)


# ------------------------------------------------------------------------------------------------ AEF-OCL
class AEFOCLServer:
    """Runs AEF-OCL on the scenario's online stream(s), centralized on the server or federated over the clients."""

    def __init__(self, params: AEFOCLParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        federated = self.params.mode == "federated" or (self.params.mode == "auto" and ctx.config.num_clients > 1)
        streams = online_streams(ctx)
        if not any(len(s) for s in streams):
            raise StreamFailed("the online stream is empty (no client holds any sample)")
        with server_threads(ctx):
            if federated:
                self._federated(ctx, streams)
            else:
                self._centralized(ctx, streams)

    def _centralized(self, ctx: ServerContext, streams: list) -> None:
        p = self.params
        num_classes = ctx.num_classes
        train, fmap = ctx.train_data(), ctx.feature_map()
        batches = union_batches(streams, segment_length(p, streams, ctx.config.rounds))
        learner = learner_for(p, ctx.config, num_classes, solver="recursive")
        learner.partial_fit(np.zeros((0, int(fmap.dim))), np.zeros(0, np.int64))
        evaluator = TestEvaluator(ctx, learner.transform)
        run = OnlineRun(ctx, p, evaluator, total_rows=-(-len(batches) // p.eval_every))
        meter = PrequentialMeter(num_classes)
        balance_every = p.balance_every or p.eval_every
        predict_w = learner.coef_.copy()
        balances, learn = 0, 0.0
        for t, idx in enumerate(batches, 1):
            t0 = time.perf_counter()
            y = train.labels[idx]
            new_class = bool(np.any(learner.class_counts_[y] == 0))
            x = fmap(train.x[idx], dtype=torch.float64)
            pred = learner.prequential_step(x, y, predict_w if p.pfg else None)
            meter.add(pred, y)
            if p.pfg and (new_class or t % balance_every == 0 or t == len(batches)):
                predict_w = learner.balanced_coef()
                balances += 1
            learn += time.perf_counter() - t0
            if t % p.eval_every == 0 or t == len(batches):  # the test set sees the freshly balanced weights
                run.row(t, meter, lambda h: masked_predict(h, learner.weights()), last=t == len(batches),
                        classes_seen=int(np.count_nonzero(learner.class_counts_)))
        weights = learner.weights()
        ctx.save_model(linear_model(fmap, learner.buffer_, weights))
        run.finish(meter, meter.samples, learn, mode="centralized", balances=balances, pfg=p.pfg, gamma=p.gamma,
                   class_counts=learner.class_counts_.tolist())

    def _federated(self, ctx: ServerContext, streams: list) -> None:
        p = self.params
        num_classes = ctx.num_classes
        fmap = ctx.feature_map()
        segment = segment_length(p, streams, ctx.config.rounds)
        lengths = [len(s) for s in streams]
        rounds = -(-max(lengths) // segment)
        learner = learner_for(p, ctx.config, num_classes, solver="statistics")
        learner.partial_fit(np.zeros((0, int(fmap.dim))), np.zeros(0, np.int64))
        evaluator = TestEvaluator(ctx, learner.transform)
        run = OnlineRun(ctx, p, evaluator, total_rows=rounds)
        meter = PrequentialMeter(num_classes)
        weights = learner.weights()
        learn, failed = 0.0, 0
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            start = (r - 1) * segment
            active = [pid for pid, n in enumerate(lengths) if n > start]
            answered = 0
            for reply in ctx.stream(segment_request(weights, start, segment), partitions=active, round=r):
                failed += len(reply.failed)
                if not (reply.ok and reply.partition_ids):
                    continue
                arrays = from_record(reply.content[STATS_KEY])
                meter.add_counts(arrays.pop("preq_correct"), arrays.pop("preq_total"))
                learner.merge(arrays, in_dim=int(fmap.dim))
                answered += len(reply.partition_ids)
            if answered == 0:
                raise StreamFailed(f"round {r}: none of the {len(active)} clients with stream left answered")
            weights = learner.weights()
            learn += time.perf_counter() - t0
            run.row(r, meter, lambda h, w=weights: masked_predict(h, w), last=r == rounds,
                    active_clients=len(active), answered_clients=answered,
                    classes_seen=int(np.count_nonzero(learner.class_counts_)))
        ctx.save_model(linear_model(fmap, learner.buffer_, weights))
        run.finish(meter, meter.samples, learn, mode="federated", sync_every=segment, sync_rounds=rounds,
                   pfg=p.pfg, gamma=p.gamma, failed_client_segments=failed, learned_samples=int(learner.n_seen_),
                   class_counts=learner.class_counts_.tolist())


def check_online(config) -> None:  # noqa: ANN001
    if config.stream.kind != "online":
        raise ConfigError(f"stream.kind: {config.stream.kind!r} is not supported by {config.strategy.name}, which "
                          "learns from a single-pass online stream; set stream.kind = 'online'")


register_strategy(StrategySpec(
    name="aef-ocl", params=AEFOCLParams, server=AEFOCLServer, client=AEFOCLClient, kind="continual",
    check=check_online,
    description="AEF-OCL (Zhuang et al. 2024): online exemplar-free continual learning, recursive least squares on "
                "a frozen buffer layer with a pseudo-feature generator for imbalance; centralized or federated",
))
