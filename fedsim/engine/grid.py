"""The grid the server part talks to, with a stop switch and a note of how the latest replies went.

Flower's grid waits up to ``simulation.timeout`` for replies; after an interrupt none will come, so the wrapper
raises ``Interrupted`` at the server part's next call instead. The reply counts let the runner explain a run in
which every client failed (Flower's strategies report that as a confusing aggregation error).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedsim.engine.signals import Interrupted

__all__ = ["WrappedGrid", "StoppableGrid"]


class WrappedGrid(Grid):
    """A Flower ``Grid`` around another (``inner``): the run plumbing Flower requires, passed through. fedsim's
    grids (``StoppableGrid``, ``fedsim.engine.server.AccountingGrid``) add their behaviour on top."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run) -> None:  # noqa: ANN001
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        """A plain Flower message; the run id and the source node are set by the grid that sends it."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)


class StoppableGrid(WrappedGrid):
    """Flower's grid as the server part sees it, with a stop switch: once ``stop`` is set (an interrupt), the
    next call raises ``Interrupted`` in the server thread, so the server part ends within one poll instead of
    waiting ``simulation.timeout`` for replies that will never come. Also notes how the latest batch of messages
    went, to explain a failure of every client."""

    POLL = 0.05

    def __init__(self, inner: Grid, stop: threading.Event, signum: list[int]) -> None:
        super().__init__(inner)
        self.stop = stop
        self._signum = signum
        # the latest batch of messages pushed, and how their replies went (to explain "every client failed")
        self.batch: set[str] = set()
        self.batch_group = ""
        self.batch_ok = 0
        self.batch_errors: list[str] = []
        self.replies_ok = 0  # over the whole run, discovery aside
        self.replies_failed = 0
        self.first_error = ""

    def _check(self) -> None:
        if self.stop.is_set():
            raise Interrupted(self._signum[0] if self._signum else signal.SIGINT)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        # (Flower's strategies push empty batches too, e.g. with fraction_evaluate = 0; discovery is no round)
        if ids and messages[0].metadata.message_type != MessageType.QUERY:
            self.batch, self.batch_ok, self.batch_errors = set(ids), 0, []
            self.batch_group = _round_of(messages[0])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        replies = list(self.inner.pull_messages(message_ids))
        for msg in replies:
            if msg.metadata.reply_to_message_id in self.batch:
                if msg.has_error():
                    self.batch_errors.append(msg.error.reason)
                    self.replies_failed += 1
                    self.first_error = self.first_error or msg.error.reason
                else:
                    self.batch_ok += 1
                    self.replies_ok += 1
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        out: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            out += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.time() > deadline):
                break
            if not got:
                self.stop.wait(self.POLL)
        return out


def _round_of(msg: Message) -> str:
    """The round a server message belongs to: fedsim's engine record, Flower's ``server-round``, or the group."""
    with contextlib.suppress(Exception):
        for record in msg.content.config_records.values():
            for key in ("round", "server-round"):
                if key in record:
                    return str(int(record[key]))
    return str(msg.metadata.group_id or "")
