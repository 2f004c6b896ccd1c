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
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedsim.engine import ClientEnv
from fedsim.algorithms.afl.learner import client_upload, reduce_replies
from fedsim.algorithms.afl import protocol


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

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node serving several clients sums their statistics (or AA-law partial sums): exact and associative."""
        parsed = [protocol.parse_reply(r) for r in replies]  # read-only views, no copies
        arrays = reduce_replies(arrays for arrays, _ in parsed)
        return protocol.reply(arrays, sum(n for _, n in parsed))
