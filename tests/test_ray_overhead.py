"""fedsim.engine.ray_backend against the per-message and per-poll costs of Flower's Ray simulation (issue #26): its
poller of the link state (`_add_messages_to_queue`) against Flower's own, and the ClientApp pickled once
(`PickledOnce`)."""
from __future__ import annotations

import threading
import time
from queue import Empty, Queue

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedsim.engine.ray_backend import _add_messages_to_queue, _ClosableQueue, _one_scan_per_poll


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """What flwr.simulation.run_simulation sets before its grid pushes messages (restored afterwards)."""
    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class _OnePoll(threading.Event):
    """A stop event that is set by the poller's first wait: the poller runs exactly one poll."""

    def wait(self, timeout=None):  # noqa: ANN001, ANN201
        self.set()
        return True


def _federation(num_nodes: int, targets: list[int]):
    """Flower's in-memory link state with ``num_nodes`` nodes and one message pushed, through Flower's grid, to
    the node at each position of ``targets`` (a position may repeat)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = vce_api._register_nodes(num_nodes, factory)
    state = factory.state()
    run = Run.create_empty(run_id=7)  # as flwr.simulation.run_simulation._main_loop registers its run
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    nodes = list(mapping)
    msgs = [Message(RecordDict({"c": ConfigRecord({"i": i})}), nodes[t], MessageType.TRAIN)
            for i, t in enumerate(targets)]
    ids = list(grid.push_messages(msgs))
    assert all(ids) and len(state.message_ins_store) == len(targets)
    return factory, mapping, ids


def _one_poll(poller, factory, mapping) -> list[str]:  # noqa: ANN001
    queue: Queue = Queue()
    poller(factory.state(), queue, mapping, _OnePoll())
    out = []
    while not queue.empty():
        out.append(queue.get().metadata.message_id)
    return out


@pytest.mark.parametrize("targets", [[3, 0, 41, 7, 7, 19, 3, 3], [], [5], list(range(60))])
def test_one_poll_queues_what_flowers_poller_queues(targets):
    """The same messages, in the same order, marked delivered alike (each node's first one only), then the same
    for the next poll."""
    flower = _federation(60, targets)
    ours = _federation(60, targets)
    order = {mid: k for k, mid in enumerate(flower[2])}  # the same pushes give the same positions, other ids
    position = {mid: k for k, mid in enumerate(ours[2])}
    polls = []
    for _ in range(4):  # a node with several messages gets one per poll
        got_flower = [order[m] for m in _one_poll(vce_api.add_messages_to_queue, flower[0], flower[1])]
        got_ours = [position[m] for m in _one_poll(_add_messages_to_queue, ours[0], ours[1])]
        assert got_ours == got_flower
        pending = lambda f, ids: sorted(ids.index(m) for m, msg in f[0].state().message_ins_store.items()  # noqa: E731
                                        if msg.metadata.delivered_at == "")
        assert pending(ours, ours[2]) == pending(flower, flower[2])
        polls.append(len(got_ours))
    assert polls[0] == len(set(targets)) and sum(polls) == len(targets)  # node 3's third message in the 3rd poll


def test_the_poller_is_flowers_again_after_the_run():
    original = vce_api.add_messages_to_queue
    with _one_scan_per_poll():
        assert vce_api.add_messages_to_queue is not original
        assert vce_api.add_messages_to_queue.func is _add_messages_to_queue
    assert vce_api.add_messages_to_queue is original


def test_a_closed_queue_wakes_a_waiting_get_and_keeps_its_items():
    queue = _ClosableQueue()
    woke = []

    def wait() -> None:
        try:
            queue.get(timeout=60)
        except Empty:
            woke.append(time.monotonic())

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.05)  # let it wait (a get that starts after the close raises at once, too)
    queue.close()
    waiter.join(timeout=20)
    assert not waiter.is_alive() and len(woke) == 1  # woken by the close, not by its 60 s timeout
    queue.put("late")
    assert queue.get(timeout=60) == "late"  # what is there is still handed out
    with pytest.raises(Empty):
        queue.get(timeout=60)  # closed and empty: at once
    open_queue = _ClosableQueue()
    with pytest.raises(Empty):
        open_queue.get(timeout=0.01)  # an open queue still times out as a Queue does
    with pytest.raises(ValueError, match="non-negative"):
        open_queue.get(timeout=-1)  # and refuses a negative timeout as a Queue does
    open_queue.put(1)
    assert open_queue.get(block=False) == 1


class _IdleBackend:
    """A Flower simulation backend with two workers and no message to process."""

    num_workers = 2

    def build(self, app_fn) -> None:  # noqa: ANN001
        pass

    def terminate(self) -> None:
        pass


def test_flowers_threads_leave_as_soon_as_the_run_stops(monkeypatch):
    """Flower's run_api (two workers, the poller, the reply injector, all waiting on empty queues) returns once
    the stop is set, without waiting for the threads' get timeouts (here stretched to 60 s: without the close the
    threads would sit there a minute), and closes only queues of a stopped run."""
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics

    factory, mapping, _ = _federation(2, [])
    created: list[_ClosableQueue] = []

    class _LongWaits(_ClosableQueue):
        def __init__(self) -> None:
            super().__init__()
            created.append(self)

        def get(self, block: bool = True, timeout: float | None = None):  # noqa: ANN201
            return super().get(block, None if timeout is None else 60.0)

    f_stop = threading.Event()
    with _one_scan_per_poll():
        monkeypatch.setattr(vce_api, "Queue", _LongWaits)
        runner = threading.Thread(target=vce_api.run_api, args=(None, _IdleBackend, mapping, factory, {}, f_stop,
                                                                VceMetrics()), daemon=True)
        runner.start()
        time.sleep(0.3)  # the threads are waiting on their queues
        assert runner.is_alive() and len(created) == 2 and not any(q.closed for q in created)
        f_stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
    assert all(q.closed for q in created)
    assert vce_api.Queue is Queue and vce_api.put_message_into_state.__module__ == vce_api.__name__


def test_another_link_state_gets_flowers_poller():
    calls = []
    _add_messages_to_queue(object(), Queue(), {}, _OnePoll(), flower_poller=lambda *a: calls.append(a))
    assert len(calls) == 1
    with pytest.raises(TypeError, match="not Flower's in-memory link state"):
        _add_messages_to_queue(object(), Queue(), {}, _OnePoll())


class _CountsPickles:
    """A stand-in ClientApp that counts how often it is pickled and answers its call's arguments."""

    pickled = 0

    def __call__(self, message, context):  # noqa: ANN001, ANN204
        return ("answered", message, context)

    def __reduce__(self):  # noqa: ANN204
        type(self).pickled += 1
        return _CountsPickles, ()


def test_the_client_app_is_pickled_once_and_unpickled_once_per_process(monkeypatch):
    """Flower's Ray backend pickles the app with every message: PickledOnce pickles it the first time only, and
    unpickling in a process where the token was seen gives that process's app back."""
    from ray import cloudpickle

    from fedsim.engine import ray_backend

    monkeypatch.setattr(ray_backend, "_UNPICKLED", {})
    _CountsPickles.pickled = 0
    shipped = ray_backend.PickledOnce(_CountsPickles())
    load = lambda: shipped  # noqa: E731  (Flower's app_fn: a closure over the app, pickled per message)
    blobs = [cloudpickle.dumps(load) for _ in range(5)]
    assert _CountsPickles.pickled == 1
    apps = [cloudpickle.loads(b)() for b in blobs]
    assert all(a is apps[0] for a in apps) and apps[0] is not shipped and apps[0].token == shipped.token
    assert apps[0](message="m", context="c") == ("answered", "m", "c")
    assert isinstance(apps[0].app, _CountsPickles)  # unpickled at the first call, kept for the later ones
    other = cloudpickle.loads(cloudpickle.dumps(ray_backend.PickledOnce(_CountsPickles())))
    assert other is not apps[0] and len(ray_backend._UNPICKLED) == 2  # another run's app: its own token


class _Big(_CountsPickles):
    """A stand-in app whose pickle is large (as fedsim's, with every client's partition indices inside)."""

    def __init__(self) -> None:
        self.payload = bytes(200_000)

    def __reduce__(self):  # noqa: ANN204
        type(self).pickled += 1
        return _Big._rebuilt, (self.payload,)

    @staticmethod
    def _rebuilt(payload):  # noqa: ANN001, ANN205
        app = _Big.__new__(_Big)
        app.payload = payload
        return app


def test_with_ray_up_the_app_travels_as_one_object_store_reference(monkeypatch):
    """Where Ray is up, the app's bytes go into the object store once and each message carries only the
    reference: the per-message pickle is small, the store holds one object, and an actor fetches it once."""
    from ray import cloudpickle

    from fedsim.engine import ray_backend

    store: dict[int, bytes] = {}
    fetched: list[int] = []

    def put(blob):  # noqa: ANN001, ANN202
        store[len(store)] = blob
        return len(store) - 1

    def get(ref):  # noqa: ANN001, ANN202
        fetched.append(ref)
        return store[ref]

    monkeypatch.setattr(ray_backend, "_UNPICKLED", {})
    monkeypatch.setattr(ray_backend, "_put", put)
    monkeypatch.setattr(ray_backend, "_get", get)
    _Big.pickled = 0
    shipped = ray_backend.PickledOnce(_Big())
    load = lambda: shipped  # noqa: E731
    blobs = [cloudpickle.dumps(load) for _ in range(5)]
    assert _Big.pickled == 1 and len(store) == 1 and len(store[0]) > 200_000
    assert max(len(b) for b in blobs) < 5_000  # the reference, not the 200 KB
    apps = [cloudpickle.loads(b)() for b in blobs]
    assert all(a is apps[0] for a in apps) and fetched == []
    assert apps[0](message="m", context="c") == ("answered", "m", "c")
    assert apps[1](message="n", context="d") == ("answered", "n", "d")
    assert fetched == [0] and apps[0].app.payload == bytes(200_000)


class _Nodes:
    """A stand-in for Flower's grid: its nodes, and the query messages it was asked to send (each node answers the
    clients it serves, as fedsim's node handler does)."""

    def __init__(self, groups: dict[int, list[int]]) -> None:
        self.groups = groups
        self.sent: list = []

    def get_node_ids(self):  # noqa: ANN201
        return list(self.groups)

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201
        from flwr.app import Message, MetricRecord, RecordDict

        from fedsim.engine.accounting import ACCOUNTING_KEY

        out = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            reply = Message(RecordDict({ACCOUNTING_KEY: MetricRecord({"partition_ids": self.groups[node]})}),
                            reply_to=msg)
            out.append(reply)
        return out


def test_discovery_takes_the_nodes_clients_from_the_engine_without_a_message():
    """Where the simulation engine says which partition each node has (Flower's nodes_mapping), discovery sends
    no query message and finds the same clients per node as the queries do; a node serving no client is left out;
    where the engine's nodes are not the grid's, the nodes are asked."""
    from fedsim.engine.server import AccountingGrid

    groups = {17: [0, 1], 5: [2, 3], 99: [4], 42: []}
    asked = AccountingGrid(_Nodes(groups), num_nodes=4)
    asked.discover()
    assert len(asked.inner.sent) == 4
    told = AccountingGrid(_Nodes(groups), num_nodes=4)
    calls = iter([None, None, groups])  # the engine registers its nodes a little later
    told.discover(known=lambda: next(calls))
    assert told.inner.sent == [] and told.node_clients == asked.node_clients == {17: [0, 1], 5: [2, 3], 99: [4]}
    other = AccountingGrid(_Nodes(groups), num_nodes=4)
    other.discover(known=lambda: {1: [0], 2: [1]})
    assert len(other.inner.sent) == 4 and other.node_clients == asked.node_clients
    silent = AccountingGrid(_Nodes(groups), num_nodes=4)  # an engine that never says: the nodes are asked
    started = time.monotonic()
    silent.discover(known=lambda: None, grace=0.2, timeout=600)
    assert time.monotonic() - started < 5
    assert len(silent.inner.sent) == 4 and silent.node_clients == asked.node_clients


def test_the_runner_derives_each_nodes_clients_as_the_node_does():
    from fedsim.config import config_from_dict
    from fedsim.engine.accounting import node_group
    from fedsim.engine.runner import _node_groups

    config = config_from_dict({"data": {"name": "digits"}, "partition": {"kind": "iid", "num_clients": 7},
                               "simulation": {"clients_per_node": 3}, "strategy": {"name": "fedavg"}})
    assert _node_groups(lambda: None, config) is None
    groups = _node_groups(lambda: {11: 0, 12: 1, 13: 2}, config)
    assert groups == {11: [0, 1, 2], 12: [3, 4, 5], 13: [6]}
    assert groups[12] == node_group(1, config.simulation.clients_per_node, config.num_clients)
