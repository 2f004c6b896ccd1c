"""Client part of AFL (Zhuang et al., arXiv 2405.16240): one pass through the frozen feature map, one upload.

The client runs its partition once through the scenario's frozen feature map (`model.feature_map`: random
features by default, a torchvision backbone when configured), accumulates C_k = X_k^T X_k, Q_k = X_k^T Y_k in
float64 and answers with one message: by default (`strategy.upload = "auto"`) the smaller exact form of its raw
statistics, the packed Gram or a factor R_k (R_k^T R_k = C_k, 8 n_k d bytes for a client with n_k < d / 2 rows);
or always the Gram (`"statistics"`), always the factor (`"factor"`), or the paper's local solution
W_k = (C_k + gamma I)^-1 Q_k with C_k^r = C_k + gamma I (`"solution"`). Symmetric matrices travel as their upper
triangle. No gradients, no learning rate, no epochs. An empty client answers with zero statistics
(or (0, gamma I)), which changes nothing in the result, as the AA law promises. gamma, the upload form and the rows
per forward pass come in the request. Messages: `fedsim.algorithms.afl.protocol`.

A node serving many clients (`simulation.clients_per_node`) answers for all of them at once (`train_group`, the
engine's batched hook): one forward over all their rows, their summed statistics by syrk, one record, instead of
one forward, one QR and one record per client then decoded again by `reduce`. Each client's bytes are still those
of the reply it would have sent alone (its form depends only on its number of rows), injected failures and byzantine
clients are handled by the engine as before, and a crash falls back to the per-client path. The paper's
"solution" upload (a solve per client) keeps the per-client path.
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedsim.codec import to_record
from fedsim.engine import ClientEnv
from fedsim.engine.accounting import record_nbytes
from fedsim.engine.node import GroupReply
from fedsim.algorithms.afl.learner import client_form, client_upload, group_upload, reduce_replies
from fedsim.algorithms.afl import protocol
from fedsim.scenario import train_split


class AFLClient:
    """Statistics of the client's partition through the frozen feature map, in one reply."""

    def __init__(self, params: protocol.AFLParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        gamma, upload, batch_size = protocol.parse_request(content)
        data = env.train_data()
        arrays = client_upload(data.x, data.y, env.feature_map(), env.num_classes, upload, gamma,
                               batch_size=batch_size)
        return protocol.reply(arrays, int(arrays["count"][0]))

    def train_group(self, content: RecordDict, envs: list[ClientEnv]) -> GroupReply | None:
        """All the clients of a node in one pass (raw-statistics uploads; None for "solution"): the combined reply
        `reduce` would make of theirs (to float64 round-off), each client's bytes as if it had sent alone."""
        gamma, upload, batch_size = protocol.parse_request(content)
        if upload == "solution" or not envs:
            return None
        env = envs[0]
        fmap, num_classes = env.feature_map(), env.num_classes
        dim = int(fmap.dim)
        arrays = group_upload(train_split(env.config), (e.indices for e in envs), fmap, num_classes, upload,
                              batch_size=batch_size)
        counts = [int(e.indices.size) for e in envs]
        sizes = [reply_nbytes(*client_form(n, dim, upload), dim, num_classes, n) for n in counts]
        return GroupReply(protocol.reply(arrays, int(arrays["count"][0])), sizes, counts,
                          [float("nan")] * len(envs))

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node serving several clients sums their statistics (or AA-law partial sums): exact and associative."""
        parsed = [protocol.parse_reply(r) for r in replies]  # read-only views, no copies
        arrays = reduce_replies(arrays for arrays, _ in parsed)
        return protocol.reply(arrays, sum(n for _, n in parsed))


_ARRAYS_NBYTES: dict[tuple, int] = {}
_METRICS_NBYTES: dict[int, int] = {}


def reply_nbytes(kind: str, rows: int, dim: int, num_classes: int, num_examples: int) -> int:
    """`record_nbytes` of the reply `train` sends for a client whose upload has this form (`client_form`): the
    arrays' item by layout (zeros of the same dtypes and shapes: the size depends on nothing else) plus the metrics
    item by its number of examples (a varint), cached. Equal to `record_nbytes(train(...))` (tested)."""
    key = (kind, int(rows), int(dim), int(num_classes))
    arrays = _ARRAYS_NBYTES.get(key)
    if arrays is None:
        first = {"factor": np.zeros((rows, dim)), "statistics": np.zeros(rows)}[kind]
        layout = {("gram" if kind == "statistics" else "factor"): first, "cross": np.zeros((dim, num_classes)),
                  "count": np.zeros(1, np.int64)}
        if len(_ARRAYS_NBYTES) >= 4096:
            _ARRAYS_NBYTES.clear()
        arrays = _ARRAYS_NBYTES[key] = record_nbytes(RecordDict({protocol.ARRAYS_KEY: to_record(layout)}))
    metrics = _METRICS_NBYTES.get(int(num_examples))
    if metrics is None:
        if len(_METRICS_NBYTES) >= 65536:
            _METRICS_NBYTES.clear()
        metrics = _METRICS_NBYTES[int(num_examples)] = record_nbytes(
            RecordDict({protocol.METRICS_KEY: MetricRecord({"num-examples": int(num_examples)})}))
    return arrays + metrics
