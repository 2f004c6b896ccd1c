"""Server side of the engine: byte accounting on the Flower grid and the context a server part runs in."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.config import ScenarioConfig
from fedsim.engine.accounting import ACCOUNTING_KEY, ENGINE_KEY, HOLDS_STATE, NODE_KEY, PER_CLIENT, record_nbytes
from fedsim.engine.checkpoint import RoundCheckpoint
from fedsim.engine.clock import SimClock
from fedsim.engine.grid import WrappedGrid
from fedsim.results.client_metrics import LABEL_MIX_ACCURACY, LOCAL_ACCURACY, ClientLedger
from fedsim.results.rundir import RunRecorder
from fedsim.scenario import ScenarioView, resolve_device, scenario_streams, test_split, train_split

DISCOVERY_TIMEOUT = 600.0
# Once every node has registered, discovery waits at most this long for the engine to say which clients each node
# serves before it asks the nodes instead (an engine that never says must not cost the whole DISCOVERY_TIMEOUT).
KNOWN_GRACE = 5.0
# While replies are outstanding the grid pulls every REPLY_POLL_MIN s, doubling to REPLY_POLL_MAX while none
# arrives: a pull of Flower's in-memory link state checks every pending message (expiry, federation), and pulling
# every 10 ms cost the driver ~5 ms a pull at 100 messages in flight (issue #26); a reply waits at most 0.1 s more.
REPLY_POLL_MIN, REPLY_POLL_MAX = 0.01, 0.1
CLIENTS_FILE = "clients.csv"  # per round and client (fedsim.results.client_metrics.ClientLedger; docs/run-files.md)


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


class AccountingGrid(WrappedGrid):
    """A Flower ``Grid`` that counts every byte and sorts replies, wrapping the real one.

    Flower's own strategies (FedAvg, FedProx, ...) run on it unchanged: it strips fedsim's accounting record from
    replies before they see them, orders node ids by partition id (so seeded sampling is reproducible) and
    returns replies sorted by partition id (so float sums are reproducible).
    """

    clock = None  # fedsim.engine.clock.SimClock of a run with a [system] section (set by ServerContext)
    ready_at: float | None = None  # when discover() ended (time.time())

    def __init__(self, inner: Grid, num_nodes: int) -> None:
        super().__init__(inner)
        self.num_nodes = num_nodes
        self.traffic = Traffic()
        self.node_clients: dict[int, list[int]] = {}  # node id -> virtual clients it serves
        self._sent: dict[str, tuple[int, int]] = {}  # message id -> (node id, content bytes)
        self.state_changed: set[int] = set()  # nodes that answered holding a client state (or failed) since the
        # last round checkpoint (fedsim.engine.checkpoint asks these, and those with a reply outstanding)
        self._sent_to: dict[str, tuple[int, list[int]]] = {}  # message id -> (round, the clients it was sent to)
        self.ledger = ClientLedger()  # clients.csv's rows: per round and client, what was sent and answered
        self.placement: dict[int, dict] = {}  # client -> Flower node, host, Ray nodes that ran it, replies

    # -- plumbing Flower's Grid requires (set_run, run: WrappedGrid) -------------------------------------------
    def get_node_ids(self) -> list[int]:
        if self.node_clients:
            return sorted(self.node_clients, key=lambda n: self.node_clients[n][0])
        return sorted(self.inner.get_node_ids())

    # -- discovery ------------------------------------------------------------------------------------------
    def discover(self, timeout: float = DISCOVERY_TIMEOUT,
                 known: Callable[[], dict[int, list[int]] | None] | None = None,
                 grace: float = KNOWN_GRACE) -> None:
        """Find out which virtual clients each node serves (node ids are random in Flower's simulation): from
        ``known()`` where the engine that started the nodes can say (node id -> its clients; None until it can),
        else by asking every node with a query message (1,000 messages through Ray at 1,000 nodes, issue #26);
        ``known()`` gets ``grace`` seconds after the last node registered before the nodes are asked."""
        deadline = time.time() + timeout
        all_up_at = None  # when every node had registered
        while True:
            nodes = sorted(self.inner.get_node_ids())
            groups = known() if known is not None else None
            if len(nodes) >= self.num_nodes:
                if known is None or groups is not None:
                    break
                all_up_at = all_up_at or time.time()
                if time.time() - all_up_at > grace:
                    break  # the engine has not said: ask the nodes
            elif time.time() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {self.num_nodes} nodes started")
            time.sleep(0.05)
        if groups is not None and set(groups) == set(nodes):
            self.node_clients = {node: [int(i) for i in ids] for node, ids in groups.items() if ids}
            self.ready_at = time.time()
            return
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
        self.ready_at = time.time()  # the nodes are up: the run's set-up ends here

    # -- accounting -----------------------------------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        sizes = [_client_nbytes(m.content) if m.has_content() else 0 for m in messages]
        ids = list(self.inner.push_messages(messages))
        for msg, size, mid in zip(messages, sizes, ids):
            node = msg.metadata.dst_node_id
            self._sent[mid] = (node, size)
            self.traffic.messages_down += 1
            clients = self._selected_clients(msg, node)
            for pid in clients:
                self.traffic.down += size
                self.traffic.per_client_down[pid] = self.traffic.per_client_down.get(pid, 0) + size
            self._sent_to[mid] = (_round_of(msg), clients)
            self.ledger.sent(_round_of(msg), clients, size)
        return ids

    def take_state_changed(self) -> set[int]:
        """The nodes whose clients' states may have changed since the last call: those that answered holding one
        (or failed), and those with a reply outstanding; the record starts again empty."""
        nodes = self.state_changed | {node for node, _ in self._sent.values()}
        self.state_changed = set()
        return nodes

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
        round_, clients = self._sent_to.pop(msg.metadata.reply_to_message_id, (_round_of(msg), None))
        if msg.has_error() or ACCOUNTING_KEY not in msg.content:
            node = msg.metadata.src_node_id
            self.state_changed.add(node)  # unknown: a checkpoint asks it
            self.traffic.failed += len(self.node_clients.get(node, [])) or 1
            self.ledger.lost(round_, self.node_clients.get(node, []) if clients is None else clients)
            return
        acc = msg.content.metric_records[ACCOUNTING_KEY]
        if acc.get(HOLDS_STATE, 1):
            self.state_changed.add(msg.metadata.src_node_id)
        self.ledger.replied(round_, _accounting_lists(acc))
        msg.__dict__.setdefault("_fedsim", {})["round"] = round_  # for a drop by the simulated clock, later
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
        """Push, then yield ``(sort key, reply)`` as replies arrive; accounting stripped from each content; with a
        simulated clock (``[system]``), timed by it, the replies it drops turned into error replies."""
        if self.clock is None:
            return self._iter_replies(messages, timeout=timeout)
        messages = list(messages)
        return self._ledger_drops(self.clock.exchange(
            messages, self._iter_replies(messages, timeout=timeout),
            lambda m: self._selected_clients(m, m.metadata.dst_node_id), record_nbytes,
            lambda m: sum(accounting_of(m)["client_bytes"]), self.traffic))

    def _ledger_drops(self, replies: Iterator[tuple[tuple, Message]]) -> Iterator[tuple[tuple, Message]]:
        """clients.csv: a reply the clock turned into an error (deadline, offline, over-selected) after its
        clients answered marks them failed (their bytes stay counted, as the traffic does)."""
        for key, msg in replies:
            seen = msg.__dict__.get("_fedsim", {})
            if msg.has_error() and "round" in seen:
                self.ledger.lost(seen["round"], accounting_of(msg)["partition_ids"])
            yield key, msg

    def _iter_replies(self, messages: Iterable[Message], *, timeout: float | None = None
                      ) -> Iterator[tuple[tuple, Message]]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        wait = REPLY_POLL_MIN
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
                    round_, clients = self._sent_to.pop(mid, (0, []))
                    self.ledger.lost(round_, clients, silent=True)
                break
            if got:
                wait = REPLY_POLL_MIN
            else:  # each pull checks every pending message in Flower's link state: back off while none arrives
                time.sleep(wait)
                wait = min(2 * wait, REPLY_POLL_MAX)

    def _sort_key(self, msg: Message) -> tuple:
        clients = self.node_clients.get(msg.metadata.src_node_id) or [1 << 30]
        return (clients[0], msg.metadata.src_node_id)


def _client_nbytes(content: RecordDict) -> int:
    """Bytes of a message as each client it carries would receive it: a per-client request (one message for the
    clients a Flower strategy addressed one by one, fedsim.engine.client_grid) without its engine record."""
    engine = content.config_records.get(ENGINE_KEY)
    if engine is not None and engine.get(PER_CLIENT):
        return record_nbytes(RecordDict({k: v for k, v in content.items() if k != ENGINE_KEY}))
    return record_nbytes(content)


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


def _accounting_lists(acc) -> dict[str, list]:  # noqa: ANN001
    """A node's accounting record as lists: served and failed clients, their bytes, and the examples and train
    loss each served client's reply reported (``fedsim.engine.node.reported_metrics``; absent from older nodes)."""
    out: dict[str, list] = {k: [int(v) for v in acc[k]] for k in ("partition_ids", "failed_ids", "client_bytes")}
    out["client_examples"] = [int(v) for v in acc.get("client_examples", [])]
    out["client_train_loss"] = [float(v) for v in acc.get("client_train_loss", [])]
    return out


def _round_of(msg: Message) -> int:
    """The round a message belongs to: fedsim's engine record (``ServerContext.send``), else Flower's
    ``server-round`` in its train config, else a numeric group id; 0 when none says."""
    if msg.has_content():
        engine = msg.content.config_records.get(ENGINE_KEY)
        if engine is not None and "round" in engine:
            return int(engine["round"])
        for record in msg.content.config_records.values():
            if "server-round" in record:
                return int(record["server-round"])
    group = str(msg.metadata.group_id or "")
    return int(group) if group.isdigit() else 0


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
        self._last_log_time: float | None = None  # when the previous metrics row was logged
        self._label_counts: np.ndarray | None = None  # clients x classes, for client_accuracy
        self._local_test: tuple | None = None  # (inputs, labels, owning client) of every local test split
        self._measured: dict[str, np.ndarray] = {}  # per-client accuracies for the next metrics row's clients.csv
        self._last_local: tuple[str, np.ndarray] | None = None  # (model fingerprint, its local accuracies)
        self.clock = grid.clock = SimClock.for_config(config, partitions)  # None without [system]
        self.checkpoint = RoundCheckpoint(self)  # per-round checkpoints for --resume (the runner sets the one read)

    def start_clock(self) -> SimClock:
        """The run's simulated clock; a strategy that needs one (FedBuff) gets one with the default ``[system]``
        settings (``fedsim.config.SystemConfig()``) where the scenario has no such section."""
        if self.clock is None:
            from fedsim.config import SystemConfig

            self.clock = self.grid.clock = SimClock.for_config(self.config, self.partitions, SystemConfig())
        return self.clock

    # -- data ----------------------------------------------------------------------------------------------
    def test_data(self):
        return test_split(self.config)

    def train_data(self):
        """The whole training split (for centralized references computed on the server only)."""
        return train_split(self.config)

    def streams(self) -> list:
        """Every client's stream, exactly as the clients build them (see ``ClientEnv.stream``)."""
        return scenario_streams(self.config, self.partitions)

    def client_accuracy(self, class_accuracy: Any, model: Any = None) -> dict[str, float]:
        """Per-client accuracy of the model just evaluated, as metrics for the ``log`` call it goes into (and the
        accuracy columns of that round's clients.csv rows), by ``evaluation.mode``:

        - "global" / "both": mean, worst and spread over clients of the test accuracy re-weighted to each client's
          label mix (``client_acc_mean/min/std``; `fedsim.results.client_metrics`), from ``class_accuracy``; none
          without a partition (one client);
        - "local" / "both": the same over each client's held-out local test data (``local_acc_mean/min/std``),
          measured with ``model`` (a module mapping inputs to class scores); none when ``model`` is not given.
        """
        from fedsim.results.client_metrics import accuracy_spread, client_accuracies, label_counts

        mode = self.config.evaluation.mode
        out: dict[str, float] = {}
        if mode != "local" and self.partitions and len(self.partitions) >= 2 and class_accuracy is not None:
            if self._label_counts is None:
                train = self.train_data()
                self._label_counts = label_counts(self.partitions, train.labels, train.num_classes)
            acc = client_accuracies(class_accuracy, self._label_counts)
            self._measured[LABEL_MIX_ACCURACY] = acc
            out.update(accuracy_spread(acc, "client_acc"))
        if mode != "global" and model is not None:
            acc = self.local_accuracies(model)
            self._measured[LOCAL_ACCURACY] = acc
            self._last_local = (_fingerprint(model), acc)
            out.update(accuracy_spread(acc, "local_acc"))
        return out

    def local_test_data(self):  # noqa: ANN201
        """Every client's held-out local test data (``partition.test_fraction``) as one LabeledData, and the
        client each row belongs to; None when nothing is held out."""
        from fedsim.scenario import local_test_partition

        if self._local_test is None:
            parts = local_test_partition(self.config)
            sizes = [len(p) for p in parts]
            if not sum(sizes):
                self._local_test = (None, None)
            else:
                owner = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
                self._local_test = (self.train_data().subset(np.concatenate(parts)), owner)
        data, owner = self._local_test
        return None if data is None else (data, owner)

    def local_accuracies(self, model: Any) -> np.ndarray:
        """Each client's accuracy (exact count) of ``model`` on its own held-out test data; NaN for a client that
        holds out nothing (and for all without ``partition.test_fraction``)."""
        from fedsim.results.client_metrics import local_accuracies, predict_classes

        held = self.local_test_data()
        if held is None:
            return np.full(self.num_clients, np.nan)
        data, owner = held
        pred = predict_classes(model, data.x, self.config.evaluation.batch_size, self.device)
        return local_accuracies(pred, data.labels, owner, self.num_clients)

    def _write_clients(self) -> None:
        """clients.csv: the ledger's rows (see ``fedsim.results.client_metrics.ClientLedger``)."""
        from fedsim.scenario import local_test_partition

        ledger = self.grid.ledger
        if not ledger.rows:
            return
        tests = None
        if self.config.partition.test_fraction > 0:
            tests = [len(p) for p in local_test_partition(self.config)]
        self.recorder.save_text(CLIENTS_FILE, ledger.csv(tests))

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
        now, began = time.time(), getattr(self.grid, "ready_at", None) or self.start_time  # began: the server part's start
        if self._last_log_time is None:  # set-up: Flower's nodes started and discovered (summary.json)
            self._last_log_time = began
            self.extra_summary["setup_seconds"] = round(began - self.start_time, 4)
        row["seconds"] = round(now - self._last_log_time, 4)  # this row's own time, since the previous row
        row["elapsed_seconds"] = round(now - began, 4)  # cumulative, without the set-up
        self._last_log_time = now
        if self.clock is not None:  # [system]: simulated seconds, clients the clock dropped (fedsim.engine.clock)
            row["sim_seconds"] = round(self.clock.now, 4)
            row["dropped_clients"] = self.clock.dropped
            self.clock.observe(row["accuracy"])
            self.extra_summary.update(self.clock.summary())
        self._last_step_bytes = (t.up, t.down)
        self.recorder.append_metrics(row)
        for column, values in self._measured.items():  # client_accuracy's per-client values, for this row's round
            self.grid.ledger.measured(int(step), column, values)
        self._measured = {}
        self._write_clients()
        if self.progress is not None:
            self.progress.update(row)
        return row

    def summary(self, **values: Any) -> None:
        self.extra_summary.update({k: _scalar(v) if np.isscalar(v) else v for k, v in values.items()})

    def save_model(self, obj: Any) -> None:
        """Save the final model; with ``evaluation.mode`` "local" / "both" also measure it on every client's local
        test data: ``local_accuracy`` (mean), ``worst_local_accuracy``, ``local_accuracy_std`` in the summary, and
        the last round's clients.csv rows where that round was not measured already."""
        from fedsim.results.client_metrics import accuracy_spread

        self.recorder.save_model(obj, architecture=self._architecture(obj))
        self.model_saved = True
        if self.config.evaluation.mode != "global":
            last = self._last_local  # the model the last round measured is usually the one saved: not twice
            acc = last[1] if last is not None and last[0] == _fingerprint(obj) else self.local_accuracies(obj)
            spread = accuracy_spread(acc, "local")
            if spread:
                self.summary(local_accuracy=spread["local_mean"], worst_local_accuracy=spread["local_min"],
                             local_accuracy_std=spread["local_std"])
            rounds = [r for r, _ in self.grid.ledger.rows] or [int(r["round"]) for r in self.recorder.rows]
            if rounds:
                self.grid.ledger.measured(max(rounds), LOCAL_ACCURACY, acc, only_missing=True)
        self._write_clients()

    def _architecture(self, obj: Any) -> dict:
        """What rebuilds ``obj`` (config.json's "saved_model"): the scenario's model settings, num_classes, input
        shape, and whether ``obj`` is the scenario's network itself (same class and state_dict shapes: then
        ``fedsim.results.rundir.load_model`` rebuilds it from model_state.pt alone)."""
        import torch

        m = self.config.model
        out = {"model": m.name, "width": m.width, "params": dict(m.params or {}), "num_classes": self.num_classes,
               "input_shape": [int(d) for d in self.input_shape], "scenario_model": False}
        if isinstance(obj, torch.nn.Module):
            try:
                ref = self.initial_model()
                shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
                out["scenario_model"] = type(ref) is type(obj) and shapes == {
                    k: tuple(v.shape) for k, v in obj.state_dict().items()}
            except Exception:  # noqa: BLE001  (a strategy whose network the scenario cannot build alone)
                pass
        return out

    def save_table(self, name: str, table, index: bool = True) -> None:  # noqa: ANN001
        self.recorder.save_table(name, table, index=index)

    def set_total_steps(self, total: int) -> None:
        if self.progress is not None:
            self.progress.set_total(total)


def _fingerprint(model: Any) -> str:
    """A digest of a module's class and state (parameters and buffers): equal digests, equal predictions."""
    import hashlib

    digest = hashlib.blake2b(type(model).__qualname__.encode(), digest_size=16)
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
