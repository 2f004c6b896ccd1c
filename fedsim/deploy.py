"""``fedsim deploy``: a scenario on Flower's deployment engine, a SuperLink and N SuperNodes on this machine.

``LocalFederation`` starts ``flower-superlink`` (deployment engine, or Flower's simulation runtime with
``simulation=True``) and ``flower-supernode`` processes on free loopback ports, with a temporary ``FLWR_HOME`` that
holds the connection, and runtime dependency installation off (no network). ``run`` submits fedsim's Flower App
(``fedsim.flower_app``) with ``flwr run``, as a user would; every process it started (and their children) is
stopped when the block ends: on success, on error and on Ctrl-C.

Each SuperNode gets ``partition-id`` / ``num-partitions`` in its node config and builds its own clients' partitions
from the scenario (the same seeded split everywhere): no training data travels, only the messages.

Other users of the machine cannot use the federation. Flower 1.42 (without its enterprise add-on) authenticates
no submitter: its Control API (``flwr run``), Fleet API and Runtime APIs are plain HTTP on one TCP port, and
anyone who reaches that port can run a ServerApp as the SuperLink's user. So no API listens on TCP: every Flower
process of the federation is started with a ``sitecustomize`` (``install_socket_routes``) that makes uvicorn serve
the SuperLink's and each SuperNode's API on a unix socket in a 0700 directory of this user, and makes Flower's
HTTP clients (httpx) reach those addresses through the sockets. The ``127.0.0.1:<port>`` addresses on the
command lines are names only: fedsim keeps each port bound (not listening) while the federation runs, so nobody
else can listen there either. Every process dies with fedsim, ``kill -9`` included
(``fedsim.engine.processes.die_with_parent`` and ``Watchdog``).

To use SuperNodes on other machines instead, start them there with the same node config and
``--superlink <host>:<port>`` (TLS and authentication: Flower's deployment docs); the scenario travels in the app.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedsim.errors import FedsimError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
APP_STOP_TIMEOUT = 30.0  # seconds a ServerApp gets, after SIGTERM, to write its summary.json (interrupted)
APP_COMMANDS = ("flwr-serverapp", "flwr-simulation")  # the processes that run fedsim's ServerApp
CONNECTION = "fedsim-local"
SOCKETS_ENV = "FEDSIM_FLOWER_SOCKETS"  # {"127.0.0.1:<port>": "<unix socket path>"} (JSON) in the federation's env


class DeployError(FedsimError):
    """The local SuperLink or SuperNodes did not start, or the run did not finish."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _flower_command(name: str) -> list[str]:
    """Flower's console script ``name`` next to this interpreter (the venv fedsim runs in), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name}: not found beside {sys.executable} nor on PATH (it comes with flwr)")
    return [found]


def app_pyproject(scenario_name: str) -> str:
    """pyproject.toml of the small Flower App ``fedsim deploy`` submits: fedsim's apps, the scenario file."""
    from fedsim.flower_app import RUN_CONFIG_DEFAULTS

    config = dict(RUN_CONFIG_DEFAULTS, scenario=f"scenarios/{scenario_name}")
    config_lines = "\n".join(f"{key} = {_toml_value(value)}" for key, value in config.items())
    return f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsim-deploy"
version = "0.1.0"
description = "fedsim scenario {scenario_name} on Flower's deployment engine"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsim"
fab-include = ["scenarios/*.toml"]

[tool.flwr.app.components]
serverapp = "fedsim.flower_app:server_app"
clientapp = "fedsim.flower_app:client_app"

[tool.flwr.app.config]
{config_lines}
"""


def _toml_value(value: object) -> str:
    """A TOML literal: numbers as they are, anything else as a basic string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------------- Flower's APIs on unix sockets
def socket_routes() -> dict[str, str]:
    """The routes of this process's federation (``SOCKETS_ENV``): ``host:port`` -> unix socket path."""
    text = os.environ.get(SOCKETS_ENV, "")
    try:
        routes = json.loads(text) if text else {}
    except ValueError:
        routes = {}
    return {str(k): str(v) for k, v in routes.items()} if isinstance(routes, dict) else {}


def install_socket_routes(routes: dict[str, str] | None = None) -> bool:
    """Serve and reach the ``routes`` addresses over their unix sockets in this process (by default those of
    ``SOCKETS_ENV``; nothing without). A uvicorn server configured for ``host:port`` binds the socket instead
    (uvicorn's ``uds``), and an httpx transport sends a request for ``http://host:port/...`` through it. The
    patches are applied when uvicorn's and httpx's modules load (an import hook), or now if loaded already.
    Returns whether anything was installed."""
    import importlib.abc

    routes = dict(socket_routes() if routes is None else routes)
    if not routes:
        return False
    patches = {"httpx._transports.default": lambda module: _route_httpx(module, routes),
               "uvicorn.config": lambda module: _route_uvicorn(module, routes)}

    class PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN202
            patch = patches.get(name)
            if patch is None:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            loader_exec = spec.loader.exec_module

            def exec_module(module):  # noqa: ANN001, ANN202
                loader_exec(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, PatchOnImport())
    return True


def _route_httpx(module: object, routes: dict[str, str]) -> None:
    """httpx's transports send requests for a routed ``host:port`` through its unix socket."""
    lock = threading.Lock()

    def inner(transport: object, path: str, cls: type) -> object:
        with lock:
            cache = transport.__dict__.setdefault("_fedsim_routes", {})
            if path not in cache:
                routed = cls(uds=path)
                routed._fedsim_routed = True
                cache[path] = routed
            return cache[path]

    for cls_name, method in (("HTTPTransport", "handle_request"), ("AsyncHTTPTransport", "handle_async_request")):
        cls = getattr(module, cls_name)
        original = getattr(cls, method)
        if getattr(original, "_fedsim_routed", False):
            continue

        def make(original, cls, is_async):  # noqa: ANN001, ANN202
            def route(self, request):  # noqa: ANN001, ANN202
                path = routes.get(f"{request.url.host}:{request.url.port}")
                if path is None or getattr(self, "_fedsim_routed", False):
                    return original(self, request)
                target = inner(self, path, cls)
                return (target.handle_async_request if is_async else target.handle_request)(request)

            route._fedsim_routed = True
            return route

        setattr(cls, method, make(original, cls, cls_name.startswith("Async")))


def _route_uvicorn(module: object, routes: dict[str, str]) -> None:
    """A uvicorn ``Config`` for a routed ``host:port`` binds its unix socket instead of the TCP port."""
    cls = module.Config
    original = cls.__init__
    if getattr(original, "_fedsim_routed", False):
        return

    def __init__(self, *args, **kwargs):  # noqa: ANN001, ANN202, N807
        original(self, *args, **kwargs)
        path = routes.get(f"{self.host}:{self.port}")
        if path is not None and self.uds is None and self.fd is None:
            self.uds = path

    __init__._fedsim_routed = True
    cls.__init__ = __init__


SITECUSTOMIZE = f"""# written by fedsim deploy: Flower's APIs of this federation on unix sockets (fedsim.deploy)
import os as _os
import sys as _sys
try:
    from fedsim.deploy import install_socket_routes as _install
    _install()
except Exception as _exc:  # a process without the routes reaches nothing (nothing listens on the TCP ports)
    print(f"fedsim: {SOCKETS_ENV} routes not installed: {{_exc!r}}", file=_sys.stderr)
_here = _os.path.dirname(_os.path.abspath(__file__))
try:  # a sitecustomize further down sys.path still runs
    import importlib.machinery as _machinery
    _spec = _machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in _sys.path if _os.path.abspath(p or ".") != _here])
    if _spec is not None and _spec.loader is not None:
        _spec.loader.exec_module(type(_sys)("sitecustomize"))
except Exception:
    pass
"""


def http_get_unix(path: str | Path, url: str, timeout: float = 2.0) -> int:
    """``GET url`` over the unix socket ``path``; the HTTP status."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        conn.sock = sock
        conn.request("GET", url)
        return conn.getresponse().status
    finally:
        conn.close()
        sock.close()


class LocalFederation:
    """A SuperLink and ``nodes`` SuperNodes on this machine, reachable by this user only (``simulation=True``: a
    SuperLink with Flower's simulation runtime and no SuperNodes; ``flwr run`` then runs the app on
    ``num_supernodes`` simulated nodes). Start it from the thread that stops it (the main thread, normally):
    its processes die with that thread (``die_with_parent``)."""

    def __init__(self, nodes: int = 0, *, simulation: bool = False, num_supernodes: int = 2,
                 workdir: str | Path | None = None, verbose: bool = False) -> None:
        if not simulation and nodes < 1:
            raise DeployError(f"--nodes: {nodes}; the deployment engine needs at least one SuperNode")
        self.nodes = int(nodes)
        self.simulation = simulation
        self.num_supernodes = int(num_supernodes)
        self.workdir = Path(workdir or Path.cwd()).resolve()
        self.verbose = verbose
        self.home = Path(tempfile.mkdtemp(prefix="fedsim-flwr-"))  # 0700: FLWR_HOME, logs, the sockets
        self.logs = self.home / "logs"
        self.logs.mkdir()
        self.port = 0
        self.address = ""  # the SuperLink's name on command lines and in the connection (see the module docstring)
        self.routes: dict[str, str] = {}  # host:port -> unix socket path
        self.sockets = self._socket_dir()
        self._reserved: list[socket.socket] = []
        self.watchdog = None
        self.processes: list[subprocess.Popen] = []
        self.started_pids: set[int] = set()  # every PID seen under the processes started here

    def _socket_dir(self) -> Path:
        """A 0700 directory for the unix sockets, inside FLWR_HOME unless that path is too long for one."""
        where = self.home / "sockets"
        if len(str(where / "supernode-9999.sock")) > 100:  # sun_path holds 108 bytes
            where = Path(tempfile.mkdtemp(prefix="fedsim-", dir="/tmp"))
        else:
            where.mkdir()
        where.chmod(0o700)
        return where

    def _reserve(self, name: str) -> str:
        """A ``127.0.0.1:<port>`` name routed to ``sockets/<name>.sock``; the port stays bound (not listening, no
        SO_REUSEADDR) by this process, so no other user can listen on it while the federation runs."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._reserved.append(sock)
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        self.routes[address] = str(self.sockets / f"{name}.sock")
        return address

    # -- processes ------------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_DISABLE_UPDATE_CHECK="1",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0")
        # Flower's processes start further ones by name (flower-superexec, flwr-serverapp, flwr-clientapp)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("RAY_ADDRESS", "local")  # Flower's simulation runtime: a private Ray, never a stranger's
        # every Python process below loads the sitecustomize that puts the APIs on the unix sockets
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(self.home / "site"), env.get("PYTHONPATH", "")] if p)
        env[SOCKETS_ENV] = json.dumps(self.routes)
        if self.watchdog is not None:
            env.update(self.watchdog.env)
        return env

    def _popen(self, args: list[str], **kwargs: object) -> subprocess.Popen:
        """Start ``args`` in its own session, killed when this process dies, and recorded (PID, watchdog) before
        a signal can interrupt: SIGINT/SIGTERM are handled after the bookkeeping."""
        from fedsim.engine.processes import deferred_signals, die_with_parent

        with deferred_signals():
            proc = subprocess.Popen(args, cwd=self.workdir, env=self._env(), start_new_session=True,
                                    preexec_fn=die_with_parent(), **kwargs)  # noqa: PLW1509 - see die_with_parent
            self.started_pids.add(proc.pid)
            self.watchdog.watch(proc.pid)
        return proc

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        from fedsim.engine.processes import deferred_signals

        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        with deferred_signals():
            try:
                proc = self._popen(args, stdout=log, stderr=subprocess.STDOUT)
            except BaseException:
                log.close()
                raise
            proc._fedsim_log = log  # type: ignore[attr-defined]
            self.processes.append(proc)
        return proc

    def start(self) -> LocalFederation:
        from fedsim.engine.processes import Watchdog, deferred_signals

        with deferred_signals():
            self.watchdog = Watchdog()
        self.watchdog.remove_after(self.home)  # after kill -9 too
        if not self.sockets.is_relative_to(self.home):
            self.watchdog.remove_after(self.sockets)
        self.address = self._reserve("superlink")
        self.port = int(self.address.rsplit(":", 1)[1])
        node_addresses = [self._reserve(f"supernode-{pid}") for pid in range(self.nodes)]
        (self.home / "site").mkdir()
        (self.home / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        link = [*_flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
        if self.simulation:
            link.append("--simulation")
        superlink = self._spawn("superlink", link)
        self._wait_healthy(superlink)
        for pid, address in enumerate(node_addresses):
            self._spawn(f"supernode-{pid}", [
                *_flower_command("flower-supernode"), "--insecure", "--superlink", self.address,
                "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--isolation", "subprocess",
                "--node-config", f"partition-id={pid} num-partitions={self.nodes}",
            ])
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\ninsecure = true\n'
        )
        return self

    def _wait_healthy(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        path = self.routes[self.address]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeployError(f"flower-superlink exited with code {proc.returncode}: {self.log_tail('superlink')}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_get_unix(path, "/health", timeout=1) == 200:
                    return
            time.sleep(0.2)
        raise DeployError(f"flower-superlink did not answer on {path} within {START_TIMEOUT:.0f} s: "
                          f"{self.log_tail('superlink')}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- runs -----------------------------------------------------------------------------------------------
    def run(self, app_dir: str | Path, run_config: dict[str, object], timeout: float | None = None) -> int:
        """``flwr run APP`` on this federation with ``run_config`` (written to a TOML file, so any string
        survives quoting); returns flwr's exit code after the run ended."""
        overrides = self.home / f"run-config-{len(list(self.home.glob('run-config-*')))}.toml"
        overrides.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in run_config.items()))
        cmd = [*_flower_command("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream",
               "--run-config", str(overrides)]
        if self.simulation:
            cmd += ["--federation-config", f"num-supernodes={self.num_supernodes}"]
        out = None if self.verbose else subprocess.DEVNULL
        proc = self._popen(cmd, stdout=out, stderr=out)
        try:
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                _stop_group(proc.pid)

    # -- teardown -------------------------------------------------------------------------------------------
    def _collect(self) -> None:
        from fedsim.engine.processes import descendants

        for proc in self.processes:
            self.started_pids.update(descendants(proc.pid))

    def stop(self) -> None:
        """SIGTERM to every process group started here, SIGKILL after ``STOP_TIMEOUT``; then every PID seen
        below them (the ServerApp and ClientApp subprocesses, Ray) that is still alive is killed too, and the
        watchdog sweeps whatever carries this federation's token. A signal meanwhile is handled afterwards."""
        from fedsim.engine.processes import deferred_signals, signal_alive

        with deferred_signals():
            self._collect()
            self._stop_apps()
            for proc in reversed(self.processes):  # SuperNodes first, the SuperLink last
                _stop_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for proc in self.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._collect()
            signal_alive(self.started_pids, signal.SIGKILL)
            if self.watchdog is not None:
                self.started_pids.add(self.watchdog.pid)
                self.watchdog.close()
            for proc in self.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
                proc._fedsim_log.close()  # type: ignore[attr-defined]
            for sock in self._reserved:
                sock.close()
            self._reserved.clear()
            shutil.rmtree(self.home, ignore_errors=True)
            if not self.sockets.is_relative_to(self.home):
                shutil.rmtree(self.sockets, ignore_errors=True)

    def _stop_apps(self, timeout: float = APP_STOP_TIMEOUT) -> None:
        """SIGTERM to the ServerApp processes still running (a run that was interrupted), and up to ``timeout``
        seconds for them to end: fedsim's ServerApp then writes summary.json with ``status = "interrupted"`` and
        its finished rows while the SuperLink and SuperNodes are still there."""
        from fedsim.engine.processes import descendants, signal_alive, wait_gone

        apps = [pid for proc in self.processes for pid in descendants(proc.pid)
                if any(name in _cmdline(pid) for name in APP_COMMANDS)]
        signal_alive(apps, signal.SIGTERM)
        wait_gone(apps, timeout, poll=0.1)

    def alive(self) -> list[int]:
        """PIDs started here (or seen below them) that still run."""
        from fedsim.engine.processes import alive

        return sorted(pid for pid in self.started_pids if alive(pid))

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_group(pid: int, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(pid), sig)


def make_app(scenario: str | Path, where: str | Path) -> Path:
    """A Flower App directory under ``where``: fedsim's apps and a copy of ``scenario`` (what the FAB carries)."""
    scenario = Path(scenario)
    app = Path(where) / "app"
    (app / "scenarios").mkdir(parents=True)
    shutil.copyfile(scenario, app / "scenarios" / scenario.name)
    (app / "pyproject.toml").write_text(app_pyproject(scenario.name))
    return app


def deploy(scenario: str | Path, nodes: int, out: str | Path, overrides: list[str] | tuple[str, ...] = (),
           only: list[str] | tuple[str, ...] = (), verbose: bool = False, timeout: float | None = None,
           federation: LocalFederation | None = None, resume: bool = False,
           overwrite: bool = False) -> list[tuple[str | None, Path, dict]]:
    """See ``_deploy``. Every run directory of the plan is held (``fedsim.results.rundir.lock_run_dir``) from its
    checks until the runs ended: another fedsim run into one of them is refused; the ServerApp, a process below
    this one, writes under this lock."""
    with contextlib.ExitStack() as held:
        return _deploy(scenario, nodes, out, overrides, only, verbose, timeout, federation, resume, overwrite,
                       held=held)


def _deploy(scenario: str | Path, nodes: int, out: str | Path, overrides: list[str] | tuple[str, ...] = (),
            only: list[str] | tuple[str, ...] = (), verbose: bool = False, timeout: float | None = None,
            federation: LocalFederation | None = None, resume: bool = False,
            overwrite: bool = False, *, held: contextlib.ExitStack) -> list[tuple[str | None, Path, dict]]:
    """Run every (selected) variant of ``scenario`` on a local deployment with ``nodes`` SuperNodes; one Flower
    run per variant, into ``out`` (no variants) or ``out/<label>``. Returns (label, run dir, summary) each.
    ``federation``: an already started one to use (and leave running); by default one is started and stopped.

    The run directories follow ``fedsim run``'s rules (``fedsim.results.rundir.check_run_dir``), checked before
    anything starts: a completed run of another configuration or files fedsim did not write are refused unless
    ``overwrite``; with ``resume`` a variant completed there with the same configuration is skipped (and no
    federation starts when nothing is left to run)."""
    from fedsim.config import load_scenarios, select_variants
    from fedsim.flower_app import for_nodes, join_overrides
    from fedsim.registry import check_variants
    from fedsim.results import rundir as results_dir

    every = load_scenarios(scenario, overrides)  # a bad scenario fails here, before anything starts
    variants = select_variants(every, only)
    single = len(every) == 1
    out = Path(out).resolve()
    nodes = federation.nodes if federation is not None else int(nodes)
    check_variants(variants, nodes)  # the parts as the SuperNodes will serve them (several clients: reduce)
    plan = []
    for label, config in variants:
        run_dir = out if single else out / label
        held.enter_context(results_dir.lock_run_dir(run_dir))  # RunDirLocked: another fedsim run writes there
        # what the ServerApp writes into config.json: the scenario with its clients in blocks over the nodes
        todo = results_dir.check_run_dir(run_dir, for_nodes(config, nodes).to_dict(), resume=resume,
                                         overwrite=overwrite, label=None if single else label)
        plan.append((label, config, run_dir, todo))
    if not single and not overwrite:  # the report files fedsim writes into --out beside the variants
        results_dir.refuse_foreign_report_files(out)
    results = []
    for i, (label, _, run_dir, todo) in enumerate(plan, 1):
        if not todo:
            print(f"[{i}/{len(plan)}] {label}: completed earlier in {run_dir}, skipped", file=sys.stderr, flush=True)
            results.append((label if not single else None, run_dir, _read_summary(run_dir)))
    if all(not todo for *_, todo in plan):
        return results
    with contextlib.nullcontext(federation) if federation is not None else LocalFederation(
            nodes, verbose=verbose) as federation:
        app = make_app(scenario, tempfile.mkdtemp(prefix="app-", dir=federation.home))
        for i, (label, config, run_dir, todo) in enumerate(plan, 1):
            if not todo:
                continue
            print(f"[{i}/{len(plan)}] {label}: {config.strategy.name}, {config.num_clients} clients on {nodes} "
                  f"SuperNodes (flwr run, SuperLink on {federation.routes[federation.address]}) -> {run_dir}",
                  file=sys.stderr, flush=True)
            code = federation.run(app, {"scenario": f"scenarios/{Path(scenario).name}", "out": str(run_dir),
                                        "set": join_overrides(overrides), "only": "" if single else label,
                                        "nodes": nodes}, timeout=timeout)
            summary = _read_summary(run_dir)
            if code != 0 or summary.get("status") != "completed":
                raise DeployError(
                    f"deploy: the run of {label or Path(scenario).name} did not complete (flwr run exit {code}, "
                    f"status {summary.get('status', 'missing')}{': ' + summary['error'] if 'error' in summary else ''}"
                    f"); SuperLink log:\n{federation.log_tail('superlink')}")
            results.append((label if not single else None, run_dir, summary))
    order = {str(run_dir): i for i, (_, _, run_dir, _) in enumerate(plan)}
    return sorted(results, key=lambda r: order[str(r[1])])


def _read_summary(run_dir: Path) -> dict:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}
