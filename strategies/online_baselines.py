"""Baselines for AEF-OCL on the same online stream, the same frozen backbone and the same buffer layer (seed).

- `online-sgd`: fine-tuning, the usual lower bound of online continual learning. A linear softmax head on the
  buffer features H = act(f(x) B), trained with cross-entropy by `fedsim.nn.training.train_epochs` on each mini-batch
  as it arrives (`client.epochs` passes over the batch, `client.lr` / `momentum` / `weight_decay` / `optimizer`;
  one optimizer per batch, so momentum does not carry across batches). Each batch is predicted before it is
  learned (prequential accuracy). No exemplars, no replay: it forgets and follows the imbalance.
- `joint-ridge`: the upper bound of the analytic learner. Ridge regression W = (H^T H + gamma I)^-1 H^T Y on the
  whole stream at once (every sample the stream holds, after its long-tail subsampling), via
  `fedsim.analytic.RidgeStatistics`; no prequential accuracy (it is not online). By the RLS invariant it equals
  AEF-OCL without PFG at the end of the stream, so its test accuracy is what the recursion must reproduce.

Both run centralized on the server: with several clients they learn the union of the clients' streams, in the
order the federated AEF-OCL server folds them. Metrics, stream order and saved model are the online framework's
(`fedsim.frameworks.online`), as AEF-OCL's, and so is the buffer layer (`fedsim.nn.features.buffer_layer` seeded by
`fedsim.frameworks.online.buffer_seed`); parameters and registrations: `fedsim.algorithms.online.protocol`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from fedsim.algorithms.online.protocol import JointRidgeParams, OnlineSGDParams
from fedsim.analytic import RidgeStatistics
from fedsim.engine import ServerContext
from fedsim.frameworks.online import (OnlineRun, PrequentialMeter, StreamFailed, TestEvaluator, buffer_seed,
                                      linear_model, masked_predict, row_points, segment_length, server_threads,
                                      union_batches)
from fedsim.frameworks.online_protocol import OnlineParams
from fedsim.nn.features import buffer_layer
from fedsim.nn.training import train_epochs
from fedsim.scenario import derive_seed


def _transform(buffer: nn.Module):  # noqa: ANN202
    def apply(x) -> np.ndarray:  # noqa: ANN001
        with torch.inference_mode():
            return buffer(torch.as_tensor(np.asarray(x, np.float64))).numpy()
    return apply


def _stream(ctx: ServerContext, params: OnlineParams) -> tuple:
    """(training set, backbone, buffer layer, the stream's batches in the federated fold order)."""
    streams = ctx.streams()
    batches = union_batches(streams, segment_length(params, streams, ctx.config.rounds))
    if not batches:
        raise StreamFailed("the online stream is empty (no client holds any sample)")
    fmap = ctx.feature_map()
    buffer = buffer_layer(int(fmap.dim), params.buffer_width, buffer_seed(ctx.config), params.activation,
                          params.buffer_init)
    return ctx.train_data(), fmap, buffer, batches


class OnlineSGDServer:
    def __init__(self, params: OnlineSGDParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        with server_threads(ctx):
            self._run(ctx)

    def _run(self, ctx: ServerContext) -> None:
        p, c = self.params, ctx.config.client
        train, fmap, buffer, batches = _stream(ctx, p)
        num_classes = ctx.num_classes
        transform = _transform(buffer)
        torch.manual_seed(derive_seed(ctx.seed, "online-sgd"))
        head = nn.Linear(p.buffer_width, num_classes)
        evaluator = TestEvaluator(ctx, transform)
        points = row_points(p, batches, train.labels)
        run = OnlineRun(ctx, p, evaluator, total_rows=len(points), total_steps=len(batches))
        meter = PrequentialMeter(num_classes)

        def predict(h: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return head(torch.as_tensor(h, dtype=torch.float32)).argmax(1).numpy()

        learn, loss = 0.0, float("nan")
        for t, idx in enumerate(batches, 1):
            t0 = time.perf_counter()
            y = train.labels[idx]
            h = transform(fmap(train.x[idx], dtype=torch.float64))
            meter.add(predict(h), y)
            stats = train_epochs(head, torch.as_tensor(h, dtype=torch.float32), torch.as_tensor(y),
                                 epochs=c.epochs, batch_size=len(y), lr=c.lr, momentum=c.momentum,
                                 weight_decay=c.weight_decay, optimizer=c.optimizer,
                                 seed=derive_seed(ctx.seed, "online-sgd", t))
            loss = float(stats["loss"])
            learn += time.perf_counter() - t0
            if t in points:
                run.row(t, meter, predict, last=t == len(batches), loss=loss)
        weights = np.concatenate([head.weight.detach().numpy().T, head.bias.detach().numpy()[None]]).astype(np.float64)
        model = linear_model(fmap, buffer, weights[:-1])
        model[-1].bias = nn.Parameter(torch.as_tensor(weights[-1]))
        ctx.save_model(model)
        run.finish(meter, meter.samples, learn, lr=c.lr, epochs_per_batch=c.epochs)


class JointRidgeServer:
    def __init__(self, params: JointRidgeParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        with server_threads(ctx):
            self._run(ctx)

    def _run(self, ctx: ServerContext) -> None:
        p = self.params
        train, fmap, buffer, batches = _stream(ctx, p)
        transform = _transform(buffer)
        evaluator = TestEvaluator(ctx, transform)
        run = OnlineRun(ctx, p, evaluator, total_rows=1, total_steps=len(batches))
        t0 = time.perf_counter()
        idx = np.concatenate(batches)
        stats = RidgeStatistics.zeros(p.buffer_width, ctx.num_classes)
        for start in range(0, len(idx), 1024):
            part = idx[start:start + 1024]
            stats.update(transform(fmap(train.x[part], dtype=torch.float64)), train.labels[part], ctx.num_classes)
        weights = stats.solve(p.gamma)
        learn = time.perf_counter() - t0
        run.row(len(batches), None, lambda h: masked_predict(h, weights), last=True, samples=len(idx))
        ctx.save_model(linear_model(fmap, buffer, weights))
        run.finish(None, len(idx), learn, gamma=p.gamma)
