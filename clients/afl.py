"""Client part of AFL (Zhuang et al., arXiv 2405.16240): one pass through the frozen feature map, one upload.

The client runs its partition once through the scenario's frozen feature map (`model.feature_map`: random
features by default, a torchvision backbone when configured), accumulates C_k = X_k^T X_k, Q_k = X_k^T Y_k in
float64 and answers with one message: the raw statistics (`strategy.upload = "statistics"`) or the paper's local
solution W_k = (C_k + gamma I)^-1 Q_k with C_k^r = C_k + gamma I (`"solution"`). Symmetric matrices travel as
their upper triangle. No gradients, no learning rate, no epochs. An empty client answers with zero statistics
(or (0, gamma I)), which changes nothing in the result, as the AA law promises. Messages: `fedsim.protocol.afl`.
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedsim.engine import ClientEnv
from fedsim.learners.afl import client_statistics, encode_reply, reduce_replies
from fedsim.protocol import afl as protocol


class AFLClient:
    """Statistics of the client's partition through the frozen feature map, in one reply."""

    def __init__(self, params: protocol.AFLParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        gamma, upload = protocol.parse_request(content, self.params)
        data = env.train_data()
        stats = client_statistics(data.x, data.y, env.feature_map(), env.num_classes,
                                  batch_size=self.params.batch_size)
        return protocol.reply(encode_reply(stats, upload, gamma), int(stats.count))

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node serving several clients sums their statistics (or AA-law partial sums): exact and associative."""
        parsed = [protocol.parse_reply(r) for r in replies]  # read-only views, no copies
        arrays = reduce_replies(arrays for arrays, _ in parsed)
        return protocol.reply(arrays, sum(n for _, n in parsed))
