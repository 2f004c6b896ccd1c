"""``fedsim deploy``'s federation against other local users, and its processes against ``kill -9`` (issue #23).

Other users are played by uid 65534 through ``setpriv`` (util-linux); those tests need root and skip otherwise.
Every test kills what it started in a ``finally``, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
BIN = Path(sys.executable).parent

needs_other_user = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="playing another local user needs root and setpriv (util-linux)")

# a Flower App whose ServerApp leaves a mark: proof that the submitter's code ran, and as whom
EVIL_APP = '''
import os
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid, context):
    with open(os.path.join({marks!r}, "ran-as-uid-%d" % os.getuid()), "w") as fh:
        fh.write("pwned")
'''

EVIL_PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "evil"
version = "1.0.0"
description = "a stranger's app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "evil:app"
clientapp = "evil:client"
'''


_START_TIMES: dict[int, int] = {}  # pid -> start time when a test saw it (cleanup never hits a reused PID)


def _seen(pids: list[int]) -> set[int]:
    """``pids``, noted with their start times for ``_kill_all``."""
    from fedsim.engine.processes import start_time

    for pid in pids:
        if (started := start_time(pid)) is not None:
            _START_TIMES[pid] = started
    return set(pids)


def _kill_all(pids: set[int] | list[int]) -> None:
    """SIGKILL to ``pids``, except a PID noted by ``_seen`` that now belongs to another process."""
    from fedsim.engine.processes import start_time

    for pid in pids:
        if pid in _START_TIMES and start_time(pid) != _START_TIMES[pid]:
            continue
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class Stranger:
    """Files of another local user (uid 65534): a home with a Flower connection, its app, a folder for marks."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fedsim-stranger-"))
        self.home = self.dir / "home"
        self.app = self.dir / "app"
        self.marks = self.dir / "marks"
        for folder in (self.home, self.app, self.marks):
            folder.mkdir()
        (self.app / "evil.py").write_text(EVIL_APP.format(marks=str(self.marks)))
        (self.app / "pyproject.toml").write_text(EVIL_PYPROJECT)
        for path in [self.dir, *self.dir.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)

    def connect_to(self, address: str) -> None:
        config = self.home / "config.toml"
        config.write_text(f'[superlink]\ndefault = "victim"\n\n[superlink.victim]\naddress = "{address}"\n'
                          'insecure = true\n')
        os.chown(config, NOBODY, NOBODY)

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(self.home), "FLWR_HOME": str(self.home),
                "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "LANG": "C.UTF-8", **extra}

    def run(self, args: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args],
                              cwd=self.dir, env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def marks_left(self) -> list[str]:
        return sorted(p.name for p in self.marks.iterdir())

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


PROBE = r'''
import json, socket, sys
routes = json.loads(sys.argv[1])
for address, path in routes.items():
    host, port = address.rsplit(":", 1)
    results = []
    for what, family, target in (("unix", socket.AF_UNIX, path), ("tcp", socket.AF_INET, (host, int(port)))):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(target)
            results.append(f"{what} connect: connected")
        except OSError as exc:
            results.append(f"{what} connect: {type(exc).__name__}")
        finally:
            s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, int(port)))
        s.listen()
        results.append("tcp listen: listening")
    except OSError as exc:
        results.append(f"tcp listen: {type(exc).__name__}")
    finally:
        s.close()
    print(address, "|", "; ".join(results))
'''


ROUTED_HEALTH = r'''
import sys
import httpx
from fedsim.deploy import socket_routes
routed = "routed" if socket_routes() and getattr(httpx.HTTPTransport.handle_request, "_fedsim_routed", False) else "not routed"
try:
    print(f"{routed}: {httpx.get(sys.argv[1], timeout=10).status_code}")
except httpx.HTTPError as exc:
    print(f"{routed}: {type(exc).__name__}: {exc}")
'''


@needs_other_user
def test_another_local_user_cannot_reach_or_submit_to_a_deploy_federation(tmp_path):
    """uid 65534 tries what the issue did (``flwr run APP victim`` at the address in ``ps``), then with all of
    fedsim's knowledge (the socket paths and fedsim's own socket routing): every attempt is refused, no run
    exists, no mark was left; the owner reaches the same SuperLink."""
    from fedsim.deploy import SITECUSTOMIZE, SOCKETS_ENV, LocalFederation, http_get_unix

    stranger = Stranger()
    federation = LocalFederation(1, workdir=tmp_path)
    try:
        with federation:
            stranger.connect_to(federation.address)
            # 1. the address on the command lines: nothing listens there
            plain = stranger.run([str(BIN / "flwr"), "run", str(stranger.app), "victim"])
            assert plain.returncode != 0, plain.stdout + plain.stderr
            # 2. the unix sockets, the TCP ports and listening in their place
            probe = stranger.run([sys.executable, "-c", PROBE, json.dumps(federation.routes)], timeout=60)
            assert probe.returncode == 0, probe.stderr
            lines = probe.stdout.strip().splitlines()
            assert len(lines) == 2, probe.stdout  # the SuperLink and the SuperNode
            for line in lines:
                assert line.split(" | ")[1] == ("unix connect: PermissionError; tcp connect: ConnectionRefusedError; "
                                                "tcp listen: OSError"), probe.stdout
            # 3. flwr run with fedsim's routing through the same socket paths (a copy of its sitecustomize)
            site = stranger.dir / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
            os.chown(site, NOBODY, NOBODY)
            os.chown(site / "sitecustomize.py", NOBODY, NOBODY)
            routing = {"PYTHONPATH": str(site), SOCKETS_ENV: json.dumps(federation.routes)}
            routed = stranger.run([str(BIN / "flwr"), "run", str(stranger.app), "victim"], **routing)
            assert routed.returncode != 0, routed.stdout + routed.stderr
            assert "Connection to the SuperLink is unavailable" in routed.stderr, routed.stdout + routed.stderr
            # ... and why: the request did go to the socket (the routing was on) and the kernel refused it
            health = [sys.executable, "-c", ROUTED_HEALTH, f"http://{federation.address}/health"]
            refused = stranger.run(health, timeout=60, **routing)
            assert refused.stdout.strip() == "routed: ConnectError: [Errno 13] Permission denied", \
                refused.stdout + refused.stderr

            # the owner, the same way: it answers; and the SuperLink holds no run
            owner = subprocess.run(health, env=dict(os.environ, **routing), capture_output=True, text=True, timeout=60)
            assert owner.stdout.strip() == "routed: 200", owner.stdout + owner.stderr
            assert http_get_unix(federation.routes[federation.address], "/health") == 200
            runs = subprocess.run([str(BIN / "flwr"), "ls", "fedsim-local", "--format", "json"],
                                  env=federation._env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert runs.returncode == 0, runs.stdout + runs.stderr
            listed = json.loads(runs.stdout)
            assert listed.get("success", True) and not listed.get("runs"), runs.stdout
            time.sleep(2)  # a ServerApp started by a submission would have left its mark by now
            assert stranger.marks_left() == []
            assert "StartRun" not in federation.log_tail("superlink", 400)
        assert not federation.alive()
    finally:
        _kill_all(federation.alive())
        stranger.remove()


@needs_other_user
def test_the_stranger_harness_does_run_code_on_an_unprotected_superlink(tmp_path):
    """Control for the test above: the same stranger, against a SuperLink started as fedsim 0.1 did
    (``--insecure`` on a TCP port), gets its ServerApp run as root (the issue's finding) -- so a refusal above is
    the protection, not a broken harness."""
    from fedsim.deploy import free_port
    from fedsim.engine.processes import descendants

    stranger = Stranger()
    home = Path(tempfile.mkdtemp(prefix="fedsim-control-"))
    port = free_port()
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    link = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                             "--disable-runtime-dependency-installation"], env=env, cwd=home,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[int] = {link.pid}
    try:
        stranger.connect_to(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        submitted = None
        while time.monotonic() < deadline:  # until the SuperLink answers
            submitted = stranger.run([str(BIN / "flwr"), "run", str(stranger.app), "victim"])
            if submitted.returncode == 0:
                break
            time.sleep(1)
        assert submitted is not None and submitted.returncode == 0, submitted.stdout + submitted.stderr
        while time.monotonic() < deadline + 120 and not stranger.marks_left():
            seen |= _seen(descendants(link.pid))
            time.sleep(0.5)
        assert stranger.marks_left() == ["ran-as-uid-0"]
    finally:
        seen |= _seen(descendants(link.pid))
        _kill_all(seen)
        link.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
        stranger.remove()


# ------------------------------------------------------------------------------------------ dying with fedsim
PARENT = r'''
import os, subprocess, sys, time
from fedsim.engine.processes import Watchdog, die_with_parent

watchdog = Watchdog(interval=0.2)
env = dict(os.environ, **watchdog.env)
# a child that starts two grandchildren in sessions of their own, one with the token, one without any environment
child = subprocess.Popen([sys.executable, "-c", """
import subprocess, sys, time
a = subprocess.Popen(["sleep", "1000"], start_new_session=True)
b = subprocess.Popen(["sleep", "1001"], start_new_session=True, env={})
print(a.pid, b.pid, flush=True)
time.sleep(1000)
"""], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_parent())
watchdog.watch(child.pid)
grandchildren = child.stdout.readline().split()
print(watchdog.pid, child.pid, *grandchildren, flush=True)
time.sleep(1000)
'''


def test_kill_9_takes_children_and_grandchildren_along():
    """``die_with_parent`` (direct child) and ``Watchdog`` (grandchildren in their own sessions: the one that
    inherited the token, and the one without any environment, found as a descendant of a watched PID)."""
    from fedsim.engine.processes import alive, wait_gone

    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 4 and all(alive(p) for p in pids), pids
        time.sleep(1.5)  # the watchdog collects the watched PID's descendants every 0.2 s
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        assert wait_gone(pids, 30, poll=0.1) == []
    finally:
        _kill_all([parent.pid, *pids])


def test_deferred_signals_handles_a_signal_after_the_block():
    from fedsim.engine.processes import deferred_signals

    handled: list[str] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handled.append("handled"))
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            handled.append("block ended")
        assert handled == ["block ended", "handled"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# a long FedAvg run on a small slice: still training when the test kills it
KILL_SCENARIO = """
seed = 0
rounds = 200
[data]
name = "fashion-mnist"
max_train = 600
max_test = 100
[partition]
kind = "iid"
num_clients = 2
[model]
name = "mlp"
[client]
epochs = 1
[simulation]
num_cpus = 1
[strategy]
name = "fedavg"
"""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def test_kill_9_of_fedsim_deploy_leaves_no_process_and_no_files(tmp_path):
    """``kill -9`` of ``fedsim deploy`` mid-run: the SuperLink, the SuperNodes, their SuperExecs, the ServerApp,
    the ClientApps and ``flwr run`` (every PID seen below it before the kill) are gone within 30 s, and so is
    its temporary FLWR_HOME with the sockets."""
    from fedsim.engine.processes import alive, descendants

    scenario = tmp_path / "s.toml"
    scenario.write_text(KILL_SCENARIO)
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "deploy", str(scenario), "--nodes", "2", "--out",
                             str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    seen: set[int] = set()
    homes: set[str] = set()  # the federation's FLWR_HOME, as its processes have it
    try:
        deadline = time.monotonic() + 300
        want = {"flower-supernode": 2, "flower-superlink": 1, "flwr run": 1, "flwr-serverapp": 1,
                "flwr-clientapp": 1}
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            below = descendants(proc.pid)
            seen |= _seen(below)
            lines = [_cmdline(p) for p in below]
            counts = {name: sum(name in line for line in lines) for name in want}
            homes |= {home for p in below if (home := _environ(p).get("FLWR_HOME"))}
            if all(counts[name] >= n for name, n in want.items()):
                break
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail(f"the federation and a training round did not start within 300 s: {counts}")
        seen |= _seen(descendants(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (any(alive(p) for p in seen) or any(Path(h).exists() for h in homes)):
            time.sleep(0.2)
        survivors = {p: _cmdline(p) for p in seen if alive(p)}
        assert survivors == {}
        assert len(homes) == 1 and "fedsim-flwr-" in next(iter(homes)), homes
        assert not Path(next(iter(homes))).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(seen)
        proc.stderr.close()


def test_sigterm_during_start_up_leaves_no_process(tmp_path):
    """SIGTERM at three moments of start-up (the SuperLink just started, the first SuperNode just started, ``flwr
    run`` just started): exit 143, and no process of that federation (by PID seen, and by its FLWR_HOME in the
    environment: also those the test never saw) is left 30 s later."""
    from fedsim.engine.processes import alive, descendants, with_env

    scenario = tmp_path / "s.toml"
    scenario.write_text(KILL_SCENARIO)
    for stage in ("flower-superlink", "flower-supernode", "flwr run"):
        proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "deploy", str(scenario), "--nodes", "2",
                                 "--out", str(tmp_path / f"out-{len(stage)}")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        seen: set[int] = set()
        homes: set[str] = set()
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                below = descendants(proc.pid)
                seen |= _seen(below)
                homes |= {home for p in below if (home := _environ(p).get("FLWR_HOME"))}
                if any(stage in _cmdline(p) for p in below):
                    break
                assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
                time.sleep(0.02)
            else:
                pytest.fail(f"{stage} did not start within 300 s")
            os.kill(proc.pid, signal.SIGTERM)
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= _seen(descendants(proc.pid))
                time.sleep(0.05)
            err = proc.stderr.read().decode(errors="replace")
            assert proc.wait(timeout=60) == 143, (stage, err[-3000:])
            assert len(homes) == 1, (stage, homes)
            home = next(iter(homes))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (any(alive(p) for p in seen) or with_env("FLWR_HOME", home)):
                time.sleep(0.2)
            assert {p: _cmdline(p) for p in seen if alive(p)} == {}, stage
            assert with_env("FLWR_HOME", home) == [], stage
            assert not Path(home).exists(), stage
        finally:
            if proc.poll() is None:
                proc.kill()
            _kill_all(seen)
            proc.stderr.close()
