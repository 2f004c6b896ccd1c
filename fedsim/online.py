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
  ``row(step, meter, predict, last, **extra)`` where it wants a row (every ``eval_every`` batches, every round);
  ``predict(H) -> labels`` is the hook that scores the current model on the test features, called every
  ``test_every`` rows and at the last one. ``finish(meter, samples, learn_seconds, **extra)`` writes summary.json
  (final and best test accuracy, mean class and per-class accuracy, prequential accuracy, stream samples, learning
  throughput, plus the strategy's ``extra``);
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
from fedsim.training import per_class_accuracy

if TYPE_CHECKING:
    from fedsim.engine.server import ServerContext
    from fedsim.protocol.online import OnlineParams

__all__ = ["StreamFailed", "union_batches", "segment_length", "server_threads", "PrequentialMeter",
           "TestEvaluator", "OnlineRun", "linear_model"]


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

    def metrics(self, predict: Callable[[np.ndarray], np.ndarray]) -> dict:
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

    def row(self, step: int, meter: PrequentialMeter | None, predict: Callable[[np.ndarray], np.ndarray],
            last: bool, **extra: Any) -> None:
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

    def finish(self, meter: PrequentialMeter | None, samples: int, learn_seconds: float, **extra: Any) -> None:
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


def linear_model(feature_map: Any, buffer: nn.Module, weights: np.ndarray) -> nn.Sequential:
    """backbone -> flatten -> float64 -> buffer layer -> bias-free float64 head W: `model(x).argmax(1)` predicts."""
    head = nn.Linear(weights.shape[0], weights.shape[1], bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights.T)))
    return nn.Sequential(copy.deepcopy(feature_map.module).cpu(), nn.Flatten(1), _Float64(),
                         copy.deepcopy(buffer).double(), head)
