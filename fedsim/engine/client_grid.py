"""Flower's strategies address clients, one message per node: a client-addressed view of the accounting grid.

Flower's strategies sample node ids and send one message to each. Where a Flower node serves a group of clients
(``simulation.clients_per_node > 1``) they would sample groups, not clients as FedAvg's protocol does, and with one
node per client every per-message cost of Flower's Ray backend is paid once per client (issue #26,
docs/performance.md). This view lists one virtual node id per client, in partition order (Flower's
``random.sample`` then draws the same clients as with one node per client), sends one message per real node
carrying the selected clients (the engine record's ``partitions`` and ``PER_CLIENT``), and splits each node's
reply, the clients' own replies side by side (``fedsim.engine.node.side_by_side``), back into one reply per
client, sorted by partition id: Flower's aggregation sums the same arrays in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.error import Error

from fedsim.engine.accounting import CLIENT_FAILED, CLIENT_SEPARATOR, ENGINE_KEY, PER_CLIENT
from fedsim.engine.grid import WrappedGrid

__all__ = ["ClientAddressedGrid", "VIRTUAL_BASE"]

VIRTUAL_BASE = 1 << 40  # virtual node id = VIRTUAL_BASE + partition id


class ClientAddressedGrid(WrappedGrid):
    """``inner``: the run's ``fedsim.engine.server.AccountingGrid`` after discovery (its ``node_clients``)."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        super().__init__(inner)
        self.node_of = {int(pid): node for node, pids in inner.node_clients.items() for pid in pids}

    def get_node_ids(self) -> list[int]:
        return [VIRTUAL_BASE + pid for pid in sorted(self.node_of)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("ClientAddressedGrid: use send_and_receive (Flower's strategies do)")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("ClientAddressedGrid: use send_and_receive (Flower's strategies do)")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """One message per real node and wave (a node never has two in flight: its context is one); the replies
        split per client and sorted by partition id; a client that failed gets an error reply, a silent one
        none (as Flower's grid gives none after the timeout)."""
        waves: list[dict[int, tuple[Message, list[tuple[int, Message]]]]] = []
        for msg in messages:
            pid = int(msg.metadata.dst_node_id) - VIRTUAL_BASE
            if pid not in self.node_of:
                raise ValueError(f"node id {msg.metadata.dst_node_id} is not one of this grid's clients")
            node = self.node_of[pid]
            for wave in waves:  # the first wave where this node is free, or already gets this same content
                held = wave.get(node)
                if held is None:
                    wave[node] = (msg, [(pid, msg)])
                    break
                if _same_request(held[0], msg):
                    held[1].append((pid, msg))
                    break
            else:
                waves.append({node: (msg, [(pid, msg)])})
        replies: list[tuple[int, Message]] = []
        for wave in waves:
            real = [_node_message(node, first, [pid for pid, _ in items]) for node, (first, items) in wave.items()]
            for reply in self.inner.send_and_receive(real, timeout=timeout):
                replies.extend(_split(reply, wave[reply.metadata.src_node_id][1]))
        return [msg for _, msg in sorted(replies, key=lambda kv: kv[0])]


def _same_request(a: Message, b: Message) -> bool:
    """Flower's strategies build one RecordDict for all of a round's messages: the same object, type and group."""
    return (a.content is b.content and a.metadata.message_type == b.metadata.message_type
            and a.metadata.group_id == b.metadata.group_id)


def _node_message(node: int, first: Message, partitions: list[int]) -> Message:
    body = RecordDict(dict(first.content.items()))
    engine = ConfigRecord(dict(first.content.config_records.get(ENGINE_KEY, ConfigRecord()).items()))
    engine["partitions"] = sorted(partitions)
    engine[PER_CLIENT] = 1
    body[ENGINE_KEY] = engine
    return Message(body, node, first.metadata.message_type, ttl=first.metadata.ttl, group_id=first.metadata.group_id)


def _split(reply: Message, items: list[tuple[int, Message]]) -> list[tuple[int, Message]]:
    """One reply per client of ``items`` ((partition id, the strategy's message)) from a node's reply."""
    if reply.has_error():
        return [(pid, Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=msg))
                for pid, msg in items]
    own: dict[int, RecordDict] = {}
    for key, value in reply.content.items():
        pid, sep, rest = key.partition(CLIENT_SEPARATOR)
        if not sep or not pid.isdigit():
            raise ValueError(f"a per-client node reply holds a record {key!r} without a '<partition id>/' prefix")
        own.setdefault(int(pid), RecordDict())[rest] = value
    out = []
    for pid, msg in items:
        if pid in own:
            answer = Message(own[pid], reply_to=msg)
            answer.__dict__["_fedsim"] = reply.__dict__.get("_fedsim", {})
            out.append((pid, answer))
        else:  # an injected failure or a crash of this client: Flower's strategies count an error reply as failed
            out.append((pid, Message(Error(code=CLIENT_FAILED, reason=f"client {pid} failed"), reply_to=msg)))
    return out
