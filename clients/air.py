"""Client part of federated AIR: predict, then learn, the next segment of this client's own stream.

Stateless between messages: the request carries the global AIR weights and the segment [start, start + length) of
batches; the client predicts each batch with those weights (prequential counts per class), folds its buffer
features into a fresh AIR learner (per-class Grams, cross term, counts) and answers with those increments
(``fedsim.algorithms.air.learner.AIR.statistics``): sums over samples, so a node adds its clients' replies and the
server's sum equals the statistics of the union of the streams.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict

from fedsim.algorithms.air import protocol
from fedsim.algorithms.air.learner import AIR, buffer_transform, reduce_statistics
from fedsim.engine import ClientEnv
from fedsim.frameworks.online import masked_predict
from fedsim.scenario import train_split


class AIRClient:
    def __init__(self, params: protocol.AIRParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        weights, start, length = protocol.parse_segment_request(content)
        num_classes = int(weights.shape[1])
        data = train_split(env.config)  # stream indices refer to the scenario's training set
        fmap = env.feature_map()
        _, transform = buffer_transform(env.config, self.params, fmap.dim)
        learner = AIR(self.params.gamma, num_classes, self.params.defer_rows)
        learner.partial_fit(np.zeros((0, self.params.buffer_width)), np.zeros(0, np.int64))
        correct, total = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
        for idx in env.stream().batches[start:start + length]:
            h = transform(fmap(data.x[idx], dtype=torch.float64))
            y = data.labels[idx]
            pred = masked_predict(h, weights)
            np.add.at(total, y, 1)
            np.add.at(correct, y[pred == y], 1)
            learner.partial_fit(h, y)
        return protocol.segment_reply(learner.statistics(), correct, total)

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node's clients' increments and prequential counts, summed (exact)."""
        parsed = [protocol.parse_segment_reply(r) for r in replies]
        return protocol.segment_reply(reduce_statistics([s for s, _, _ in parsed]),
                                      np.sum([c for _, c, _ in parsed], axis=0),
                                      np.sum([t for _, _, t in parsed], axis=0))
