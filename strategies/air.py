"""AIR: Analytic Imbalance Rectifier on an online, class-imbalanced stream, centralized and federated.

Fang et al., "AIR: Analytic Imbalance Rectifier for Continual Learning", arXiv 2408.10349; official code
github ZHUANGHP/Analytic-continual-learning (``analytic/AIR.py``, ``GeneralizedARM``). The setting of AEF-OCL
(``fedsim.strategies.aef_ocl``): a frozen backbone, the scenario's buffer layer (``fedsim.nn.features.buffer_layer``
seeded by ``fedsim.frameworks.online.buffer_seed``, so AIR sees exactly AEF-OCL's features), one pass over
mini-batches. AIR keeps per-class Grams, the cross term and the counts and predicts with the class-reweighted ridge
solution W = (sum_c w_c A_c + gamma I)^-1 Q diag(w), w_c proportional to 1 / n_c (``fedsim.algorithms.air.learner``):
the imbalance is corrected in the solve, with no pseudo-features.

- centralized: each batch is predicted with the current prediction weights (prequential), then learned; the
  weights are re-solved every ``refresh_every`` batches (default ``eval_every``), when a new class appears and at
  every metrics row (the official code solves in ``before_validation``).
- federated: per round the server sends W and the segment; each client predicts and learns its segment and returns
  the statistics increments, which the server adds (exact): its W equals the centralized learner's on the union of
  the clients' streams.

Metrics, rows and saved model are the online framework's, as AEF-OCL's.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedsim.algorithms.air import protocol
from fedsim.algorithms.air.learner import AIR, buffer_transform
from fedsim.engine import ServerContext
from fedsim.frameworks.online import (OnlineRun, PrequentialMeter, StreamFailed, TestEvaluator, linear_model,
                                      masked_predict, row_points, segment_length, server_threads, union_batches)


class AIRServer:
    def __init__(self, params: protocol.AIRParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        streams = ctx.streams()
        if not any(len(s) for s in streams):
            raise StreamFailed("the online stream is empty (no client holds any sample)")
        with server_threads(ctx):
            if self.params.federated(ctx.config.num_clients):
                self._federated(ctx, streams)
            else:
                self._centralized(ctx, streams)

    def _setup(self, ctx: ServerContext):  # noqa: ANN202
        fmap = ctx.feature_map()
        buffer, transform = buffer_transform(ctx.config, self.params, fmap.dim)
        learner = AIR(self.params.gamma, ctx.num_classes, self.params.defer_rows)
        learner.partial_fit(np.zeros((0, self.params.buffer_width)), np.zeros(0, np.int64))
        return fmap, buffer, transform, learner, TestEvaluator(ctx, transform)

    def _centralized(self, ctx: ServerContext, streams: list) -> None:
        p = self.params
        train = ctx.train_data()
        fmap, buffer, transform, learner, evaluator = self._setup(ctx)
        batches = union_batches(streams, segment_length(p, streams, ctx.config.rounds))
        points = row_points(p, batches, train.labels)
        run = OnlineRun(ctx, p, evaluator, total_rows=len(points), total_steps=len(batches))
        meter = PrequentialMeter(ctx.num_classes)
        refresh = p.refresh_every or p.eval_every
        weights = learner.coef_.copy()
        solves, learn = 0, 0.0
        for t, idx in enumerate(batches, 1):
            t0 = time.perf_counter()
            y = train.labels[idx]
            new_class = bool(np.any(learner.class_counts_[y] == 0))
            h = transform(fmap(train.x[idx], dtype=torch.float64))
            meter.add(masked_predict(h, weights), y)
            learner.partial_fit(h, y)
            if new_class or t % refresh == 0 or t in points:
                weights = learner.coef_.copy()
                solves += 1
            learn += time.perf_counter() - t0
            if t in points:
                run.row(t, meter, lambda hh, w=weights: masked_predict(hh, w), last=t == len(batches),
                        classes_seen=int(np.count_nonzero(learner.class_counts_)))
        ctx.save_model(linear_model(fmap, buffer, weights))
        run.finish(meter, meter.samples, learn, mode="centralized", solves=solves, gamma=p.gamma,
                   class_counts=learner.class_counts_.tolist(), class_weights=learner.class_weights().tolist())

    def _federated(self, ctx: ServerContext, streams: list) -> None:
        p = self.params
        fmap, buffer, _, learner, evaluator = self._setup(ctx)
        segment = segment_length(p, streams, ctx.config.rounds)
        lengths = [len(s) for s in streams]
        rounds = -(-max(lengths) // segment)
        run = OnlineRun(ctx, p, evaluator, total_rows=rounds)
        meter = PrequentialMeter(ctx.num_classes)
        weights = learner.coef_.copy()
        learn, failed = 0.0, 0
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            start = (r - 1) * segment
            active = [pid for pid, n in enumerate(lengths) if n > start]
            for reply in ctx.stream(protocol.segment_request(weights, start, segment), partitions=active, round=r):
                if reply.ok and reply.partition_ids:
                    statistics, correct, total = protocol.parse_segment_reply(reply.content)
                    meter.add_counts(correct, total)
                    learner.merge(statistics, p.buffer_width)
            answered = len(ctx.last_exchange.answered)
            failed += len(ctx.last_exchange.failed)
            if answered == 0:
                raise StreamFailed(f"round {r}: none of the {len(active)} clients with stream left answered")
            weights = learner.coef_.copy()
            learn += time.perf_counter() - t0
            run.row(r, meter, lambda hh, w=weights: masked_predict(hh, w), last=r == rounds,
                    active_clients=len(active), answered_clients=answered,
                    classes_seen=int(np.count_nonzero(learner.class_counts_)))
        ctx.save_model(linear_model(fmap, buffer, weights))
        run.finish(meter, meter.samples, learn, mode="federated", sync_every=segment, sync_rounds=rounds,
                   gamma=p.gamma, failed_client_segments=failed, class_counts=learner.class_counts_.tolist())
