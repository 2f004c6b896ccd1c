"""Client side of the engine: the Flower ``ClientApp`` that hosts a strategy's client part.

A Flower node (one Ray actor at a time) serves a group of ``simulation.clients_per_node`` virtual clients. For
each client it builds a ``ClientEnv`` (the client's data, feature map, seed, device) and calls the strategy's client
part; injected failures and real exceptions are accounted per client; replies of a group are combined with the
client part's ``reduce``. Byte counts are taken from the serialized records each client would have sent alone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto

from fedsim.config import ScenarioConfig

ENGINE_KEY = "fedsim"  # ConfigRecord the server adds to every message: round, selected partitions
REDUCE_EVERY_BYTES = 256 * 2**20  # a grouped node combines its pending replies (with `reduce`) beyond this size
ACCOUNTING_KEY = "fedsim.accounting"
CLIENT_FAILED = 9001  # error code of a reply whose clients all failed (injected or crashed)  # MetricRecord the node adds to every reply; stripped by the server


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (scenario seed, round, partition id, purpose)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def failing_clients(seed: int, round_: int, num_clients: int, rate: float) -> frozenset[int]:
    """The clients that fail in ``round_``: exactly round(rate * N) of them, the same set in every process."""
    count = int(round(rate * num_clients))
    if count == 0:
        return frozenset()
    rng = np.random.default_rng(derive_seed(seed, round_, "failures"))
    return frozenset(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def node_group(node_partition: int, clients_per_node: int, num_clients: int) -> list[int]:
    """Virtual clients served by the Flower node with ``partition-id`` = ``node_partition``."""
    start = node_partition * clients_per_node
    return list(range(start, min(start + clients_per_node, num_clients)))


def concatenate_replies(replies: list[RecordDict]) -> RecordDict:
    """``reduce`` for client parts whose replies cannot be summed: a node sends its clients' records side by
    side, so their keys must carry the partition id (e.g. ``model.<pid>``)."""
    out = RecordDict()
    for reply in replies:
        for key, value in reply.items():
            if key in out:
                raise ValueError(f"two clients of one node replied with the same record key {key!r}")
            out[key] = value
    return out


def record_nbytes(content: RecordDict) -> int:
    """Size of ``content`` as Flower serializes it (protobuf), i.e. what goes over the wire.

    Exact, and cheap for large arrays: a RecordDict serializes as a repeated field of items, so its size is the
    sum of its items' sizes, and an ArrayRecord item's size depends only on its keys and on each array's dtype,
    shape, stype and number of data bytes. That layout's size is computed once and cached, instead of copying
    every client's arrays into a protobuf again (0.27 s for a 17 MB array on a busy 2-core machine).
    """
    total = 0
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            layout = (key, tuple((k, a.dtype, tuple(a.shape), a.stype, len(a.data)) for k, a in record.items()))
            size = _ARRAY_ITEM_NBYTES.get(layout)
            if size is None:
                if len(_ARRAY_ITEM_NBYTES) >= 4096:
                    _ARRAY_ITEM_NBYTES.clear()
                size = _ARRAY_ITEM_NBYTES[layout] = _item_nbytes(key, record)
            total += size
        else:
            total += _item_nbytes(key, record)
    return total


_ARRAY_ITEM_NBYTES: dict[tuple, int] = {}


def _item_nbytes(key: str, record: Any) -> int:
    return int(recorddict_to_proto(RecordDict({key: record})).ByteSize())


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


class ClientError(RuntimeError):
    """Raised on a node when every client it serves failed; Flower turns it into an error reply."""


@dataclass
class ClientEnv:
    """What a client part may use: its own data and the scenario, nothing from other clients."""

    partition_id: int
    num_clients: int
    config: ScenarioConfig
    params: Any
    round: int
    indices: np.ndarray
    device: str = "cpu"
    all_partitions: list | None = None  # every client's indices (for streams sharing one class order)

    @property
    def seed(self) -> int:
        return derive_seed(self.config.seed, self.round, self.partition_id, "client")

    def train_data(self):
        """This client's partition of the training set (tensors on the CPU)."""
        return _train_split(self.config).subset(self.indices)

    def feature_map(self):
        """The scenario's frozen feature map; the same map (same seed) on every node and on the server."""
        return scenario_feature_map(self.config, self.device)

    def stream(self):
        """This client's stream (tasks or online batches) over its partition; indices refer to the full train set.

        Built for all clients at once (the class order is shared, shuffling seeded per client) and cached.
        """
        if self.all_partitions is None:
            raise RuntimeError("ClientEnv.stream() needs the scenario's partitions")
        return scenario_streams(self.config, self.all_partitions)[self.partition_id]


_STREAM_CACHE: dict[tuple, list] = {}


def scenario_streams(config: ScenarioConfig, partitions: list[np.ndarray]) -> list:
    """One stream per client as the scenario's ``[stream]`` table describes (cached per process)."""
    from fedsim.streams import client_streams

    key = (id(partitions), config.seed, repr(config.stream))
    if key not in _STREAM_CACHE:
        s = config.stream
        if s.kind == "class-incremental":
            kwargs: dict[str, Any] = dict(tasks=s.tasks, first_task_classes=s.first_task_classes)
        elif s.kind == "online":
            kwargs = dict(batch_size=s.batch_size, imbalance=s.imbalance, imbalance_ratio=s.imbalance_ratio,
                          classes_over_time=s.classes_over_time)
        else:
            raise RuntimeError("stream.kind is 'none': this scenario has no stream")
        labels = _train_split(config).labels
        _STREAM_CACHE.clear()
        _STREAM_CACHE[key] = client_streams(labels, partitions, kind=s.kind, seed=config.seed, **kwargs)
    return _STREAM_CACHE[key]


@functools.lru_cache(maxsize=8)
def _split_cached(name: str, split: str, root: str | None, max_n: int | None, seed: int, options: tuple):
    from fedsim.data import load_dataset

    data = load_dataset(name, split=split, root=root, **dict(options))
    if max_n is not None and max_n < len(data):  # a seeded slice, the same in every process
        keep = np.sort(np.random.default_rng(derive_seed(seed, f"{split}-slice")).permutation(len(data))[:max_n])
        data = data.subset(keep)
    return data


def _split(config: ScenarioConfig, split: str):
    d = config.data
    max_n = d.max_train if split == "train" else d.max_test
    return _split_cached(d.name, split, d.root, max_n, config.seed, tuple(sorted(d.options.items())))


def _train_split(config: ScenarioConfig):
    return _split(config, "train")


def train_split(config: ScenarioConfig):
    """The scenario's training set (after ``data.max_train``), cached per process."""
    return _train_split(config)


def test_split(config: ScenarioConfig):
    """The scenario's test set (after ``data.max_test``), cached per process."""
    return _split(config, "test")


@functools.lru_cache(maxsize=4)
def _feature_map_cached(name: str, input_shape: tuple, dim: int, seed: int, weights: str | None, device: str):
    from fedsim.features import build_feature_map

    return build_feature_map(name, input_shape=input_shape, dim=dim, seed=seed, weights=weights, device=device)


def scenario_feature_map(config: ScenarioConfig, device: str = "cpu"):
    m = config.model
    shape = tuple(_train_split(config).input_shape)
    return _feature_map_cached(m.feature_map, shape, m.feature_dim, derive_seed(config.seed, "feature-map"),
                               m.weights, device)


def partition_for(config: ScenarioConfig) -> list[np.ndarray]:
    """The scenario's partition of the training set (deterministic from the seed)."""
    from fedsim.partition import partition_indices

    p = config.partition
    return partition_indices(
        _train_split(config).labels, kind=p.kind, num_clients=p.num_clients, seed=config.seed,
        alpha=p.alpha, classes_per_client=p.classes_per_client, quantity_alpha=p.quantity_alpha,
        min_partition_size=p.min_partition_size,
    )


class NodeHandler:
    """Runs on a Flower node: dispatches a message to the client part for each client the node serves."""

    def __init__(self, config: ScenarioConfig, partitions: list[np.ndarray]) -> None:
        from fedsim.engine.registry import get_strategy

        self.config = config
        self.partitions = partitions
        self.spec = get_strategy(config.strategy.name)

    def __call__(self, kind: str, msg: Message, context: Context) -> Message:
        cfg = self.config
        node_partition = int(context.node_config["partition-id"])
        group = node_group(node_partition, cfg.simulation.clients_per_node, cfg.num_clients)
        if kind == "query":  # discovery: which clients does this node serve
            return Message(RecordDict({ACCOUNTING_KEY: MetricRecord({"partition_ids": group})}), reply_to=msg)

        engine = msg.content.config_records.get(ENGINE_KEY, ConfigRecord())
        round_ = int(engine.get("round", _flower_round(msg.content)))
        selected = engine.get("partitions")
        if selected is not None:
            wanted = set(int(p) for p in selected)
            group = [p for p in group if p in wanted]
        content = RecordDict({k: v for k, v in msg.content.items() if k != ENGINE_KEY})

        _limit_threads(cfg.simulation.num_cpus)
        client = self.spec.client(cfg.strategy.params)
        handler = getattr(client, kind, None)
        if handler is None:
            raise ClientError(f"strategy {cfg.strategy.name!r} has no client-side {kind!r} handler")
        failing = failing_clients(cfg.seed, round_, cfg.num_clients, cfg.simulation.failure_rate)
        device = resolve_device(cfg.simulation.device)

        replies: list[RecordDict] = []
        served, failed, sizes, reasons = [], [], [], []
        pending_bytes = 0
        for pid in group:
            if pid in failing:
                failed.append(pid)
                reasons.append(f"client {pid}: injected failure (simulation.failure_rate)")
                continue
            env = ClientEnv(pid, cfg.num_clients, cfg, cfg.strategy.params, round_, self.partitions[pid], device,
                            self.partitions)
            try:
                reply = handler(content, env)
            except Exception:  # a real client crash: account it, keep the rest of the group
                failed.append(pid)
                reasons.append(f"client {pid}: {traceback.format_exc(limit=3)}")
                continue
            served.append(pid)
            sizes.append(record_nbytes(reply))
            replies.append(reply)
            pending_bytes += sizes[-1]
            if len(replies) > 1 and pending_bytes > REDUCE_EVERY_BYTES:  # bound the node's memory: fold early
                replies = [self.spec.client.reduce(replies)]
                pending_bytes = max(sizes)
        if not replies:  # an error reply, as Flower makes for a crashed ClientApp, without a logged traceback
            reason = "; ".join(reasons) or "no client selected on this node"
            return Message(Error(code=CLIENT_FAILED, reason=reason), reply_to=msg)
        out = replies[0] if len(replies) == 1 else self.spec.client.reduce(replies)
        out[ACCOUNTING_KEY] = MetricRecord(
            {"partition_ids": served, "failed_ids": failed, "client_bytes": sizes}
        )
        return Message(out, reply_to=msg)


def _flower_round(content: RecordDict) -> int:
    """Flower's own strategies put the round into their ConfigRecord as ``server-round``."""
    for record in content.config_records.values():
        if "server-round" in record:
            return int(record["server-round"])
    return 0


def _limit_threads(num_cpus: float) -> None:
    """Each simulated client gets the CPUs Ray reserved for it, no more (avoids oversubscription)."""
    import torch

    n = max(1, int(num_cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    _limit_blas_threads(n)


@functools.lru_cache(maxsize=8)
def _limit_blas_threads(n: int) -> None:
    """numpy's and scipy's OpenBLAS read OMP_NUM_THREADS only when loaded (too late here): cap them at run time.

    Without this, every actor's numpy/scipy math spins all cores' worth of BLAS threads; on a busy 2-core machine a
    256 x 256 Cholesky then took 0.7 s instead of 0.4 ms.
    """
    try:
        import scipy.linalg  # noqa: F401  (load scipy's BLAS too, so the limit covers it)
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return
    threadpool_limits(limits=n, user_api="blas")


def build_client_app(config: ScenarioConfig, partitions: list[np.ndarray]) -> ClientApp:
    """The Flower ClientApp for ``config``; partitions travel with it (computed once by the driver)."""
    handler = NodeHandler(config, partitions)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handler("train", msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handler("evaluate", msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return handler("query", msg, context)

    return app
