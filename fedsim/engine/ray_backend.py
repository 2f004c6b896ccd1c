"""A run on Flower's simulation engine with the Ray backend: the resources each client gets, and the driver's Ray.

Starting, joining and stopping Ray itself is ``fedsim.engine.ray_session``'s (one Ray for a whole ``fedsim run``);
this module asks it for a Ray, takes SIGINT/SIGTERM back from ``ray.init`` and hands the apps to
``flwr.simulation.run_simulation``, with two costs of Flower's Ray simulation that grow with the number of
clients taken out (issue #26, docs/performance.md): the ClientApp is pickled once per run, not once per message
(``PickledOnce``), and Flower's poller scans its link state once per poll, not once per node
(``_one_scan_per_poll``, whose queues also wake Flower's threads as soon as the run stops, instead of up to 1 s
later); and the actors are ``fedsim.engine.ray_actor.NodeActor``, Flower's actor without the
import of ``flwr.simulation`` in each worker (``_light_actors``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from queue import Empty, Queue
from typing import Any

from fedsim.config import ScenarioConfig
from fedsim.engine.ray_session import ensure_ray, ray_address, ray_session
from fedsim.engine.signals import install_signal_handlers
from fedsim.engine.telemetry import silence_flower_telemetry
from fedsim.errors import ConfigError
from fedsim.preflight import gpu_count

__all__ = ["client_resources", "run_on_ray"]


def client_resources(config: ScenarioConfig) -> dict[str, float]:
    """CPUs and GPU fraction per simulated client; GPUs are used automatically when visible."""
    sim = config.simulation
    gpus = gpu_count()
    num_gpus = sim.num_gpus
    if num_gpus is None:  # share the visible GPUs among the clients that can run at once on the CPUs
        concurrent = max(1, min(config.num_nodes, int((os.cpu_count() or 1) // sim.num_cpus)))
        num_gpus = 0.0 if gpus == 0 or sim.device == "cpu" else max(0.1, min(1.0, gpus / concurrent))
    if num_gpus > 0 and gpus == 0 and ray_address(config) is None:  # a cluster has GPUs of its own
        raise ConfigError(
            f"simulation.num_gpus: {num_gpus} GPUs per client requested but no GPU is visible on this machine "
            "(Flower's Ray backend would fail with 'ActorPool is empty'); set it to 0 or leave it unset"
        )
    return {"num_cpus": float(sim.num_cpus), "num_gpus": float(num_gpus)}


def run_on_ray(config: ScenarioConfig, client_app: Any, server_main: Callable[[Any], None]) -> None:
    """Flower's simulation engine with the Ray backend; configuration travels inside the apps. Ray comes from the
    command's ``ray_session`` (one Ray for all variants) or, called alone, from a session of this run's own.
    ``server_main(grid, node_partitions)`` is the server part's loop (``node_partitions``: see there)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    silence_flower_telemetry()
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(grid, node_partitions)

    _NODE_PARTITIONS.clear()
    with ray_session(), _one_scan_per_poll():
        init_args = _init_ray(config) or {}
        backend_config = {"client_resources": client_resources(config), "init_args": init_args}
        with warnings.catch_warnings(), _light_actors():  # after Ray's start: importing Ray reads its auth mode
            warnings.simplefilter("ignore")
            run_simulation(server_app=server_app, client_app=PickledOnce(client_app),
                           num_supernodes=config.num_nodes, backend_name="ray", backend_config=backend_config,
                           verbose_logging=bool(config.simulation.verbose))


_NODE_PARTITIONS: dict[int, int] = {}  # the running simulation's node id -> partition id (Flower's nodes_mapping)


def node_partitions() -> dict[int, int] | None:
    """Each node's ``partition-id`` in the simulation running now, as Flower's engine assigned it (its
    ``nodes_mapping``, which becomes each node's ``node_config``): the server then knows which clients each node
    serves without asking every node (``AccountingGrid.discover``). None until the engine has registered them."""
    return dict(_NODE_PARTITIONS) or None


def _init_ray(config: ScenarioConfig) -> dict[str, Any]:
    """Start (or join) Ray once per session (``fedsim.engine.ray_session.ensure_ray``), then (re)install fedsim's
    SIGINT/SIGTERM handlers: for the private Ray ``ensure_ray`` keeps Ray from replacing them (``sys.exit``, a C++
    failure handler that aborts with 134), a joined cluster's ``ray.init`` may still do it. fedsim starts Ray itself
    (Flower's backend then finds it running)."""
    init_args = ensure_ray(config)
    install_signal_handlers()
    return init_args


@contextlib.contextmanager
def _light_actors() -> Iterator[None]:
    """Flower's Ray backend with ``fedsim.engine.ray_actor.NodeActor`` as its actor class (Flower's restored
    afterwards): the same calls, but a worker imports the actor's module without ``flwr/simulation/__init__.py``
    (SQLAlchemy, FastAPI, ``flwr.cli``: 1.2-1.6 CPU-s per actor that none of its calls needs). Entered only
    once fedsim's Ray is up: this imports Ray, and Ray reads ``RAY_AUTH_MODE`` when first imported
    (``fedsim.engine.ray_session._import_ray_with_token_auth``)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedsim.engine.ray_actor import NodeActor

    original = raybackend.ClientAppActor
    raybackend.ClientAppActor = NodeActor
    try:
        yield
    finally:
        raybackend.ClientAppActor = original


@contextlib.contextmanager
def _one_scan_per_poll() -> Iterator[None]:
    """Flower's simulation engine with ``_add_messages_to_queue`` as its poller and queues that wake on stop
    (Flower's restored afterwards).

    Flower's own poller (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) asks the link state,
    every 0.1 s, for each of the N nodes in turn, ``get_message_ins(node_id, limit=1)``; each call walks the stored
    messages and checks each (expiry, federation): N x (messages in flight) checks per poll, for the whole run, in
    the driver, competing with the server part for the GIL. At 1,000 nodes and 100 messages in flight that is
    100,000 checks every 0.1 s. The replacement does what those N calls do in one walk of the store per poll.

    When the server part ends, Flower's worker threads and its reply injector sit in ``queue.get(timeout=1.0)`` on
    empty queues and notice the stop only when that times out: up to 1 s (0.45-0.75 s measured at 10 clients)
    added to every run. Its two queues are ``_ClosableQueue`` here, closed by the poller once the stop is set
    (``_close_queues_of``), so those threads leave at once.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue, vce_api.put_message_into_state, vce_api.Queue
    vce_api.add_messages_to_queue = functools.partial(_add_messages_to_queue, flower_poller=original[0])
    vce_api.put_message_into_state = functools.partial(_closed_on_stop, original[1])
    vce_api.Queue = _ClosableQueue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, vce_api.put_message_into_state, vce_api.Queue = original


class _ClosableQueue(Queue):
    """A ``Queue`` whose ``get`` on an empty queue raises ``Empty`` at once, also in a thread already waiting, after
    ``close()``: what its timeout would do, without waiting for it. Items put before or after stay gettable."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.closed = False

    def close(self) -> None:
        with self.not_empty:
            self.closed = True
            self.not_empty.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block and timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")  # as Queue.get
        with self.not_empty:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._qsize():
                remaining = None if deadline is None else deadline - time.monotonic()
                if self.closed or not block or (remaining is not None and remaining <= 0):
                    raise Empty
                self.not_empty.wait(remaining)
            item = self._get()
            self.not_full.notify()
            return item


_QUEUES_OF_STOP: "weakref.WeakKeyDictionary[threading.Event, list[Queue]]" = weakref.WeakKeyDictionary()


def _closed_on_stop(thread_fn: Callable, state: Any, queue: Queue, f_stop: threading.Event) -> None:
    """Flower's reply injector (``put_message_into_state``), its queue closed by the poller at the stop."""
    _QUEUES_OF_STOP.setdefault(f_stop, []).append(queue)
    thread_fn(state, queue, f_stop)


def _close_queues_of(f_stop: threading.Event, *queues: Queue) -> None:
    """The simulation has stopped: wake every thread waiting on its queues (only then: a closed queue never blocks,
    so a thread still looping on it before the stop would spin)."""
    if not f_stop.is_set():
        return
    for queue in (*queues, *_QUEUES_OF_STOP.pop(f_stop, [])):
        if isinstance(queue, _ClosableQueue):
            queue.close()


def _add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event,
                           flower_poller: Callable | None = None) -> None:
    """Flower's poller with the same outcome: every 0.1 s, each node's first undelivered message (in the store's
    order, as ``get_message_ins(node_id, limit=1)`` finds it) is marked delivered and queued, node by node in the
    order of ``nodes_mapping``; every stored message is checked once per poll (expired ones dropped, as
    ``get_message_ins`` does). A link state other than Flower's in-memory one (without the attributes read
    here) gets ``flower_poller``, Flower's own. Once the run has stopped, the run's queues are closed
    (``_close_queues_of``), so the threads waiting on them leave at once."""
    try:
        return _poll(state, queue, nodes_mapping, f_stop, flower_poller)
    finally:
        _close_queues_of(f_stop, queue)


def _poll(state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event,
          flower_poller: Callable | None) -> None:
    _NODE_PARTITIONS.clear()
    _NODE_PARTITIONS.update({int(node): int(pid) for node, pid in nodes_mapping.items()})
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    check = getattr(state, "_check_stored_messages", None)
    if not isinstance(store, dict) or lock is None or check is None:
        if flower_poller is None:
            raise TypeError(f"{type(state).__name__} is not Flower's in-memory link state")
        return flower_poller(state, queue, nodes_mapping, f_stop)
    from flwr.supercore.date import now

    while not f_stop.is_set():
        first: dict[int, Any] = {}
        if store:
            with lock:
                check(set(store))
                for msg in list(store.values()):
                    meta = msg.metadata
                    if meta.delivered_at == "" and meta.dst_node_id in nodes_mapping and meta.dst_node_id not in first:
                        first[meta.dst_node_id] = msg
                delivered_at = now().isoformat()
                for msg in first.values():
                    msg.metadata.delivered_at = delivered_at
        if first:
            for node_id in nodes_mapping:
                if node_id in first:
                    queue.put(first[node_id])
        f_stop.wait(0.1)
    return None


_UNPICKLED: dict[str, "PickledOnce"] = {}  # token -> the ClientApp, unpickled once per process (a Ray actor)


def _put(blob: bytes) -> Any:
    """The app's bytes into Ray's object store, once per run: a reference (a few dozen bytes) then travels with
    each message instead of the bytes. None where no Ray is up here (the bytes travel then)."""
    import ray

    return ray.put(blob) if ray.is_initialized() else None


def _get(ref: Any) -> bytes:
    import ray

    return ray.get(ref)


class PickledOnce:
    """A ClientApp that is pickled once, not once per message, and unpickled once per Ray actor.

    Flower's Ray backend sends the ClientApp with every message (``ClientAppActor.run.remote(app_fn, message,
    ...)``: ``app_fn`` is a closure over the ClientApp), so Ray cloudpickles it, with fedsim's node handler and
    every client's partition indices inside, in the driver for each message, and each actor unpickles it again:
    at 1,000 clients 509 KB of 1,000 small arrays, 21-25 ms to pickle and 10-12 ms to unpickle per message on a
    busy 2-core machine, against tens of ms for a client's local training. This wrapper pickles the app once, puts
    the bytes into Ray's object store once (``_put``) and pickles to a token and that reference: each message then
    carries a few dozen bytes, not 509 KB through the store (or the bytes, copied, where no Ray is up). An actor
    fetches and unpickles the app at the token's first call and keeps it (its node handler then serves every later
    message of the run in that actor). Calls go to the app unchanged.
    """

    def __init__(self, app: Any = None, token: str | None = None, blob: bytes | None = None,
                 ref: Any = None) -> None:
        self.app = app
        self.token = token or uuid.uuid4().hex
        self._blob = blob
        self._ref = ref
        self._lock = threading.Lock()

    def __call__(self, message: Any, context: Any) -> Any:
        if self.app is None:  # an actor's first message of this run: fetch the app's bytes once
            with self._lock:
                if self.app is None:
                    from ray import cloudpickle

                    self.app = cloudpickle.loads(self._blob if self._blob is not None else _get(self._ref))
        return self.app(message=message, context=context)

    def __reduce__(self) -> tuple:
        with self._lock:  # Flower's worker threads pickle messages concurrently
            if self._blob is None and self._ref is None:
                from ray import cloudpickle

                self._blob = cloudpickle.dumps(self.app)
                self._ref = _put(self._blob)
        if self._ref is not None:
            return _unpickle_app, (self.token, None, self._ref)
        return _unpickle_app, (self.token, self._blob, None)


def _unpickle_app(token: str, blob: bytes | None, ref: Any = None) -> PickledOnce:
    app = _UNPICKLED.get(token)
    if app is None:
        if len(_UNPICKLED) >= 8:  # an actor kept between runs of a session serves one run's app at a time
            _UNPICKLED.clear()
        app = _UNPICKLED[token] = PickledOnce(None, token, blob, ref)
    return app
