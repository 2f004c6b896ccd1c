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
engine's batched hook): for small clients (each sending a factor) one forward over all their rows, their summed
statistics by syrk, one record, instead of one forward, one QR and one record per client then decoded again by
`reduce`; for a group holding a client that sends its Gram, the clients' own uploads summed as `reduce` sums them
(bit for bit), without a record per client. Each client's bytes are still those of the reply it would have sent
alone, computed from its form's shapes (its form depends only on its number of rows), injected failures and
byzantine clients are handled by the engine as before, and a crash falls back to the per-client path. The paper's
"solution" upload (a solve per client) keeps the per-client path.
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedsim.codec import array_item_nbytes
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
        """All the clients of a node at once (raw-statistics uploads; None for "solution"): the combined reply
        `reduce` would make of theirs, each client's bytes as if it had sent alone (from the shapes). A group of
        small clients (every one sending a factor) goes through one forward over all their rows (`group_upload`:
        equal to float64 round-off); a group holding a client that sends its Gram sums the clients' own uploads,
        bit for bit `reduce`'s result, without encoding, counting and decoding a record per client."""
        gamma, upload, batch_size = protocol.parse_request(content)
        if upload == "solution" or not envs:
            return None
        env = envs[0]
        fmap, num_classes = env.feature_map(), env.num_classes
        dim = int(fmap.dim)
        counts = [int(e.indices.size) for e in envs]
        forms = [client_form(n, dim, upload) for n in counts]
        if any(kind == "statistics" for kind, _ in forms):
            # a client sending its Gram costs a d x d syrk whichever way: sum the clients' own uploads in order,
            # exactly as `reduce` of their replies does (bit for bit), without a record per client
            arrays = reduce_replies(client_upload(d.x, d.y, fmap, num_classes, upload, gamma, batch_size=batch_size)
                                    for d in (e.train_data() for e in envs))
        else:  # small clients: one forward over all their rows, no QR per client
            arrays = group_upload(train_split(env.config), (e.indices for e in envs), fmap, num_classes, upload,
                                  batch_size=batch_size)
        sizes = [reply_nbytes(kind, rows, dim, num_classes, n) for (kind, rows), n in zip(forms, counts)]
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
    arrays' item from their dtypes and shapes alone (`fedsim.codec.array_item_nbytes`: no array is built, so a
    d (d + 1) / 2 Gram or a rows x d factor costs nothing to count) plus the metrics item by its number of
    examples (a varint), cached. Equal to `record_nbytes(train(...))` (tested)."""
    key = (kind, int(rows), int(dim), int(num_classes))
    arrays = _ARRAYS_NBYTES.get(key)
    if arrays is None:
        if kind not in ("factor", "statistics"):
            raise ValueError(f"reply_nbytes: kind must be 'factor' or 'statistics', got {kind!r}")
        f64 = np.dtype(np.float64)
        first = ("factor", (f64, (int(rows), int(dim)))) if kind == "factor" else ("gram", (f64, (int(rows),)))
        layout = dict([first, ("cross", (f64, (int(dim), int(num_classes)))), ("count", (np.dtype(np.int64), (1,)))])
        if len(_ARRAYS_NBYTES) >= 4096:
            _ARRAYS_NBYTES.clear()
        arrays = _ARRAYS_NBYTES[key] = array_item_nbytes(protocol.ARRAYS_KEY, layout)
    metrics = _METRICS_NBYTES.get(int(num_examples))
    if metrics is None:
        if len(_METRICS_NBYTES) >= 65536:
            _METRICS_NBYTES.clear()
        metrics = _METRICS_NBYTES[int(num_examples)] = record_nbytes(
            RecordDict({protocol.METRICS_KEY: MetricRecord({"num-examples": int(num_examples)})}))
    return arrays + metrics
