"""The one module that starts, joins and stops Ray (a Ray or Flower upgrade changes this file, not the runner).

``ray_session()`` spans a whole ``fedsim run``: the first Ray-backed variant starts Ray (``ensure_ray``), every later
variant and seed reuses it, and Ray is shut down when the block ends (also on error and Ctrl-C), so no Ray process
outlives the command and Ray's start-up (12-20 s) is paid once. ``run_scenario`` called alone opens its own session.

By default Ray is a private instance of this process: ``address="local"`` (never a cluster someone started with
``ray start`` on the machine, nor a stale cluster file), node IP 127.0.0.1 (the GCS and raylet then listen on
loopback, not on every interface), no dashboard, and Ray's token authentication (``RAY_AUTH_MODE=token`` with a
random token per process), since anyone who reaches Ray's ports can run code on the machine. ``simulation.ray_address`` (or ``RAY_ADDRESS`` set by the
user) joins an existing cluster instead, without CPU/GPU counts (the cluster has its own) and with the user's own
authentication settings.

``teardown_local_ray`` is the fast way out after a signal: it kills the private node's processes directly instead
of waiting on Ray's own shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from fedsim.engine.processes import alive, descendants
from fedsim.errors import ConfigError

STATS = {"starts": 0}  # how many times this process started or joined Ray (tests assert one per session)
_SESSIONS: list[dict[str, Any]] = []  # the open session (at most one; nested blocks reuse it)
_TOKEN = secrets.token_hex(32)  # one per process: Ray caches the token it read first


def ray_address(config: Any) -> str | None:
    """The cluster to join: ``simulation.ray_address``, else ``RAY_ADDRESS`` from the user's environment."""
    return config.simulation.ray_address or os.environ.get("RAY_ADDRESS") or None


def _import_ray_with_token_auth() -> Any:
    """Import Ray with token authentication on, unless the user chose a mode. Ray reads ``RAY_AUTH_MODE`` once, at
    import: when something imported Ray before (without it), this session runs without authentication."""
    if "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        try:
            import ray
        finally:
            del os.environ["RAY_AUTH_MODE"]
        return ray
    import ray

    return ray


def auth_mode() -> str:
    """"token" or "disabled": what the Ray of this process uses."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"
    except Exception:  # noqa: BLE001 - Ray < 2.52
        return "disabled"


def _keep_ray_between_runs() -> Any:
    """Flower's Ray backend shuts Ray down when a simulation ends (``RayBackend.terminate``); within a session it
    only stops its actors, and the session shuts Ray down. Returns the undo."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend.terminate

    def terminate(self: Any) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    raybackend.RayBackend.terminate = terminate

    def undo() -> None:
        raybackend.RayBackend.terminate = original

    return undo


@contextlib.contextmanager
def _loopback_stays_loopback(active: bool) -> Iterator[None]:
    """``ray.init`` replaces a node IP of 127.0.0.1 by the machine's address (``resolve_ip_for_localhost``: it
    assumes a cluster), so the GCS and raylets would listen on every interface; a private Ray keeps loopback."""
    services = None
    if active:
        with contextlib.suppress(Exception):
            import ray._private.services as services
    original = getattr(services, "resolve_ip_for_localhost", None)
    if original is None:
        yield
        return
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


@contextlib.contextmanager
def ray_session() -> Iterator[dict[str, Any]]:
    """Within: Ray is started at most once (by ``ensure_ray``) and stays up; at the end it is shut down if the
    session started or joined it. Nested sessions are the outer one."""
    if _SESSIONS:
        yield _SESSIONS[0]
        return
    session: dict[str, Any] = {"started": False, "address": None, "undo": None}
    _SESSIONS.append(session)
    try:
        yield session
    finally:
        _SESSIONS.clear()
        if session["undo"] is not None:
            session["undo"]()
        if session["started"]:
            shutdown_ray()


def ensure_ray(config: Any) -> dict[str, Any]:
    """Start (or join) Ray for ``config`` unless this session already did; the ``init_args`` Flower's backend gets
    (it finds Ray initialized and uses it as it is). Outside a session, the caller must ``shutdown_ray``."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                 "log_to_driver": bool(config.simulation.verbose)}
    address = ray_address(config)
    session = _SESSIONS[0] if _SESSIONS else None
    if session is not None and session["started"]:
        if address != session["address"]:
            raise ConfigError(f"simulation.ray_address: {address or 'local'!r} differs from the Ray this command "
                              f"already uses ({session['address'] or 'local'!r}); one Ray per fedsim run")
        return init_args
    ray = _import_ray_with_token_auth()
    if ray.is_initialized():
        return init_args
    # the workers' PYTHONPATH: the driver's sys.path (as Flower's RayBackend.init_ray), in runtime_env only
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    args = dict(init_args, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    added: dict[str, str] = {}
    if address:
        args["address"] = address
    else:
        args.update(address="local", _node_ip_address="127.0.0.1")
        if auth_mode() == "token":  # this session's secret; Ray's processes inherit it while they start
            for key, value in (("RAY_AUTH_MODE", "token"), ("RAY_AUTH_TOKEN", _TOKEN)):
                if key not in os.environ:
                    os.environ[key] = added[key] = value
    if not address:  # what runs below this process before the private Ray starts (not Ray's: left alone at the end)
        _BEFORE_RAY[:] = [set(descendants(os.getpid()))]
    try:
        with _loopback_stays_loopback(not address):
            ray.init(**args)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        if not address:
            raise
        text = str(exc).strip()
        raise ConfigError(f"simulation.ray_address: cannot connect to Ray at {address!r}: "
                          f"{text.splitlines()[0] if text else type(exc).__name__}") from None
    finally:
        for key in added:
            os.environ.pop(key, None)
    STATS["starts"] += 1
    if session is not None:
        session.update(started=True, address=address, undo=_keep_ray_between_runs())
    return init_args


_BEFORE_RAY: list[set[int]] = []  # processes below this one before it started its private Ray


def shutdown_ray(timeout: float = 5.0) -> None:
    """Ray down, if it is up in this process (a joined cluster keeps running; this process only disconnects).

    ``ray.shutdown`` can return while processes of the private node (agents, log monitor) are still exiting; they
    get ``timeout`` seconds, then SIGKILL, so none outlives the command.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    private = bool(_BEFORE_RAY)
    started = set(descendants(os.getpid())) - (_BEFORE_RAY[0] if private else set())
    with contextlib.suppress(Exception):
        ray.shutdown()
    _BEFORE_RAY.clear()
    if not private:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in started):
        time.sleep(0.05)
    for pid in started:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def teardown_local_ray(timeout: float = 2.0) -> bool:
    """Stop the Ray node this process started and every process below it (raylet, dashboard, log monitor, workers,
    agents: SIGTERM, then SIGKILL after ``timeout`` s; the GCS server last, killed), and wait until they are gone;
    True when it did.
    A joined cluster (``simulation.ray_address``) is left alone (False), as is anything this Ray version does not
    expose."""
    try:
        worker = sys.modules.get("ray._private.worker")
        node = getattr(worker, "_global_node", None) if worker is not None else None
        if node is None or not node.is_head():
            return False
        procs = [info.process for kind, infos in node.all_processes.items() for info in infos if kind != "gcs_server"]
        gcs = [info.process for info in node.all_processes.get("gcs_server", [])]
    except Exception:  # noqa: BLE001 - private Ray API: fall back to Ray's own shutdown
        return False
    below = set(descendants(os.getpid()))  # before the raylet dies and its workers are re-parented
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(max(0.0, deadline - time.monotonic()))
    # the GCS server holds only this run's in-memory cluster state, and its graceful exit waits seconds on the
    # raylet it outlived: once everything else is gone, it is killed
    gcs_pids = {proc.pid for proc in gcs}
    while time.monotonic() < deadline and any(alive(pid) for pid in below - gcs_pids):
        time.sleep(0.05)
    procs += gcs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
    for pid in below:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(1.0)
    end = time.monotonic() + 1.0  # a killed process takes a moment to go
    while time.monotonic() < end and any(alive(pid) for pid in below):
        time.sleep(0.02)
    return True


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return None
    return None
