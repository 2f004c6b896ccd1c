"""Client part of AFL (Zhuang et al., arXiv 2405.16240): one pass through the frozen feature map, one upload.

The client runs its partition once through the scenario's frozen feature map (`model.feature_map`: random
features by default, a torchvision backbone when configured), accumulates C_k = X_k^T X_k, Q_k = X_k^T Y_k in
float64 and answers with one message: the raw statistics (`strategy.upload = "statistics"`) or the paper's local
solution W_k = (C_k + gamma I)^-1 Q_k with C_k^r = C_k + gamma I (`"solution"`). Symmetric matrices travel as
their upper triangle. No gradients, no learning rate, no epochs. An empty client answers with zero statistics
(or (0, gamma I)), which changes nothing in the result, as the AA law promises.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.engine.client import ClientEnv
from fedsim.learners.afl import client_statistics, encode_reply, reduce_replies

ARRAYS_KEY = "afl"
METRICS_KEY = "afl.metrics"
CONFIG_KEY = "afl.config"


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Arrays as a Flower ArrayRecord in the usual .npy format (`Array.numpy()` reads them back)."""
    return ArrayRecord({k: npy_array(v) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only numpy views of the record's arrays (no copy)."""
    return {k: npy_view(v) for k, v in record.items()}


def npy_array(a: np.ndarray) -> Array:
    """`Array(a)` with one copy of the data instead of np.save's three (tens of ms per 17 MB Gram upload)."""
    a = np.require(a, requirements="C")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(a))
    data = b"".join((head.getvalue(), memoryview(a.reshape(-1)).cast("B") if a.size else b""))
    return Array(dtype=str(a.dtype), shape=tuple(int(s) for s in a.shape), stype="numpy.ndarray", data=data)


def npy_view(array: Array) -> np.ndarray:
    """`array.numpy()` without copying: a read-only view of the message's bytes."""
    if array.stype != "numpy.ndarray":
        return array.numpy()
    fp = io.BytesIO(array.data)  # shares the bytes until written to
    version = np.lib.format.read_magic(fp)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fp)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted in AFL messages")
    flat = np.frombuffer(array.data, dtype=dtype, count=int(np.prod(shape)), offset=fp.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


class AFLClient:
    """Statistics of the client's partition through the frozen feature map, in one reply."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        # the server's request names gamma and the upload form (the scenario's values, as a fallback)
        request = content.config_records.get(CONFIG_KEY) or {}
        gamma = float(request.get("gamma", self.params.gamma))
        upload = str(request.get("upload", self.params.upload))
        data = env.train_data()
        stats = client_statistics(data.x, data.y, env.feature_map(), data.num_classes,
                                  batch_size=self.params.batch_size)
        arrays = encode_reply(stats, upload, gamma)
        return RecordDict({ARRAYS_KEY: to_record(arrays),
                           METRICS_KEY: MetricRecord({"num-examples": int(stats.count)})})

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A node serving several clients sums their statistics (or AA-law partial sums): exact and associative."""
        arrays = reduce_replies(from_record(r[ARRAYS_KEY]) for r in replies)  # decoded one at a time
        total = sum(int(r[METRICS_KEY]["num-examples"]) for r in replies)
        return RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord({"num-examples": total})})
