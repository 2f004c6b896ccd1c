"""``fedsim deploy``: a scenario on Flower's deployment engine, a SuperLink and N SuperNodes on this machine.

``LocalFederation`` starts ``flower-superlink`` (deployment engine, or Flower's simulation runtime with
``simulation=True``) and ``flower-supernode`` processes on free loopback ports, with a temporary ``FLWR_HOME`` that
holds the connection, and runtime dependency installation off (no network). ``run`` submits fedsim's Flower App
(``fedsim.flower_app``) with ``flwr run``, as a user would; every process it started (and their children) is
stopped when the block ends: on success, on error and on Ctrl-C.

Each SuperNode gets ``partition-id`` / ``num-partitions`` in its node config and builds its own clients' partitions
from the scenario (the same seeded split everywhere): no training data travels, only the messages.

To use SuperNodes on other machines instead, start them there with the same node config and
``--superlink <host>:<port>`` (TLS and authentication: Flower's deployment docs); the scenario travels in the app.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fedsim.errors import FedsimError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
CONNECTION = "fedsim-local"


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


class LocalFederation:
    """A SuperLink and ``nodes`` SuperNodes on loopback (``simulation=True``: a SuperLink with Flower's simulation
    runtime and no SuperNodes; ``flwr run`` then runs the app on ``num_supernodes`` simulated nodes)."""

    def __init__(self, nodes: int = 0, *, simulation: bool = False, num_supernodes: int = 2,
                 workdir: str | Path | None = None, verbose: bool = False) -> None:
        if not simulation and nodes < 1:
            raise DeployError(f"--nodes: {nodes}; the deployment engine needs at least one SuperNode")
        self.nodes = int(nodes)
        self.simulation = simulation
        self.num_supernodes = int(num_supernodes)
        self.workdir = Path(workdir or Path.cwd()).resolve()
        self.verbose = verbose
        self.home = Path(tempfile.mkdtemp(prefix="fedsim-flwr-"))
        self.logs = self.home / "logs"
        self.logs.mkdir()
        self.port = 0
        self.processes: list[subprocess.Popen] = []
        self.started_pids: set[int] = set()  # every PID seen under the processes started here

    # -- processes ------------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_DISABLE_UPDATE_CHECK="1",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0")
        # Flower's processes start further ones by name (flower-superexec, flwr-serverapp, flwr-clientapp)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("RAY_ADDRESS", "local")  # Flower's simulation runtime: a private Ray, never a stranger's
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=self.workdir, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc._fedsim_log = log  # type: ignore[attr-defined]
        self.processes.append(proc)
        self.started_pids.add(proc.pid)
        return proc

    def start(self) -> LocalFederation:
        self.port = free_port()
        link = [*_flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
        if self.simulation:
            link.append("--simulation")
        superlink = self._spawn("superlink", link)
        self._wait_healthy(superlink)
        for pid in range(self.nodes):
            self._spawn(f"supernode-{pid}", [
                *_flower_command("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(free_port()), "--isolation", "subprocess",
                "--node-config", f"partition-id={pid} num-partitions={self.nodes}",
            ])
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        return self

    def _wait_healthy(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeployError(f"flower-superlink exited with code {proc.returncode}: {self.log_tail('superlink')}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.2)
        raise DeployError(f"flower-superlink did not answer on 127.0.0.1:{self.port} within {START_TIMEOUT:.0f} s")

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
        proc = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdout=out, stderr=out,
                                start_new_session=True)
        self.started_pids.add(proc.pid)
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
        below them (the ServerApp and ClientApp subprocesses, Ray) that is still alive is killed too."""
        from fedsim.engine.processes import alive

        self._collect()
        for proc in reversed(self.processes):  # SuperNodes first, the SuperLink last
            _stop_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for pid in self.started_pids:
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            proc._fedsim_log.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.home, ignore_errors=True)

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
           federation: LocalFederation | None = None) -> list[tuple[str | None, Path, dict]]:
    """Run every (selected) variant of ``scenario`` on a local deployment with ``nodes`` SuperNodes; one Flower
    run per variant, into ``out`` (no variants) or ``out/<label>``. Returns (label, run dir, summary) each.
    ``federation``: an already started one to use (and leave running); by default one is started and stopped."""
    import json

    from fedsim.config import load_scenarios, select_variants

    every = load_scenarios(scenario, overrides)  # a bad scenario fails here, before anything starts
    variants = select_variants(every, only)
    single = len(every) == 1
    out = Path(out).resolve()
    results = []
    with contextlib.nullcontext(federation) if federation is not None else LocalFederation(
            nodes, verbose=verbose) as federation:
        nodes = federation.nodes
        app = make_app(scenario, tempfile.mkdtemp(prefix="app-", dir=federation.home))
        for i, (label, config) in enumerate(variants, 1):
            run_dir = out if single else out / label
            print(f"[{i}/{len(variants)}] {label}: {config.strategy.name}, {config.num_clients} clients on {nodes} "
                  f"SuperNodes (flwr run, SuperLink 127.0.0.1:{federation.port}) -> {run_dir}", file=sys.stderr,
                  flush=True)
            code = federation.run(app, {"scenario": f"scenarios/{Path(scenario).name}", "out": str(run_dir),
                                        "set": ";".join(overrides), "only": "" if single else label,
                                        "nodes": nodes}, timeout=timeout)
            summary_file = run_dir / "summary.json"
            summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
            if code != 0 or summary.get("status") != "completed":
                raise DeployError(
                    f"deploy: the run of {label or Path(scenario).name} did not complete (flwr run exit {code}, "
                    f"status {summary.get('status', 'missing')}{': ' + summary['error'] if 'error' in summary else ''}"
                    f"); SuperLink log:\n{federation.log_tail('superlink')}")
            results.append((label if not single else None, run_dir, summary))
    return results
