"""Client part of AFL (Zhuang et al., arXiv 2405.16240): one pass through the frozen feature map, one upload.

The client runs its partition once through the scenario's frozen feature map (`model.feature_map`: random
features by default, a torchvision backbone when configured), accumulates C_k = X_k^T X_k, Q_k = X_k^T Y_k in
float64 and answers with one message: the raw statistics (`strategy.upload = "statistics"`) or the paper's local
solution W_k = (C_k + gamma I)^-1 Q_k with C_k^r = C_k + gamma I (`"solution"`). Symmetric matrices travel as
their upper triangle. No gradients, no learning rate, no epochs. An empty client answers with zero statistics
(or (0, gamma I)), which changes nothing in the result, as the AA law promises.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.engine.client import ClientEnv
from fedsim.learners.afl import client_statistics, encode_reply, reduce_replies

ARRAYS_KEY = "afl"
METRICS_KEY = "afl.metrics"


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class AFLClient:
    """Statistics of the client's partition through the frozen feature map, in one reply."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        data = env.train_data()
        stats = client_statistics(data.x, data.y, env.feature_map(), data.num_classes,
                                  batch_size=self.params.batch_size)
        arrays = encode_reply(stats, self.params.upload, self.params.gamma)
        return RecordDict({ARRAYS_KEY: to_record(arrays),
                           METRICS_KEY: MetricRecord({"num-examples": int(stats.count)})})

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node serving several clients sums their statistics (or AA-law partial sums): exact and associative."""
        arrays = reduce_replies(from_record(r[ARRAYS_KEY]) for r in replies)  # decoded one at a time
        total = sum(int(r[METRICS_KEY]["num-examples"]) for r in replies)
        return RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord({"num-examples": total})})
