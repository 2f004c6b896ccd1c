"""AEF-OCL: Analytic Exemplar-Free Online Continual Learning (Zhuang et al., "Online Analytic Exemplar-Free Continual
Learning with Large Models for Imbalanced Autonomous Driving Task", arXiv 2405.17779; official code
github.com/ZHUANGHP/Analytic-continual-learning), centralized and federated.

Frozen backbone f (the scenario's `model.feature_map`), frozen buffer layer h = act(f(x) B) (seeded Gaussian B,
width `buffer_width`: `fedsim.nn.features.buffer_layer`), linear classifier W learned in one pass over an online stream of mini-batches, exactly:

    R_0 = I / gamma,  R_t = R_{t-1} - R_{t-1} H_t^T (I + H_t R_{t-1} H_t^T)^-1 H_t R_{t-1},
    W_t = W_{t-1} + R_t H_t^T (Y_t - H_t W_{t-1})          =>  W_t = (H^T H + gamma I)^-1 H^T Y on all seen data,

new classes appending zero columns, no exemplars, memory O(d^2). The Pseudo-Features Generator (PFG) keeps per
class the count n_c, mean mu_c and unbiased variance s_c^2 of the backbone features (recursively) and, at a
balancing point, tops every seen class up to max_c n_c (`balance = "max"`; `"mean"`: the mean count) with
pseudo-features ~ N(mu_c, (noise s_c)^2) pushed through the buffer layer and the same least-squares update, on a
copy (the real-data state is kept, nothing is stored). `draws` caps the number drawn per class (weighted so
effective counts stay balanced); None draws the whole deficit, as the paper. See `fedsim/algorithms/aef_ocl/learner.py`.

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

metrics.csv: one row every `eval_every` batches (centralized; with `eval_at = "phases"` one at the end of each phase
of the stream instead, where the official code evaluates) or per round (federated): `prequential_accuracy` =
running prequential (predict-then-learn) accuracy over the stream so far, `prequential_mean_class_accuracy`,
`samples` (stream samples so far), and every `test_every` rows (and the last) `accuracy` / `mean_class_accuracy` of
the current model on the (class-balanced) test set, which `fedsim report` plots over the stream, and
`seen_accuracy` on the test samples of the classes seen so far (the official protocol). Prequential accuracy
on a long-tailed, class-by-class stream rewards predicting the current head class (online SGD scores ~0.99 there
while forgetting everything else), so the test set is the comparison that matters. summary.json: `final_accuracy`
(test accuracy of the final model), `stream_average_accuracy` (the official average accuracy: the mean of
`seen_accuracy` over the test evaluations), `mean_class_accuracy`, `per_class_accuracy`, `samples_per_second` (stream
samples per second of learning: features, prediction, update, balancing; test evaluations excluded),
`prequential_accuracy`. model.pt: a torch module backbone -> buffer -> float64 head.

Messages: `fedsim.algorithms.aef_ocl.protocol` (the client part is `fedsim.clients.aef_ocl`); the stream walking, metrics rows
and saved model are the online framework's (`fedsim.frameworks.online`), shared with the baselines.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedsim.algorithms.aef_ocl import protocol
from fedsim.algorithms.aef_ocl.learner import learner_for
from fedsim.algorithms.aef_ocl.protocol import AEFOCLParams
from fedsim.engine import ServerContext
from fedsim.frameworks.online import (OnlineRun, PrequentialMeter, StreamFailed, TestEvaluator, linear_model,
                                      masked_predict, row_points, segment_length, server_threads, union_batches)


class AEFOCLServer:
    """Runs AEF-OCL on the scenario's online stream(s), centralized on the server or federated over the clients."""

    def __init__(self, params: AEFOCLParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        federated = self.params.federated(ctx.config.num_clients)
        streams = ctx.streams()
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
        points = row_points(p, batches, train.labels)
        run = OnlineRun(ctx, p, evaluator, total_rows=len(points), total_steps=len(batches))
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
            if t in points:  # the test set sees the freshly balanced weights
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
            request = protocol.segment_request(weights, start, segment)
            for reply in ctx.stream(request, partitions=active, round=r):  # fold each reply in as it arrives
                if reply.ok and reply.partition_ids:
                    statistics, correct, total = protocol.parse_segment_reply(reply.content)
                    meter.add_counts(correct, total)
                    learner.merge(statistics, in_dim=int(fmap.dim))
            exchange = ctx.last_exchange
            answered = len(exchange.answered)
            failed += len(exchange.failed)
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
