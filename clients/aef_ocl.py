"""Client part of federated AEF-OCL (online exemplar-free continual learning on each client's own stream).

Clients are stateless between messages. At synchronization round r the server sends the global prediction
weights W (d x c: the PFG-balanced ridge solution on the union of every stream seen so far, or the plain one with
`pfg = false`) and the segment of the stream to process, [start, start + length) in batches. The client then, for
each batch of its own stream (`env.stream()`, one pass, each sample once):

1. predicts the batch with W before learning it (prequential accuracy, counted per class),
2. learns it: buffer features H = act(x B) (the same seeded layer everywhere), C += H^T H, Q += H^T Y, and the
   PFG class statistics (count, mean, M2 of the backbone features) - nothing else is kept.

It answers with the segment's increments (C packed as its upper triangle, Q, n, the class statistics) and the
prequential counts; never its data, never pseudo-features. A node serving several clients sums the increments
(`reduce`, exact). The server adds them to its running statistics, so its weights equal the centralized learner's
on the union of the clients' streams; see `strategies/aef_ocl.py`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsim.engine.client import ClientEnv, derive_seed, train_split
from fedsim.learners.aef_ocl import AEFOCL, reduce_statistics

MODEL_KEY = "aef.model"  # down: {"weights": W}
SEGMENT_KEY = "aef.segment"  # down: {"start": first batch, "length": batches}
STATS_KEY = "aef.stats"  # up: the learner's statistics() plus "preq_correct", "preq_total" (per class)
PREQ_KEYS = ("preq_correct", "preq_total")


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def buffer_seed(config) -> int:  # noqa: ANN001
    """Seed of the scenario's buffer layer: the same on every node, the server and the online baselines."""
    return derive_seed(config.seed, "aef-ocl")


def learner_for(params, config, num_classes: int, solver: str) -> AEFOCL:  # noqa: ANN001
    """The scenario's AEF-OCL learner: the same buffer layer (seed) and PFG settings on the server and clients."""
    return AEFOCL(gamma=params.gamma, buffer_width=params.buffer_width, activation=params.activation,
                  pfg=params.pfg, noise=params.noise, balance=params.balance, draws=params.draws,
                  pfg_space=params.pfg_space, solver=solver, num_classes=num_classes,
                  seed=buffer_seed(config), defer_rows=params.defer_rows if solver == "recursive" else 0)


def segment_request(weights: np.ndarray, start: int, length: int) -> RecordDict:
    return RecordDict({MODEL_KEY: to_record({"weights": weights}),
                       SEGMENT_KEY: ConfigRecord({"start": int(start), "length": int(length)})})


class AEFOCLClient:
    """Processes the next segment of this client's stream: predict, then learn; returns statistics increments."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        weights = content[MODEL_KEY]["weights"].numpy()
        start = int(content[SEGMENT_KEY]["start"])
        length = int(content[SEGMENT_KEY]["length"])
        num_classes = int(weights.shape[1])
        batches = env.stream().batches[start:start + length]
        data = train_split(env.config)  # stream indices refer to the scenario's training set
        feature_map = env.feature_map()
        learner = learner_for(self.params, env.config, num_classes, solver="statistics")
        correct = np.zeros(num_classes, np.int64)
        total = np.zeros(num_classes, np.int64)
        learner.partial_fit(np.zeros((0, int(feature_map.dim))), np.zeros(0, np.int64))  # shapes even if empty
        for idx in batches:
            x = feature_map(data.x[idx], dtype=torch.float64)
            y = data.labels[idx]
            pred = learner.prequential_step(x, y, weights)
            np.add.at(total, y, 1)
            np.add.at(correct, y[pred == y], 1)
        arrays = learner.statistics()
        arrays.update(preq_correct=correct, preq_total=total)
        return RecordDict({STATS_KEY: to_record(arrays)})

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node serving several clients sums their increments and prequential counts (exact, associative)."""
        arrays = [from_record(r[STATS_KEY]) for r in replies]
        out = reduce_statistics(arrays)
        for key in PREQ_KEYS:
            out[key] = np.sum([a[key] for a in arrays], axis=0)
        return RecordDict({STATS_KEY: to_record(out)})
