"""Server side of the engine: byte accounting on the Flower grid and the context a server part runs in."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.config import ScenarioConfig
from fedsim.engine.accounting import ACCOUNTING_KEY, ENGINE_KEY, NODE_KEY, record_nbytes
from fedsim.results.rundir import RunRecorder
from fedsim.scenario import ScenarioView, resolve_device, scenario_streams, test_split, train_split

DISCOVERY_TIMEOUT = 600.0


@dataclass
class Traffic:
    """Bytes moved so far, counted from the serialized records of the real messages."""

    up: int = 0  # sum over clients of what each uploaded (per-client sizes, also inside grouped replies)
    down: int = 0  # sum over clients of what each received
    messages_up: int = 0
    messages_down: int = 0
    per_client_up: dict[int, int] = field(default_factory=dict)
    per_client_down: dict[int, int] = field(default_factory=dict)
    failed: int = 0  # client-rounds that failed


@dataclass
class Exchange:
    """One ``send``/``stream`` of the server, as the engine saw it: who answered, who failed, what it cost.

    ``failed`` are the clients that failed (injected, crashed), ``silent`` those whose node never replied within
    ``simulation.timeout``; byte counts are this exchange's alone (per client and in total).
    """

    round: int
    message_type: str
    selected: list[int]
    answered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    silent: list[int] = field(default_factory=list)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)

    @property
    def total_up(self) -> int:
        return sum(self.bytes_up.values())

    @property
    def total_down(self) -> int:
        return sum(self.bytes_down.values())

    def mean_up_per_answering_client(self) -> float:
        """Mean upload of the clients that answered (0 when none did)."""
        ups = [self.bytes_up.get(pid, 0) for pid in self.answered]
        return float(np.mean(ups)) if ups else 0.0


@dataclass
class Reply:
    """One node's answer, seen per virtual client: which clients it covers, their content, who failed."""

    partition_ids: list[int]
    content: RecordDict | None
    failed: list[int]
    error: str | None = None
    node_id: int = 0

    @property
    def ok(self) -> bool:
        return self.content is not None


class AccountingGrid(Grid):
    """A Flower ``Grid`` that counts every byte and sorts replies, wrapping the real one.

    Flower's own strategies (FedAvg, FedProx, ...) run on it unchanged: it strips fedsim's accounting record from
    replies before they see them, orders node ids by partition id (so seeded sampling is reproducible) and
    returns replies sorted by partition id (so float sums are reproducible).
    """

    def __init__(self, inner: Grid, num_nodes: int) -> None:
        self.inner = inner
        self.num_nodes = num_nodes
        self.traffic = Traffic()
        self.node_clients: dict[int, list[int]] = {}  # node id -> virtual clients it serves
        self._sent: dict[str, tuple[int, int]] = {}  # message id -> (node id, content bytes)
        self.placement: dict[int, dict] = {}  # client -> Flower node, host, Ray nodes that ran it, replies

    # -- plumbing Flower's Grid requires ------------------------------------------------------------------
    def set_run(self, run) -> None:  # noqa: ANN001
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        if self.node_clients:
            return sorted(self.node_clients, key=lambda n: self.node_clients[n][0])
        return sorted(self.inner.get_node_ids())

    # -- discovery ------------------------------------------------------------------------------------------
    def discover(self, timeout: float = DISCOVERY_TIMEOUT) -> None:
        """Ask every node which virtual clients it serves (node ids are random in Flower's simulation)."""
        deadline = time.time() + timeout
        while len(list(self.inner.get_node_ids())) < self.num_nodes:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(list(self.inner.get_node_ids()))} of {self.num_nodes} nodes started")
            time.sleep(0.2)
        nodes = sorted(self.inner.get_node_ids())
        msgs = [Message(RecordDict(), node, MessageType.QUERY) for node in nodes]
        replies = self.inner.send_and_receive(msgs, timeout=timeout)
        answered = set()
        for msg in replies:
            if msg.has_error():
                raise RuntimeError(f"node {msg.metadata.src_node_id} failed during start-up: {msg.error.reason}")
            ids = list(msg.content.metric_records[ACCOUNTING_KEY]["partition_ids"])
            answered.add(msg.metadata.src_node_id)
            if ids:  # a node serving no client (more nodes than blocks of clients) is left out of the run
                self.node_clients[msg.metadata.src_node_id] = [int(i) for i in ids]
        if len(answered) != len(nodes):
            raise RuntimeError(f"discovery: {len(answered)} of {len(nodes)} nodes answered")

    # -- accounting -----------------------------------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        sizes = [record_nbytes(m.content) if m.has_content() else 0 for m in messages]
        ids = list(self.inner.push_messages(messages))
        for msg, size, mid in zip(messages, sizes, ids):
            node = msg.metadata.dst_node_id
            self._sent[mid] = (node, size)
            self.traffic.messages_down += 1
            for pid in self._selected_clients(msg, node):
                self.traffic.down += size
                self.traffic.per_client_down[pid] = self.traffic.per_client_down.get(pid, 0) + size
        return ids

    def _selected_clients(self, msg: Message, node: int) -> list[int]:
        clients = self.node_clients.get(node, [])
        if msg.has_content() and ENGINE_KEY in msg.content.config_records:
            selected = msg.content.config_records[ENGINE_KEY].get("partitions")
            if selected is not None:
                chosen = set(int(p) for p in selected)
                clients = [c for c in clients if c in chosen]
        return clients

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        for msg in replies:
            self._account_reply(msg)
        return replies

    def _account_reply(self, msg: Message) -> None:
        self.traffic.messages_up += 1
        self._sent.pop(msg.metadata.reply_to_message_id, None)
        if msg.has_error() or ACCOUNTING_KEY not in msg.content:
            node = msg.metadata.src_node_id
            self.traffic.failed += len(self.node_clients.get(node, [])) or 1
            return
        acc = msg.content.metric_records[ACCOUNTING_KEY]
        where = msg.content.config_records.get(NODE_KEY, {})
        for pid in acc["partition_ids"]:
            seen = self.placement.setdefault(int(pid), {"flower_node": msg.metadata.src_node_id, "hosts": set(),
                                                        "ray_nodes": set(), "replies": 0})
            seen["replies"] += 1
            if where.get("host"):
                seen["hosts"].add(str(where["host"]))
            if where.get("ray_node"):
                seen["ray_nodes"].add(str(where["ray_node"]))
        for pid, size in zip(acc["partition_ids"], acc["client_bytes"]):
            self.traffic.up += int(size)
            self.traffic.per_client_up[int(pid)] = self.traffic.per_client_up.get(int(pid), 0) + int(size)
        self.traffic.failed += len(acc["failed_ids"])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.iter_replies(messages, timeout=timeout))
        return [msg for _, msg in sorted(replies, key=lambda kv: kv[0])]

    def iter_replies(self, messages: Iterable[Message], *, timeout: float | None = None
                     ) -> Iterator[tuple[tuple, Message]]:
        """Push, then yield ``(sort key, reply)`` as replies arrive; accounting stripped from each content."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        while pending:
            got = list(self.pull_messages(pending))
            for msg in got:
                pending.discard(msg.metadata.reply_to_message_id)
                key = self._sort_key(msg)
                if msg.has_content() and NODE_KEY in msg.content:
                    del msg.content[NODE_KEY]
                if msg.has_content() and ACCOUNTING_KEY in msg.content:
                    self._last_accounting = msg.content.metric_records[ACCOUNTING_KEY]
                    del msg.content[ACCOUNTING_KEY]
                    msg.__dict__.setdefault("_fedsim", {})["accounting"] = self._last_accounting
                yield key, msg
            if not pending:
                break
            if deadline is not None and time.time() > deadline:
                for mid in pending:  # count the silent nodes as failed clients
                    node, _ = self._sent.pop(mid, (0, 0))
                    self.traffic.failed += len(self.node_clients.get(node, [])) or 1
                break
            if not got:
                time.sleep(0.01)

    def _sort_key(self, msg: Message) -> tuple:
        clients = self.node_clients.get(msg.metadata.src_node_id) or [1 << 30]
        return (clients[0], msg.metadata.src_node_id)


def placement_table(grid: "AccountingGrid"):  # noqa: ANN201
    """One row per client that replied: the Flower node that served it, the host(s) and Ray node(s) that ran its
    replies (several under Ray, whose actors serve any node's messages), how many replies it sent."""
    import pandas as pd

    rows = [{"client": pid, "flower_node": p["flower_node"], "host": ";".join(sorted(p["hosts"])),
             "ray_nodes": ";".join(sorted(p["ray_nodes"])), "replies": p["replies"]}
            for pid, p in sorted(grid.placement.items())]
    return pd.DataFrame(rows, columns=["client", "flower_node", "host", "ray_nodes", "replies"])


def accounting_of(msg: Message) -> dict:
    """The per-client accounting the node attached to ``msg`` (served, failed clients, their bytes)."""
    acc = msg.__dict__.get("_fedsim", {}).get("accounting")
    if acc is None:
        return {"partition_ids": [], "failed_ids": [], "client_bytes": []}
    return {k: [int(v) for v in acc[k]] for k in ("partition_ids", "failed_ids", "client_bytes")}


class ServerContext(ScenarioView):
    """What a strategy's server part works with (see docs/ARCHITECTURE.md)."""

    def __init__(self, config: ScenarioConfig, grid: AccountingGrid, recorder: RunRecorder, progress=None,
                 partitions: list | None = None) -> None:
        super().__init__(config, resolve_device(config.simulation.device))
        self.seed = config.seed
        self.grid = grid
        self.recorder = recorder
        self.run_dir = recorder.run_dir
        self.progress = progress
        self.partitions = partitions  # every client's indices into the training set (server-side bookkeeping)
        self.exchanges: list[Exchange] = []  # every send/stream so far, in order
        self.extra_summary: dict[str, Any] = {}
        self.model_saved = False
        self.start_time = time.time()
        self.rng = random.Random(config.seed)
        random.seed(config.seed)  # Flower's node sampling uses the global `random`
        self._last_step_bytes = (0, 0)
        self._label_counts: np.ndarray | None = None  # clients x classes, for client_accuracy

    # -- data ----------------------------------------------------------------------------------------------
    def test_data(self):
        return test_split(self.config)

    def train_data(self):
        """The whole training split (for centralized references computed on the server only)."""
        return train_split(self.config)

    def streams(self) -> list:
        """Every client's stream, exactly as the clients build them (see ``ClientEnv.stream``)."""
        return scenario_streams(self.config, self.partitions)

    def client_accuracy(self, class_accuracy: Any) -> dict[str, float]:
        """Mean, worst and spread over clients of the test accuracy re-weighted to each client's label mix
        (`fedsim.results.client_metrics`), as metrics for `log`; {} without a partition (streams, one client)."""
        from fedsim.results.client_metrics import client_accuracy_summary, label_counts

        if not self.partitions or len(self.partitions) < 2 or class_accuracy is None:
            return {}
        if self._label_counts is None:
            train = self.train_data()
            self._label_counts = label_counts(self.partitions, train.labels, train.num_classes)
        return client_accuracy_summary(class_accuracy, self._label_counts)

    @property
    def partition_ids(self) -> list[int]:
        return list(range(self.config.num_clients))

    @property
    def last_exchange(self) -> Exchange | None:
        return self.exchanges[-1] if self.exchanges else None

    # -- messaging -----------------------------------------------------------------------------------------
    def _messages(self, content: RecordDict, message_type: str, partitions, round_: int) -> list[Message]:
        chosen = None if partitions is None else set(int(p) for p in partitions)
        msgs = []
        for node in self.grid.get_node_ids():
            clients = self.grid.node_clients.get(node, [])
            if chosen is not None and not chosen.intersection(clients):
                continue
            engine = ConfigRecord({"round": int(round_)})
            if chosen is not None and not chosen.issuperset(clients):
                engine["partitions"] = sorted(chosen.intersection(clients))
            body = RecordDict(dict(content.items()))
            body[ENGINE_KEY] = engine
            msgs.append(Message(body, node, message_type, group_id=str(round_)))
        return msgs

    def stream(self, content: RecordDict, message_type: str = MessageType.TRAIN, partitions=None,
               round: int = 1) -> Iterator[Reply]:  # noqa: A002
        """Send ``content`` to the clients (all, or ``partitions``) and yield replies as they arrive.

        The exchange is recorded in ``ctx.exchanges`` (answered, failed and silent clients, bytes per client).
        """
        msgs = self._messages(content, message_type, partitions, round)
        selected = sorted(self.partition_ids if partitions is None else set(int(p) for p in partitions))
        exchange = Exchange(int(round), str(message_type), selected)
        self.exchanges.append(exchange)
        t = self.grid.traffic
        up_before, down_before = dict(t.per_client_up), dict(t.per_client_down)
        try:
            for _, msg in self.grid.iter_replies(msgs, timeout=self.config.simulation.timeout):
                reply = self._to_reply(msg)
                exchange.answered.extend(reply.partition_ids)
                exchange.failed.extend(reply.failed)
                yield reply
        finally:
            heard = set(exchange.answered) | set(exchange.failed)
            exchange.silent = [pid for pid in selected if pid not in heard]
            exchange.answered.sort()
            exchange.failed.sort()
            exchange.bytes_up = {pid: v - up_before.get(pid, 0) for pid, v in t.per_client_up.items()
                                 if v != up_before.get(pid, 0)}
            exchange.bytes_down = {pid: v - down_before.get(pid, 0) for pid, v in t.per_client_down.items()
                                   if v != down_before.get(pid, 0)}

    def send(self, content: RecordDict, message_type: str = MessageType.TRAIN, partitions=None,
             round: int = 1) -> list[Reply]:  # noqa: A002
        """Send and wait for all replies (or the timeout); replies sorted by their first partition id."""
        replies = list(self.stream(content, message_type, partitions, round))
        return sorted(replies, key=lambda r: (r.partition_ids or r.failed or [1 << 30])[0])

    def _to_reply(self, msg: Message) -> Reply:
        node = msg.metadata.src_node_id
        if msg.has_error():
            return Reply([], None, list(self.grid.node_clients.get(node, [])), msg.error.reason, node)
        acc = accounting_of(msg)
        return Reply(acc["partition_ids"], msg.content, acc["failed_ids"], None, node)

    # -- results -------------------------------------------------------------------------------------------
    def log(self, step: int, **metrics: Any) -> dict:
        """Record one row of metrics.csv; bytes and seconds come from the engine, not the strategy."""
        t = self.grid.traffic
        row = {"round": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        row.setdefault("accuracy", float("nan"))
        row.setdefault("loss", float("nan"))
        row["bytes_up"] = t.up
        row["bytes_down"] = t.down
        row["round_bytes_up"] = t.up - self._last_step_bytes[0]
        row["round_bytes_down"] = t.down - self._last_step_bytes[1]
        row["failed_clients"] = t.failed
        row["seconds"] = round(time.time() - self.start_time, 4)
        self._last_step_bytes = (t.up, t.down)
        self.recorder.append_metrics(row)
        if self.progress is not None:
            self.progress.update(row)
        return row

    def summary(self, **values: Any) -> None:
        self.extra_summary.update({k: _scalar(v) if np.isscalar(v) else v for k, v in values.items()})

    def save_model(self, obj: Any) -> None:
        self.recorder.save_model(obj)
        self.model_saved = True

    def save_table(self, name: str, table, index: bool = True) -> None:  # noqa: ANN001
        self.recorder.save_table(name, table, index=index)

    def set_total_steps(self, total: int) -> None:
        if self.progress is not None:
            self.progress.set_total(total)


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
