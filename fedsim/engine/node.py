"""The node side of the engine: the Flower ``ClientApp`` that hosts a strategy's client part.

A Flower node (a Ray actor at a time, or a SuperNode of the deployment engine) serves a group of
``simulation.clients_per_node`` virtual clients. For each it builds a ``ClientEnv`` (the client's own partition,
the shared scenario view, its persistent state) and calls the strategy's client part; injected failures and real
exceptions are accounted per client; replies of a group are combined with the client part's ``reduce``. Byte
counts are taken from the serialized records each client would have sent alone. Byzantine clients
(``simulation.byzantine_fraction``) are simulated here, after the client part, so every strategy's client stays
honest code; the node reads and writes the model of a reply through the codec the strategy's spec declares
(``StrategySpec.model_codec``), so it knows no algorithm's keys. The client part is checked against its contract
(``fedsim.engine.parts.ClientPart``, by ``StrategySpec.client_class``) when the node first builds it.
"""

from __future__ import annotations

import functools
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from fedsim.config import ScenarioConfig
from fedsim.engine.accounting import ACCOUNTING_KEY, CLIENT_FAILED, CLIENT_SEPARATOR, ENGINE_KEY, HOLDS_STATE, \
    NODE_KEY, PER_CLIENT, failing_clients, node_group, record_nbytes
from fedsim.registry import get_strategy
from fedsim.scenario import ScenarioView, client_stream, derive_seed, partition_for, resolve_device, train_split

REDUCE_EVERY_BYTES = 256 * 2**20  # a grouped node combines its pending replies (with `reduce`) beyond this size
# the reply metrics the node reads per client for clients.csv (fedsim.results.client_metrics), before `reduce`
# merges a group's replies: Flower's conventions (FedAvg's weighted_by_key, QFedAvg's train_loss_key), which
# fedsim.frameworks.model_rounds_protocol's WEIGHT_KEY and LOSS_KEY follow
EXAMPLES_METRIC = "num-examples"
TRAIN_LOSS_METRIC = "train_loss"
STATE_OP = "client-state"  # a query's engine record: "get" / "set" the clients' states (fedsim.engine.checkpoint)


class ClientError(RuntimeError):
    """Raised on a node when every client it serves failed; Flower turns it into an error reply."""


class ClientEnv(ScenarioView):
    """What a client part may use: the scenario view, its own partition and its own state, nothing of others.

    ``state`` is a ``flwr.app.RecordDict`` that persists between the messages this client receives (kept in the
    node's Flower ``Context.state``, one namespace per client when a node serves several): a stateful client part
    (warm starts, control variates) reads and writes it in place. It survives for the life of the node, as Flower
    keeps a node's context, and is empty at a client's first message.
    """

    def __init__(self, config: ScenarioConfig, partition_id: int, round: int, indices: np.ndarray,  # noqa: A002
                 device: str = "cpu", state: RecordDict | None = None) -> None:
        super().__init__(config, device)
        self.partition_id = int(partition_id)
        self.round = int(round)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.state = RecordDict() if state is None else state

    @property
    def seed(self) -> int:
        """This client's seed in this round (derived from the scenario seed, the round and the partition id)."""
        return derive_seed(self.config.seed, self.round, self.partition_id, "client")

    def train_data(self):  # noqa: ANN201
        """This client's partition of the training set (tensors on the CPU)."""
        return train_split(self.config).subset(self.indices)

    def stream(self):  # noqa: ANN201
        """This client's stream (tasks or online batches) over its partition; indices refer to the full train set."""
        return _cached_stream(self.config, self.partition_id, self.indices)


_CLIENT_STREAMS: dict[tuple, object] = {}


def _cached_stream(config: ScenarioConfig, pid: int, indices: np.ndarray):  # noqa: ANN202
    key = (config.seed, repr(config.stream), repr(config.data), repr(config.partition), pid)
    if key not in _CLIENT_STREAMS:
        if len(_CLIENT_STREAMS) > 64:
            _CLIENT_STREAMS.clear()
        _CLIENT_STREAMS[key] = client_stream(config, pid, indices)
    return _CLIENT_STREAMS[key]


def client_state(context_state: RecordDict, pid: int) -> RecordDict:
    """Client ``pid``'s own state, out of the node's Flower context (records shared, not copied)."""
    prefix = f"{pid}{CLIENT_SEPARATOR}"
    return RecordDict({k[len(prefix):]: v for k, v in context_state.items() if k.startswith(prefix)})


def store_client_state(context_state: RecordDict, pid: int, state: RecordDict) -> None:
    """Replace client ``pid``'s namespace in the node's context with ``state``."""
    prefix = f"{pid}{CLIENT_SEPARATOR}"
    for key in [k for k in context_state.keys() if k.startswith(prefix)]:
        del context_state[key]
    for key, record in state.items():
        context_state[f"{prefix}{key}"] = record


def reported_metrics(reply: RecordDict) -> tuple[int, float]:
    """(examples, train loss) one client's reply reports in any of its MetricRecords under Flower's keys
    (``EXAMPLES_METRIC``, ``TRAIN_LOSS_METRIC``; the first record holding each): -1 / NaN where it reports none,
    and a NaN loss for a client that trained on no example (the replies write 0 there to keep sums finite)."""
    examples, loss = -1, float("nan")
    for record in reply.metric_records.values():
        if examples < 0 and isinstance(record.get(EXAMPLES_METRIC), (int, float)):
            examples = int(record[EXAMPLES_METRIC])
        if loss != loss and isinstance(record.get(TRAIN_LOSS_METRIC), (int, float)):
            loss = float(record[TRAIN_LOSS_METRIC])
    return examples, (float("nan") if examples == 0 else loss)


@dataclass
class GroupReply:
    """What a client part's optional ``train_group(content, envs)`` hook answers for all the clients of a node at
    once (``fedsim.engine.parts.ClientPart``): ``content``, the group's combined reply (what ``reduce`` of their
    own replies would give), and per client, in the order of ``envs``, the bytes of the reply it would have sent
    alone (``record_nbytes``), the examples and the train loss it reports (NaN for none)."""

    content: RecordDict
    client_bytes: list[int]
    client_examples: list[int]
    client_train_loss: list[float]


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


def side_by_side(partition_ids: list[int], replies: list[RecordDict]) -> RecordDict:
    """One node reply holding each client's own reply under ``<partition id>/<key>`` (``PER_CLIENT`` requests:
    ``fedsim.engine.client_grid`` splits it back into one reply per client)."""
    out = RecordDict()
    for pid, reply in zip(partition_ids, replies):
        for key, value in reply.items():
            out[f"{pid}{CLIENT_SEPARATOR}{key}"] = value
    return out


BYZANTINE_DEFAULT_SCALE = {"sign-flip": 1.0, "scale": 10.0}


def byzantine_clients(config: ScenarioConfig) -> frozenset[int]:
    """The byzantine clients: round(byzantine_fraction * N) of them, drawn once from the scenario seed, so every
    process (driver, Ray actors, SuperNodes) derives the same set; fixed for the whole run."""
    sim, n = config.simulation, config.num_clients
    count = int(round(sim.byzantine_fraction * n))
    if count == 0:
        return frozenset()
    rng = np.random.default_rng(derive_seed(config.seed, "byzantine"))
    return frozenset(int(i) for i in rng.choice(n, size=count, replace=False))


def byzantine_factor(config: ScenarioConfig) -> float:
    """What a byzantine client multiplies its update by: -scale (sign-flip, default scale 1) or +scale (scale,
    default 10)."""
    sim = config.simulation
    scale = BYZANTINE_DEFAULT_SCALE[sim.byzantine_mode] if sim.byzantine_scale is None else sim.byzantine_scale
    return -float(scale) if sim.byzantine_mode == "sign-flip" else float(scale)


def byzantine_summary(config: ScenarioConfig) -> dict:
    """summary.json entries describing the attack ({} without byzantine clients)."""
    clients = byzantine_clients(config)
    if not clients:
        return {}
    return {"byzantine_clients": sorted(clients), "byzantine_mode": config.simulation.byzantine_mode,
            "byzantine_factor": byzantine_factor(config)}


def byzantine_update(local: dict[str, np.ndarray], received: dict[str, np.ndarray],
                     factor: float) -> dict[str, np.ndarray]:
    """``received + factor * (local - received)`` on floating arrays, in their dtype; integer arrays (BatchNorm's
    step counters) stay as the client computed them."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and key in received:
            ref = np.asarray(received[key], dtype=np.float64)
            out[key] = (ref + factor * (value.astype(np.float64) - ref)).astype(value.dtype)
        else:
            out[key] = value
    return out


def _attack(codec: Any, content: RecordDict, reply: RecordDict, factor: float) -> None:
    """Replace the model of ``reply`` (relative to the model received in ``content``, both read with the
    strategy's ``codec``, a ``fedsim.engine.parts.ModelCodec``) by the byzantine one, in place; a message without
    a model is left alone."""
    received, sent = codec.read(content), codec.read(reply)
    if received is not None and sent is not None:
        codec.write(reply, byzantine_update(sent, received, factor))


class NodeHandler:
    """Runs on a Flower node: dispatches a message to the client part for each client the node serves.

    ``partitions`` (every client's indices, computed once by the driver) spares each actor recomputing them; where
    it is None (the deployment engine), the node derives the partition itself from the scenario.
    """

    def __init__(self, config: ScenarioConfig, partitions: list[np.ndarray] | None = None,
                 group_of: Callable[[Context], list[int]] | None = None) -> None:
        self.config = config
        self.partitions = partitions
        self.group_of = group_of
        self.spec = get_strategy(config.strategy.name)
        self._client_cls: type | None = None

    def _client_class(self) -> type:
        """The client part, imported and checked against ``ClientPart`` once per handler."""
        if self._client_cls is None:
            cls = self.spec.client_class()
            if cls is None:
                raise ClientError(f"strategy {self.spec.name!r} has no client part")
            self._client_cls = cls
        return self._client_cls

    def _indices(self, pid: int) -> np.ndarray:
        if self.partitions is None:
            self.partitions = partition_for(self.config)
        return self.partitions[pid]

    def _group(self, context: Context) -> list[int]:
        if self.group_of is not None:
            return self.group_of(context)
        cfg = self.config
        return node_group(int(context.node_config["partition-id"]), cfg.simulation.clients_per_node,
                          cfg.num_clients)

    def __call__(self, kind: str, msg: Message, context: Context) -> Message:
        cfg = self.config
        group = self._group(context)
        if kind == "query" and ENGINE_KEY in msg.content.config_records:  # a checkpoint's clients' states
            return _client_states(msg, context, group)
        if kind == "query":  # discovery: which clients does this node serve
            return Message(RecordDict({ACCOUNTING_KEY: MetricRecord({"partition_ids": group})}), reply_to=msg)

        engine = msg.content.config_records.get(ENGINE_KEY, ConfigRecord())
        round_ = int(engine.get("round", _flower_round(msg.content)))
        selected = engine.get("partitions")
        per_client = bool(engine.get(PER_CLIENT, 0))  # the clients' replies side by side, not reduced
        if selected is not None:
            wanted = set(int(p) for p in selected)
            group = [p for p in group if p in wanted]
        content = RecordDict({k: v for k, v in msg.content.items() if k != ENGINE_KEY})

        _limit_threads(cfg.simulation.num_cpus)
        client_cls = self._client_class()
        client = client_cls(cfg.strategy.params)
        handler = getattr(client, kind, None)
        if handler is None:
            raise ClientError(f"strategy {cfg.strategy.name!r} has no client-side {kind!r} handler")
        failing = failing_clients(cfg.seed, round_, cfg.num_clients, cfg.simulation.failure_rate)
        byzantine = byzantine_clients(cfg) if kind == "train" else frozenset()
        codec = self.spec.model_codec_object() if byzantine else None
        device = resolve_device(cfg.simulation.device)

        if kind == "train" and not per_client and hasattr(client, "train_group") \
                and not byzantine.intersection(group):
            batched = self._train_group(client, content, context, group, failing, round_, device)
            if batched is not None:
                return Message(batched, reply_to=msg)

        reduce = getattr(client_cls, "reduce", None)  # None: a part whose replies are never combined
        replies: list[RecordDict] = []
        served, failed, sizes, reasons = [], [], [], []
        examples, losses = [], []  # per served client, from its own reply (reduce would merge them)
        pending_bytes = 0
        for pid in group:
            if pid in failing:
                failed.append(pid)
                reasons.append(f"client {pid}: injected failure (simulation.failure_rate)")
                continue
            state = client_state(context.state, pid)
            env = ClientEnv(cfg, pid, round_, self._indices(pid), device, state)
            try:
                reply = handler(content, env)
            except Exception:  # a real client crash: account it, keep the rest of the group
                failed.append(pid)
                reasons.append(f"client {pid}: {traceback.format_exc(limit=3)}")
                continue
            store_client_state(context.state, pid, env.state)
            if pid in byzantine:
                _attack(codec, content, reply, byzantine_factor(cfg))
            served.append(pid)
            sizes.append(record_nbytes(reply))
            n, loss = reported_metrics(reply)
            examples.append(n)
            losses.append(loss)
            replies.append(reply)
            pending_bytes += sizes[-1]
            if not per_client and len(replies) > 1 and pending_bytes > REDUCE_EVERY_BYTES \
                    and reduce is not None:  # bound memory: fold
                replies = [reduce(replies)]
                pending_bytes = max(sizes)
        if not replies:  # an error reply, as Flower makes for a crashed ClientApp, without a logged traceback
            reason = "; ".join(reasons) or "no client selected on this node"
            return Message(Error(code=CLIENT_FAILED, reason=reason), reply_to=msg)
        if per_client:
            out = side_by_side(served, replies)
        elif len(replies) == 1:
            out = replies[0]
        elif reduce is None:  # a client-addressed strategy sent a node-wide request
            raise ClientError(f"strategy {cfg.strategy.name!r}: a node serving {len(group)} clients got one request "
                              "for all of them, but its client part has no reduce; its server must address each "
                              "client (fedsim.engine.client_grid)")
        else:
            out = reduce(replies)
        return Message(_accounted(out, context, served, failed, sizes, examples, losses), reply_to=msg)

    # ---- batched clients (issue #26) ------------------------------------------------------------------------
    def _train_group(self, client: Any, content: RecordDict, context: Context, group: list[int],
                     failing: frozenset[int], round_: int, device: str) -> RecordDict | None:
        """The node's reply from the client part's ``train_group(content, envs)`` over every client of the group
        that is not an injected failure, with the same accounting as the per-client loop (per-client bytes,
        examples, losses; injected failures listed). None (the per-client loop then runs) where the part declines
        (returns None), no client is left, or the hook raises: the loop then attributes a crash to the client
        that crashes. States are stored only after the hook returned."""
        served = [pid for pid in group if pid not in failing]
        if not served:
            return None
        envs = [ClientEnv(self.config, pid, round_, self._indices(pid), device, client_state(context.state, pid))
                for pid in served]
        try:
            result = client.train_group(content, envs)
        except Exception:  # noqa: BLE001 - the per-client loop accounts it client by client
            return None
        if result is None:
            return None
        if not (len(result.client_bytes) == len(result.client_examples) == len(result.client_train_loss)
                == len(served)):
            raise ClientError(f"train_group answered for {len(result.client_bytes)} clients, not {len(served)}")
        for env in envs:
            store_client_state(context.state, env.partition_id, env.state)
        return _accounted(result.content, context, served, [pid for pid in group if pid in failing],
                          [int(b) for b in result.client_bytes], [int(n) for n in result.client_examples],
                          [float(v) for v in result.client_train_loss])


def _accounted(out: RecordDict, context: Context, served: list[int], failed: list[int], sizes: list[int],
               examples: list[int], losses: list[float]) -> RecordDict:
    """``out`` with the node's accounting record (per served client: bytes, examples, train loss; the failed
    clients; whether the node holds a client state) and where it ran: what the server's grid reads and strips."""
    out[ACCOUNTING_KEY] = MetricRecord(
        {"partition_ids": served, "failed_ids": failed, "client_bytes": sizes, "client_examples": examples,
         "client_train_loss": losses, HOLDS_STATE: _holds_state(context)})
    out[NODE_KEY] = where_running()
    return out


def _holds_state(context: Context) -> int:
    """1 where any client of this node keeps a state (``ClientEnv.state``), else 0: a round checkpoint asks only
    such nodes for their clients' states (FedAvg's 1,000 nodes held none and were queried every round)."""
    return int(any(CLIENT_SEPARATOR in key for key in context.state.keys()))


def _client_states(msg: Message, context: Context, group: list[int]) -> Message:
    """The query of a round checkpoint (``fedsim.engine.checkpoint``): "get" answers the namespaces of this
    node's clients in its ``Context.state``; "set" replaces them by those the message carries (a resumed run)."""
    op = msg.content.config_records[ENGINE_KEY].get(STATE_OP)
    prefixes = tuple(f"{pid}{CLIENT_SEPARATOR}" for pid in group)
    if op == "get":
        return Message(RecordDict({k: v for k, v in context.state.items() if k.startswith(prefixes)}), reply_to=msg)
    if op != "set":
        return Message(Error(code=CLIENT_FAILED, reason=f"unknown query {op!r}"), reply_to=msg)
    for key in [k for k in context.state.keys() if k.startswith(prefixes)]:
        del context.state[key]
    for key, record in msg.content.items():
        if key != ENGINE_KEY and key.startswith(prefixes):
            context.state[key] = record
    return Message(RecordDict(), reply_to=msg)


def where_running() -> ConfigRecord:
    """Where this reply was computed: the host and, under Ray, the Ray node (the run's nodes.csv reports it)."""
    from fedsim.engine.ray_session import node_id

    return ConfigRecord({"host": socket.gethostname(), "ray_node": node_id() or ""})


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
    """numpy's and scipy's OpenBLAS read their thread count only when loaded: the ones already loaded (numpy's)
    are capped at run time, one loaded later (scipy's) reads ``OPENBLAS_NUM_THREADS`` (set here unless the user
    set it), so scipy is not imported for a client that never uses it (0.3 CPU-s per actor, issue #26).

    Without this, every actor's numpy/scipy math spins all cores' worth of BLAS threads; on a busy 2-core machine a
    256 x 256 Cholesky then took 0.7 s instead of 0.4 ms.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return
    threadpool_limits(limits=n, user_api="blas")


def build_client_app(config: ScenarioConfig, partitions: list[np.ndarray] | None = None) -> ClientApp:
    """The Flower ClientApp for ``config``; partitions travel with it (computed once by the driver). The client
    part is checked against its contract here, so a part without ``train`` fails on the driver, before any node
    starts, with an error naming the hook."""
    handler = NodeHandler(config, partitions)
    handler.spec.client_class()  # raises PartContractError naming a missing hook
    return client_app_for(handler)


def client_app_for(dispatch: Callable[[str, Message, Context], Message]) -> ClientApp:
    """A ClientApp whose train, evaluate and query messages all go to ``dispatch(kind, msg, context)``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return dispatch("train", msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return dispatch("evaluate", msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return dispatch("query", msg, context)

    return app
