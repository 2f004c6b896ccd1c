"""The one module that starts, joins and stops Ray (a Ray or Flower upgrade changes this file, not the runner).

``ray_session()`` spans a whole ``fedsim run``: the first Ray-backed variant starts Ray (``ensure_ray``), every later
variant and seed reuses it, and Ray is shut down when the block ends (also on error and Ctrl-C), so no Ray process
outlives the command and Ray's start-up (12-20 s) is paid once. ``run_scenario`` called alone opens its own session.

By default Ray is a private instance of this process: ``address="local"`` (never a cluster someone started with
``ray start`` on the machine, nor a stale cluster file), node IP 127.0.0.1 (the GCS and raylet then listen on
loopback, not on every interface), no dashboard process (``_private_node_patches``), its files in a private
0700 temporary folder (removed at the end), and Ray's token authentication (``RAY_AUTH_MODE=token`` with a
random token per process), since anyone who reaches Ray's ports can run code on the machine. ``simulation.ray_address`` (or ``RAY_ADDRESS`` set by the
user) joins an existing cluster instead, without CPU/GPU counts (the cluster has its own) and with the user's own
authentication settings.

``teardown_local_ray`` is the fast way out after a signal: it kills the private node's processes directly instead
of waiting on Ray's own shutdown.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from fedsim.engine.processes import descendants, signal_alive, wait_gone
from fedsim.errors import ConfigError

STATS = {"starts": 0}  # how many times this process started or joined Ray (tests assert one per session)
_SESSIONS: list[dict[str, Any]] = []  # the open session (at most one; nested blocks reuse it)
_TOKEN = secrets.token_hex(32)  # one per process: Ray caches the token it read first
# Task arguments and results up to this size travel inside the actor call instead of through the raylet's shared
# object store (Ray's default 100 KiB): a model of ~0.4 MB each way per client made the raylet the third busiest
# process (14.5 CPU-s of 245 at 1,000 clients x 20 rounds, issue #26; 0.55 s instead of 3.0-3.8 s over 5 rounds).
# Larger uploads (AFL's Gram statistics) still use the object store. Only for the private Ray fedsim starts.
DIRECT_CALL_BYTES = 4 * 2**20
# The private Ray's system settings: the direct-call size above, and none of Ray's per-task bookkeeping that only
# its dashboard and state API read (neither runs in a private node: no dashboard, and fedsim never lists tasks):
# task status and profile events batched to the GCS each second, per-handler event-loop statistics and the
# OpenCensus metrics every process records and exports to the node's agent. Each costs some CPU per task in the
# driver and the actors; measured, the saving is small and near this 2-core machine's noise: a 400 KB argument and
# result through an actor took 0.96x and 1.035x the process tree's CPU of Ray's defaults in two invocations of
# ``python scripts/bench_ray_task.py`` (6 and 3 repeats, about 5 and 2.7 ms per call; issue #26).
PRIVATE_SYSTEM_CONFIG: dict[str, Any] = {
    "max_direct_call_object_size": DIRECT_CALL_BYTES,
    "task_events_report_interval_ms": 0,  # 0: no task events recorded or sent
    "enable_timeline": False,  # no per-task profile events
    "event_stats": False,  # no timing of every event-loop handler
    "enable_metrics_collection": False,  # no metrics recorded, none exported to the agent
}


def ray_address(config: Any) -> str | None:
    """The cluster to join: ``simulation.ray_address``, else ``RAY_ADDRESS`` from the user's environment."""
    return config.simulation.ray_address or os.environ.get("RAY_ADDRESS") or None


def _import_ray_with_token_auth() -> Any:
    """Import Ray with token authentication on, unless the user chose a mode. Ray reads ``RAY_AUTH_MODE`` once, at
    import: when something imported Ray before (without it), this session runs without authentication, and a
    RuntimeWarning says so (with what to set)."""
    if "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        try:
            import ray
        finally:
            del os.environ["RAY_AUTH_MODE"]
        return ray
    import ray

    if "RAY_AUTH_MODE" not in os.environ and auth_mode() != "token":
        warnings.warn(
            "fedsim's private Ray starts WITHOUT token authentication: Ray was imported before fedsim started it "
            "(by a plugin or the calling code), and Ray reads RAY_AUTH_MODE only when first imported; another "
            "local user could then reach its GCS port on 127.0.0.1. Set RAY_AUTH_MODE=token in the environment, or "
            "import Ray only after fedsim has started it", RuntimeWarning, stacklevel=3)
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
def _private_node_patches(active: bool, log_to_driver: bool = True) -> Iterator[None]:
    """What ``ray.init`` of the private Ray does differently (private Ray API, each patch skipped where this Ray
    version lacks it):

    - no dashboard process: with ``include_dashboard=False`` Ray still starts ``dashboard.py`` with its
      UsageStatsHead module, which sends cloud-metadata requests (169.254.169.254, ``metadata.google.internal``);
      ``Node.start_api_server`` leaves the URL empty as the minimal install does and starts nothing;
    - no autoscaler monitor (``monitor.py``: a one-machine Ray has nothing to scale; ``ray start --no-monitor``
      does the same) and, unless the workers' output is shown (``log_to_driver``), no log monitor: two Python
      processes that poll Ray for the whole run (issue #26: CPU a bare loop does not spend);
    - the folders the driver creates in its temp dir (session, logs, sockets, runtime_resources) are 0700, not
      Ray's 0777 without the sticky bit;
    - SIGTERM stays fedsim's where a Python handler is installed (``fedsim run``): ``ray.init`` replaces the handler (``sys.exit(15)``, later ``sys.exit(1)``) and the
      driver's core worker installs a C++ failure handler that aborts on SIGTERM (exit 134); a signal while Ray
      starts then ends the run as "interrupted" with 143 (``fedsim.engine.signals``).
    """
    if not active:
        yield
        return
    undo: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        if owner is not None and hasattr(owner, name):
            undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)

    node_mod = utils = constants = None
    with contextlib.suppress(Exception):
        import ray._private.node as node_mod
    with contextlib.suppress(Exception):
        import ray._private.utils as utils
    with contextlib.suppress(Exception):
        import ray._private.ray_constants as constants

    def start_api_server(self: Any, *, include_dashboard: Any = None, raise_on_failure: Any = None) -> None:
        self._webui_url = ""

    def private_directory(directory_path: str) -> None:  # Ray's own makes every folder 0777 ("shared")
        os.makedirs(os.path.expanduser(directory_path), mode=0o700, exist_ok=True)

    patch(getattr(node_mod, "Node", None), "start_api_server", start_api_server)
    patch(getattr(node_mod, "Node", None), "start_monitor", lambda self: None)
    if not log_to_driver:
        patch(getattr(node_mod, "Node", None), "start_log_monitor", lambda self: None)
    patch(node_mod, "try_to_create_directory", private_directory)
    if callable(signal.getsignal(signal.SIGTERM)):  # someone (fedsim run) handles SIGTERM: Ray must not take it
        patch(utils, "set_sigterm_handler", lambda handler: None)
        patch(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", True)
    try:
        yield
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)


# --------------------------------------------------------------------------- the private Ray's temporary folder
_TEMP_DIRS: list[str] = []  # the private Ray's temporary folder while it exists (0700, this process's)
_SOCKET_PATH_ROOM = 64  # what Ray appends to its temp dir for a socket: /session_<date>_<time>_<pid>/sockets/...
_UNIX_PATH_MAX = 107


def _make_temp_dir() -> str:
    """A fresh 0700 folder for the private Ray (``ray.init(_temp_dir=...)``): Ray's default ``/tmp/ray`` and its
    ``session_*/{logs,sockets}`` are 0777 without the sticky bit, so another local user could replace the raylet's
    and the object store's sockets. Under ``RAY_TMPDIR``, else the system's temporary folder, else ``/tmp`` when
    that path is too long for Ray's unix sockets."""
    for base in (os.environ.get("RAY_TMPDIR"), tempfile.gettempdir(), "/tmp"):
        if base and os.path.isdir(base) and len(os.path.abspath(base)) + 16 + _SOCKET_PATH_ROOM <= _UNIX_PATH_MAX:
            with contextlib.suppress(OSError):
                path = tempfile.mkdtemp(prefix="fedsim-ray-", dir=base)
                _TEMP_DIRS.append(path)
                return path
    raise ConfigError("cannot create a private temporary folder for Ray: set TMPDIR (or RAY_TMPDIR) to a "
                      "writable folder with a short path (Ray's socket paths must stay under 108 bytes)")


def _remove_temp_dirs() -> None:
    """Remove the private Ray's temporary folder (after its processes are gone)."""
    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


def temp_dir() -> str | None:
    """The private Ray's temporary folder while it is up (None otherwise)."""
    return _TEMP_DIRS[-1] if _TEMP_DIRS else None


atexit.register(_remove_temp_dirs)  # a normal interpreter exit after an error; a signal removes it itself


# ------------------------------------------------------------------- orphans of the private Ray stay findable
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    """Make this process the subreaper of what it starts (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``): when the raylet
    dies first (a signal to the whole process group: Ctrl-C in a terminal, ``timeout``, Slurm), its DashboardAgent,
    RuntimeEnvAgent and workers are re-parented to this process instead of init, so ``descendants`` still finds
    them and they are stopped with the rest (they otherwise lived on for 60-150 s)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap(pids: set[int]) -> None:
    """Collect the exit status of the orphans this process inherited as subreaper (no zombies left behind);
    only ``pids`` (never a child someone else waits for)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _ray_children() -> set[int]:
    """PIDs of the processes the private node started itself (Ray waits for these)."""
    with contextlib.suppress(Exception):
        worker = sys.modules.get("ray._private.worker")
        node = getattr(worker, "_global_node", None) if worker is not None else None
        if node is not None:
            return {info.process.pid for infos in node.all_processes.values() for info in infos}
    return set()


def _stop_partial_start(before: set[int], timeout: float = 2.0) -> None:
    """``ray.init`` of the private Ray did not finish (a signal, an error): stop every process it started."""
    started = set(descendants(os.getpid())) - before
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_alive(started, sig)
        wait_gone(started, timeout if sig == signal.SIGTERM else 1.0)
    _reap(started)


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


def worker_runtime_env(address: str | None) -> dict[str, Any]:
    """The Ray ``runtime_env`` of the workers: their PYTHONPATH is the driver's sys.path (as Flower's
    RayBackend.init_ray), and the plugin files of this command (``--plugin``: ``FEDSIM_PLUGINS``) go with it, so a
    worker's ``fedsim.registry.discover`` imports the same plugins. The private Ray (``ensure_ray``) sets the
    ``env_vars`` in the environment its processes start in instead, and the workers inherit them. Joining a
    cluster (``address``), whose nodes inherit nothing of this process's environment and may lack the files, the
    files also travel as ``py_modules`` (Ray uploads each to the cluster and puts it on the workers' path, where
    its module name finds it)."""
    from fedsim.registry import PLUGINS_ENV, plugin_files

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    env_vars = {"PYTHONPATH": pythonpath}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    files = [str(path) for path in plugin_files().values() if path.is_file()]
    if files:
        env_vars[PLUGINS_ENV] = os.environ[PLUGINS_ENV]
        if address:
            runtime_env["py_modules"] = files
    return runtime_env


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
    if address:  # a cluster's authentication is the user's (RAY_AUTH_MODE / RAY_AUTH_TOKEN as its nodes have them)
        import ray
    else:
        ray = _import_ray_with_token_auth()
    if ray.is_initialized():
        return init_args
    runtime_env = worker_runtime_env(address)
    args = dict(init_args, runtime_env=runtime_env)
    restore: dict[str, str | None] = {}  # variables set for Ray's start: their values before (None: unset)
    if address:
        args["address"] = address
    else:
        args.update(address="local", _node_ip_address="127.0.0.1",
                    _system_config=dict(PRIVATE_SYSTEM_CONFIG))
        # The private node's processes inherit this environment: the workers' variables go there for the start
        # and the runtime env stays empty. A runtime env of their own makes Ray leave the workers it prestarts
        # for the driver idle (they do not match it) and start every actor afresh through an extra setup process.
        inherited = dict(runtime_env.pop("env_vars"))
        if auth_mode() == "token":  # this session's secret; Ray's processes inherit it while they start
            for key, value in (("RAY_AUTH_MODE", "token"), ("RAY_AUTH_TOKEN", _TOKEN)):
                if key not in os.environ:
                    inherited[key] = value
        for key, value in inherited.items():
            if os.environ.get(key) != value:
                restore[key] = os.environ.get(key)
                os.environ[key] = value
    before: set[int] = set()
    if not address:  # what runs below this process before the private Ray starts (not Ray's: left alone at the end)
        before = set(descendants(os.getpid()))
        _BEFORE_RAY[:] = [before]
        args["_temp_dir"] = _make_temp_dir()
        _become_subreaper()
    try:
        with _loopback_stays_loopback(not address), _private_node_patches(not address, init_args["log_to_driver"]):
            if address:
                _join_within(ray, args, RAY_JOIN_TIMEOUT)
            else:
                ray.init(**args)
    except BaseException as exc:
        if not address:  # a signal or an error while the private Ray started: nothing of it stays
            _BEFORE_RAY.clear()
            with contextlib.suppress(Exception):
                ray.shutdown()
            _stop_partial_start(before)
            _remove_temp_dirs()
            raise
        error = join_error(address, exc)
        if error is None:
            raise
        raise error from None
    finally:
        for key, value in restore.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not address:  # the top folder stays 0700 whatever Ray did to it
        with contextlib.suppress(OSError):
            os.chmod(args["_temp_dir"], 0o700)
    STATS["starts"] += 1
    if session is not None:
        session.update(started=True, address=address, undo=_keep_ray_between_runs())
    return init_args


RAY_JOIN_TIMEOUT = 120.0  # seconds ray.init may take to join a cluster (a ray start cluster took 26 s on 2 cores)


class JoinTimeout(TimeoutError):
    """``ray.init`` did not join the cluster in time."""


def _join_within(ray: Any, args: dict[str, Any], timeout: float) -> None:
    """``ray.init(**args)`` for a cluster, given up after ``timeout`` s: Ray retries a GCS that accepts connections
    but never answers (or a cluster whose raylet it cannot find) for many minutes, blocked in C++ where no Python
    signal handler runs, so it runs in a daemon thread and this thread waits for it (a signal still interrupts)."""
    box: dict[str, Any] = {}

    def join() -> None:
        try:
            ray.init(**args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=join, name="fedsim-ray-join", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise JoinTimeout(f"no cluster joined within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]


def join_error(address: str, exc: BaseException) -> ConfigError | None:
    """The ConfigError a failure to join the cluster at ``address`` becomes (None: not a connection problem)."""
    auth = type(exc).__name__ == "AuthenticationError" or "token" in str(exc).lower()
    if not auth and not isinstance(exc, (ConnectionError, RuntimeError, ValueError, TimeoutError)):
        return None
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if len(first) > 300:
        first = first[:300] + "..."
    hint = ""
    if isinstance(exc, JoinTimeout):
        hint = (" (check that the cluster is up and answers: `ray status --address` with that address on this "
                "machine, the GCS port of the head (ray start --head --port), that this machine's IP is one the "
                "cluster's nodes can reach (ray start --node-ip-address), and the same Ray and Python versions)")
    elif auth:
        hint = (" (Ray token authentication: a cluster started with RAY_AUTH_MODE=token needs the same "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in fedsim's environment; for a cluster started without it, "
                "leave RAY_AUTH_MODE unset or set it to disabled)")
    return ConfigError(f"simulation.ray_address: cannot connect to Ray at {address!r}: {first}{hint}")


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
    own = _ray_children()
    with contextlib.suppress(Exception):
        ray.shutdown()
    _BEFORE_RAY.clear()
    if not private:
        return
    wait_gone(started, timeout)
    signal_alive(started, signal.SIGKILL)
    wait_gone(started, 1.0, poll=0.02)
    _reap(started - own)
    _remove_temp_dirs()


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
    wait_gone(below - gcs_pids, max(0.0, deadline - time.monotonic()))
    procs += gcs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
    signal_alive(below, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(1.0)
    wait_gone(below, 1.0, poll=0.02)  # a killed process takes a moment to go
    _reap(below - {proc.pid for proc in procs})
    _remove_temp_dirs()
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
