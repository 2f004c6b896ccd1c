"""The online-stream framework: running a server-side learner over the scenario's stream and evaluating it.

Strategies that learn from an online stream (``stream.kind = "online"``: AEF-OCL and its baselines ``online-sgd`` and
``joint-ridge``) share one way of walking the stream and one set of metrics, so their numbers compare:

- the batches: ``ctx.streams()`` gives every client's stream (as the clients build them); ``segment_length`` is the
  number of batches of each stream per federated round (``sync_every``, or the longest stream split into
  ``rounds``), and ``union_batches`` lays the clients' batches out in the order a federated server folds them
  (round by round, clients in partition order), so a centralized run on several clients' streams learns exactly
  what the federated one does;
- ``server_threads(ctx)``: run the server's math on ``simulation.num_cpus`` threads, as a client would;
- ``PrequentialMeter``: running predict-then-learn accuracy, overall and per class;
- ``TestEvaluator(ctx, transform)``: the test set's features through the frozen backbone and the strategy's
  ``transform`` hook (backbone features -> the features its head reads, e.g. the buffer layer), computed once;
- ``OnlineRun(ctx, params, evaluator, total_rows)``: the rows of metrics.csv. A strategy calls
  ``row(step, meter, predict, last, **extra)`` where it wants a row (centralized: at ``row_points``, i.e. every
  ``eval_every`` batches or at each phase end with ``eval_at = "phases"``; federated: every round);
  ``predict(H) -> labels`` is the hook that scores the current model on the test features, called every
  ``test_every`` rows and at the last one: on the whole test set (``accuracy``) and on the test samples of the
  classes seen so far (``seen_accuracy``, the official protocol). ``finish(meter, samples, learn_seconds, **extra)``
  writes summary.json (final and best test accuracy, mean class and per-class accuracy, ``stream_average_accuracy``
  = the mean of ``seen_accuracy`` over the test evaluations as the official code averages, prequential accuracy,
  stream samples, learning throughput, plus the strategy's ``extra``);
- ``buffer_seed(config)``: the seed of the scenario's buffer layer (``fedsim.nn.features.buffer_layer``), the same
  for every strategy on the stream, so they all see the same features;
- ``masked_predict(H, W)``: the prediction rule of the linear heads on it (argmax over the classes seen so far);
- ``linear_model(feature_map, buffer, W)``: the saved model.pt, backbone -> buffer -> float64 linear head;
- ``StreamFailed``: an empty stream, or a federated round in which no client answered.

Prequential accuracy on a long-tailed, class-by-class stream rewards predicting the current head class (online
SGD scores ~0.99 there while forgetting everything else), so the test set is the comparison that matters.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedsim.errors import FedsimError
from fedsim.nn.training import per_class_accuracy
from fedsim.scenario import derive_seed

if TYPE_CHECKING:
    from fedsim.config import ScenarioConfig
    from fedsim.engine.server import ServerContext
    from fedsim.frameworks.online_protocol import OnlineParams

__all__ = ["StreamFailed", "union_batches", "segment_length", "server_threads", "PrequentialMeter",
           "TestEvaluator", "OnlineRun", "row_points", "buffer_seed", "masked_predict", "linear_model"]


class StreamFailed(FedsimError):
    """Every client failed in a federated round, or the stream is empty."""


def union_batches(streams: Sequence[Any], segment: int) -> list[np.ndarray]:
    """All clients' batches in the order a federated server folds them: round by round (`segment` batches per
    client per round), clients in partition order. With one client: its stream."""
    longest = max((len(s) for s in streams), default=0)
    out = []
    for start in range(0, longest, max(segment, 1)):
        for s in streams:
            out.extend(s.batches[start:start + segment])
    return out


def segment_length(params: OnlineParams, streams: Sequence[Any], rounds: int) -> int:
    """Batches of each client's stream per federated round: `sync_every`, or the longest stream over `rounds`."""
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
        """Fold in counts kept elsewhere (a federated client's segment)."""
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
    """Test-set metrics of a model on transformed features; the test set's features computed once.

    `transform(backbone features) -> features` is the strategy's hook (the buffer layer for AEF-OCL's learners).
    """

    __test__ = False  # not a pytest test class when imported into a test module

    def __init__(self, ctx: ServerContext, transform: Callable[[Any], np.ndarray], batch_size: int = 1024) -> None:
        self.data = ctx.test_data()
        self.labels = self.data.labels
        fmap = ctx.feature_map()
        parts = [transform(fmap(self.data.x[s:s + batch_size], dtype=torch.float64))
                 for s in range(0, len(self.data), batch_size)]
        self.features = np.concatenate(parts) if parts else np.zeros((0, 0))
        self.seconds = 0.0

    def metrics(self, predict: Callable[[np.ndarray], np.ndarray], seen: np.ndarray | None = None) -> dict:
        """{"accuracy", "mean_class_accuracy", "per_class_accuracy"} of `predict(H) -> labels` on the test set, and
        with `seen` (class labels) "seen_accuracy": the same predictions scored on the test samples of those classes
        only (the official protocol's test subset of the classes seen so far; nan when none of them is in the test
        set). The predictions are not restricted to `seen`: a model that predicts an unseen class is wrong."""
        t0 = time.perf_counter()
        pred = np.asarray(predict(self.features))
        per_class = per_class_accuracy(pred, self.labels, self.data.num_classes)
        out = {"accuracy": float(np.mean(pred == self.labels)), "mean_class_accuracy": float(np.nanmean(per_class)),
               "per_class_accuracy": [None if np.isnan(a) else round(float(a), 6) for a in per_class]}
        if seen is not None:
            mask = np.isin(self.labels, np.asarray(seen, np.int64))
            out["seen_accuracy"] = float(np.mean(pred[mask] == self.labels[mask])) if mask.any() else float("nan")
        self.seconds += time.perf_counter() - t0
        return out


class OnlineRun:
    """Rows of metrics.csv for an online run: prequential accuracy each row, test metrics every `test_every`.

    A test evaluation scores the current model twice: on the whole test set (`accuracy`, `mean_class_accuracy`;
    the last one is `final_accuracy`) and on the test samples of the classes seen so far (`seen_accuracy`, the
    official protocol's `subset_until_phase`). `stream_average_accuracy` in summary.json is the mean of
    `seen_accuracy` over the test evaluations: the official code's average accuracy (`acc@avg`, the running mean
    over its evaluation points of the top-1 accuracy on the seen classes' test samples), at fedsim's evaluation
    points (every `test_every` rows; `eval_at = "phases"` puts the rows where the official code evaluates).
    """

    def __init__(self, ctx: ServerContext, params: OnlineParams, evaluator: TestEvaluator, total_rows: int,
                 total_steps: int | None = None) -> None:
        """``total_steps``: the x of the last row (the stream's batches; the rounds of a federated stream, the
        default ``total_rows``), so the progress line reads "step 97/252", not "97/10"."""
        self.ctx, self.params, self.evaluator = ctx, params, evaluator
        self.total_rows = total_rows
        self.rows = 0
        self.best = float("-inf")
        self.last_test: dict = {}
        self.seen_accuracies: list[float] = []
        ctx.set_total_steps(total_rows if total_steps is None else total_steps)

    def row(self, step: int, meter: PrequentialMeter | None, predict: Callable[[np.ndarray], np.ndarray],
            last: bool, seen: np.ndarray | None = None, **extra: Any) -> None:
        """One row: prequential accuracy of `meter` (if any) and, when due, test metrics of `predict(H)`.

        `seen`: the classes seen so far (labels); default: those the prequential meter has counted (every sample
        the model has learned from passed through it), or every test class without a meter."""
        self.rows += 1
        values = {"accuracy": float("nan")}
        if meter is not None:
            values.update(prequential_accuracy=meter.accuracy,
                          prequential_mean_class_accuracy=meter.mean_class_accuracy, samples=meter.samples)
        values.update(extra)
        if last or self.rows % self.params.test_every == 0:
            if seen is None:
                seen = np.flatnonzero(meter.total) if meter is not None else np.unique(self.evaluator.labels)
            self.last_test = self.evaluator.metrics(predict, seen)
            self.best = max(self.best, self.last_test["accuracy"])
            self.seen_accuracies.append(self.last_test["seen_accuracy"])
            values.update(accuracy=self.last_test["accuracy"],
                          mean_class_accuracy=self.last_test["mean_class_accuracy"],
                          seen_accuracy=self.last_test["seen_accuracy"])
        self.ctx.log(step, **values)

    @property
    def stream_average_accuracy(self) -> float:
        """Mean of `seen_accuracy` over the test evaluations so far (nan before the first; nan rows skipped)."""
        a = np.asarray(self.seen_accuracies, dtype=float)
        return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")

    def finish(self, meter: PrequentialMeter | None, samples: int, learn_seconds: float, **extra: Any) -> None:
        """summary.json: the final test metrics, prequential accuracy, throughput, plus `extra`."""
        t = self.last_test
        values = dict(final_accuracy=t["accuracy"], best_accuracy=self.best,
                      mean_class_accuracy=t["mean_class_accuracy"], per_class_accuracy=t["per_class_accuracy"],
                      stream_average_accuracy=self.stream_average_accuracy,
                      test_evaluations=len(self.seen_accuracies),
                      prequential_accuracy=meter.accuracy if meter is not None else None,
                      prequential_mean_class_accuracy=meter.mean_class_accuracy if meter is not None else None,
                      stream_samples=int(samples),
                      samples_per_second=round(samples / learn_seconds, 2) if learn_seconds > 0 else None,
                      learn_seconds=round(learn_seconds, 3), test_seconds=round(self.evaluator.seconds, 3),
                      buffer_width=self.params.buffer_width, buffer_init=self.params.buffer_init)
        values.update(extra)
        self.ctx.summary(**values)


def row_points(params: OnlineParams, batches: Sequence[np.ndarray], labels: np.ndarray) -> set[int]:
    """The batch numbers t (1-based) after which a centralized run writes a metrics row.

    `eval_at = "batches"`: every `eval_every` batches. `"phases"`: after the last batch before one that holds a class
    not seen in any earlier batch (the end of a phase: where the official code evaluates; a batch at a phase boundary
    that mixes both phases counts to the new one). The last batch always has a row.
    """
    n = len(batches)
    if params.eval_at == "batches":
        points = set(range(params.eval_every, n + 1, params.eval_every))
    else:
        points, seen = set(), np.zeros(0, np.int64)
        for t, idx in enumerate(batches):
            classes = np.unique(labels[idx])
            if t > 0 and np.setdiff1d(classes, seen).size:
                points.add(t)  # batch t (1-based) is the one before batch t + 1, which brings a new class
            seen = np.union1d(seen, classes)
    if n:
        points.add(n)
    return points


def buffer_seed(config: ScenarioConfig) -> int:
    """Seed of the scenario's buffer layer: the same on every node, on the server and for every online strategy.

    The label "aef-ocl" is kept from when the layer was AEF-OCL's alone: changing it would change every run."""
    return derive_seed(config.seed, "aef-ocl")


def masked_predict(h: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """argmax of H W over the classes the model knows: a class whose weight column is all zero has never been seen
    (ridge gives it exactly zero), so it is excluded rather than winning on ties with negative scores."""
    scores = h @ weights
    unseen = ~np.any(weights != 0, axis=0)
    if unseen.any() and not unseen.all():
        scores[:, unseen] = -np.inf
    return np.argmax(scores, axis=1)


class _Float64(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def linear_model(feature_map: Any, buffer: nn.Module, weights: np.ndarray) -> nn.Sequential:
    """backbone -> flatten -> float64 -> buffer layer -> bias-free float64 head W: `model(x).argmax(1)` predicts."""
    head = nn.Linear(weights.shape[0], weights.shape[1], bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights.T)))
    return nn.Sequential(copy.deepcopy(feature_map.module).cpu(), nn.Flatten(1), _Float64(),
                         copy.deepcopy(buffer).double(), head)
