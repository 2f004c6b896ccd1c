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
on the union of the clients' streams; see `fedsim/strategies/aef_ocl.py`. Messages: `fedsim.algorithms.aef_ocl.protocol`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict

from fedsim.engine import ClientEnv
from fedsim.algorithms.aef_ocl.learner import learner_for, reduce_statistics
from fedsim.algorithms.aef_ocl import protocol
from fedsim.scenario import train_split


class AEFOCLClient:
    """Processes the next segment of this client's stream: predict, then learn; returns statistics increments."""

    def __init__(self, params: protocol.AEFOCLParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        weights, start, length = protocol.parse_segment_request(content)  # weights: a read-only view
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
        return protocol.segment_reply(learner.statistics(), correct, total)

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node serving several clients sums their increments and prequential counts (exact, associative)."""
        parsed = [protocol.parse_segment_reply(r) for r in replies]  # read-only views, no copies
        return protocol.segment_reply(reduce_statistics([stats for stats, _, _ in parsed]),
                                      np.sum([correct for _, correct, _ in parsed], axis=0),
                                      np.sum([total for _, _, total in parsed], axis=0))
