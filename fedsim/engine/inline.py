"""``simulation.backend = "inline"``: the same ServerApp logic and ClientApp, in one process, without Ray.

Messages still go through Flower's protobuf serialization both ways, so payloads that would not survive the
real transport fail here too, and byte counts are the same. Useful for debugging (breakpoints in client code) and
for fast tests; the Ray backend is the default and the one to measure.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = SUPERLINK_NODE_ID
NODE_ID_OFFSET = 1000


class InlineGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (node id 1000 + partition id)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self.run_id = run_id
        # Flower stamps new messages with the identity of the running task; in-process we are the server.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        self.contexts = {
            NODE_ID_OFFSET + p: Context(run_id=run_id, node_id=NODE_ID_OFFSET + p,
                                        node_config={"partition-id": p, "num-partitions": num_nodes},
                                        state=RecordDict(), run_config={})
            for p in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001
        pass

    @property
    def run(self):  # noqa: ANN201
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            msg.metadata.__dict__["_run_id"] = self.run_id
            msg.metadata.__dict__["_created_at"] = time.time()
            delivered = message_from_proto(message_to_proto(msg))  # what the node would receive
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(delivered, context)
            except Exception as exc:  # the real runtime turns ClientApp exceptions into error replies
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[msg_id] = message_from_proto(message_to_proto(reply))
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
