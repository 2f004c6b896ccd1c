"""Issue #23, Ray's side doors: fedsim's private Ray starts no dashboard process (Ray's UsageStatsHead probes cloud
metadata), keeps its files in a private 0700 folder that another user can neither list nor connect into, and a
signal while Ray starts or runs ends the run as interrupted with every Ray process gone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import AFL_DIGITS, subprocess_env

from fedsim.engine.processes import alive, descendants, wait_gone

ROOT = Path(__file__).resolve().parents[1]
RAY_AFL = AFL_DIGITS.replace('backend = "inline"', 'backend = "ray"')
FEDSIM = [sys.executable, "-c", "import sys; from fedsim.cli import main; sys.exit(main())"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# a fresh process runs fedsim run in a thread-free way and, from a poller thread, records what runs below it and
# what the private Ray's temp dir looks like while Ray is up
PROBE = textwrap.dedent("""
    import json, os, stat, sys, threading, time
    from fedsim.engine import ray_session
    from fedsim.engine.processes import descendants
    seen, dirs = {}, {}
    def poll():
        while True:
            for pid in descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        seen[pid] = fh.read().replace(b"\\0", b" ").decode(errors="replace")
                except OSError:
                    pass
            path = ray_session.temp_dir()
            if path and path not in dirs and os.path.isdir(path):
                sockets = []
                for root, _, files in os.walk(path):
                    sockets += [os.path.join(root, f) for f in files
                                if stat.S_ISSOCK(os.lstat(os.path.join(root, f)).st_mode)]
                # pause for the probes only once the raylet is seen: a short run may end meanwhile
                if sockets and any("raylet" in c for c in seen.values()):
                    st = os.stat(path)
                    dirs[path] = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "sockets": sockets}
                    print("TEMPDIR " + json.dumps({"path": path, **dirs[path]}), flush=True)
                    sys.stdin.readline()  # the test probes as another user meanwhile
            time.sleep(0.2)
    threading.Thread(target=poll, daemon=True).start()
    from fedsim.cli import main
    rc = main(sys.argv[1:])
    print("RESULT " + json.dumps({"rc": rc, "seen": seen, "dirs": dirs}), flush=True)
""")


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _as_nobody(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def _setpriv_works() -> bool:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        return False
    out = subprocess.run([*NOBODY, "id", "-u"], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "65534"


@pytest.mark.ray
def test_private_ray_has_no_dashboard_and_a_private_temp_dir_gone_after_the_run(tmp_path):
    """During a fedsim run on Ray: no process runs Ray's dashboard head (dashboard.py: its UsageStatsHead sends
    cloud-metadata requests); Ray's temp dir is 0700, owned by the user, and (as root) uid 65534 can neither list
    it nor connect to its sockets; after the run it is gone and so is every process that ran below fedsim."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(RAY_AFL)
    env = subprocess_env(tmp_path)
    env.pop("RAY_TMPDIR", None)
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "run", str(scenario), "--out", str(tmp_path / "run"),
                             "--quiet"], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids: set[int] = set()
    try:
        probed = None
        result = None
        for line in proc.stdout:
            if line.startswith("TEMPDIR "):
                info = json.loads(line[len("TEMPDIR "):])
                pids |= set(descendants(proc.pid))
                if _setpriv_works():
                    listing = _as_nobody(f"import os; os.listdir({info['path']!r})")
                    sock = info["sockets"][0]
                    connect = _as_nobody(f"import socket; socket.socket(socket.AF_UNIX).connect({sock!r})")
                    probed = {"list": (listing.returncode, listing.stderr), "connect": (connect.returncode,
                                                                                       connect.stderr)}
                proc.stdin.write("\n")
                proc.stdin.flush()
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        proc.wait(300)
        stderr = proc.stderr.read()
        assert result is not None, stderr[-3000:]
        assert result["rc"] == 0, stderr[-3000:]
        pids |= {int(p) for p in result["seen"]}
        cmdlines = list(result["seen"].values())
        assert any("raylet" in c for c in cmdlines), cmdlines  # Ray ran below fedsim ...
        assert not [c for c in cmdlines if "dashboard/dashboard.py" in c], cmdlines  # ... without a dashboard head
        assert len(result["dirs"]) == 1, result["dirs"]
        (path, info), = result["dirs"].items()
        assert info["mode"] == 0o700 and info["uid"] == os.getuid(), info
        assert len(max(info["sockets"], key=len).encode()) <= 107
        assert not path.startswith("/tmp/ray/") and path != "/tmp/ray"
        assert not os.path.exists(path)  # removed at the end
        if probed is not None:
            assert probed["list"][0] != 0 and "PermissionError" in probed["list"][1], probed
            assert probed["connect"][0] != 0 and "PermissionError" in probed["connect"][1], probed
        assert not wait_gone(pids, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        _kill_all(pids | set(descendants(proc.pid)))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (apt-get install strace)")
def test_a_ray_run_sends_no_cloud_metadata_request(tmp_path):
    """A tiny Ray scenario under ``strace -f -e trace=connect,sendto``: no connect to 169.254.169.254 and no
    ``metadata.google.internal`` in anything sent (a DNS query carries it as labels: ``metadata``, ``google``)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(RAY_AFL)
    trace = tmp_path / "trace.txt"
    probe = subprocess.run(["strace", "-f", "-qq", "-o", str(tmp_path / "probe.txt"), "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode()[-300:]}")
    proc = subprocess.Popen(["strace", "-f", "-qq", "-s", "512", "-e", "trace=connect,sendto", "-o", str(trace),
                             *FEDSIM, "run", str(scenario), "--out", str(tmp_path / "run"),
                             "--quiet"], cwd=ROOT, env=subprocess_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids: set[int] = set()
    try:
        while proc.poll() is None:
            pids |= set(descendants(proc.pid))
            time.sleep(0.3)
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-3000:]
        text = trace.read_text(errors="replace")
        assert "connect(" in text  # strace saw the run's connections (Ray's own, on loopback)
        assert "169.254.169.254" not in text
        assert "metadata.google.internal" not in text
        assert "metadata\\6google" not in text and "\\10metadata" not in text  # DNS labels as strace prints them
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        _kill_all(pids)


def _start_and_signal(tmp_path: Path, sig: int, when: str, *, group: bool = False) -> dict:
    """``fedsim run`` (Ray) in a fresh process; ``sig`` once ``when`` happens ("ray-starting": the first Ray process
    appears below it, "running": a ClientAppActor runs). What happened, and every PID seen below it."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(RAY_AFL)
    out = tmp_path / "run"
    proc = subprocess.Popen([*FEDSIM, "run", str(scenario), "--out", str(out), "--quiet"],
                            cwd=ROOT, env=subprocess_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=group)
    seen: set[int] = set()
    temp_dirs: set[str] = set()
    sent = False
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            below = set(descendants(proc.pid))
            seen |= below
            names = []
            for pid in below:
                try:
                    names.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
                except OSError:
                    pass
            temp_dirs |= set(re.findall(r"(/[^\0 =]*/fedsim-ray-[A-Za-z0-9_]+)", "\n".join(names)))
            if not sent:
                ready = (any("gcs_server" in n for n in names) if when == "ray-starting"
                         else any("ClientAppActor" in n for n in names))
                if ready:
                    if group:
                        os.killpg(proc.pid, sig)
                    else:
                        os.kill(proc.pid, sig)
                    sent = True
            time.sleep(0.05 if not sent else 0.2)
        assert sent, "the moment to signal never came"
        stdout, stderr = proc.communicate(timeout=120)
        summary_file = out / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        left = wait_gone(seen, 15)
        return {"rc": proc.returncode, "stderr": stderr, "summary": summary, "left": left, "seen": seen,
                "out": out, "temp_dirs": temp_dirs}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        _kill_all(seen | set(descendants(proc.pid)))


def _assert_interrupted(result: dict, code: int) -> None:
    assert result["rc"] == code, result["stderr"][-3000:]
    assert "SystemExit" not in result["stderr"], result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]  # Ray's autoscaler printed some
    if result["summary"] is not None:
        assert result["summary"]["status"] == "interrupted", result["summary"]
        assert "failed" not in json.dumps(result["summary"]).lower() or result["summary"].get("error") is None
    else:  # no run directory yet: the message must not claim one
        assert "summary.json: status interrupted" not in result["stderr"], result["stderr"][-3000:]
    assert not result["left"], f"Ray processes left running: {result['left']}"
    assert result["temp_dirs"], "the private Ray's temp dir was not seen"
    assert not [d for d in result["temp_dirs"] if os.path.exists(d)], result["temp_dirs"]  # removed on the signal
    assert not list(Path("/tmp").glob(f"fedsim-ray-*/session_*_{result.get('pid', 'x')}"))


@pytest.mark.ray
def test_sigterm_while_ray_is_starting_exits_143_interrupted_and_leaves_nothing(tmp_path):
    result = _start_and_signal(tmp_path, signal.SIGTERM, "ray-starting")
    _assert_interrupted(result, 143)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_mid_run_leaves_no_ray_process(tmp_path, sig):
    """Ctrl-C in a terminal, ``timeout``, Slurm: the signal reaches the raylet too, whose agents were re-parented to
    init and lived on for 60-150 s; now fedsim is their subreaper and stops them."""
    result = _start_and_signal(tmp_path, sig, "running", group=True)
    _assert_interrupted(result, 128 + sig)


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_mid_run_leaves_no_ray_process(tmp_path):
    result = _start_and_signal(tmp_path, signal.SIGTERM, "running")
    _assert_interrupted(result, 143)


def test_a_join_refused_for_its_token_says_what_to_set():
    from fedsim.engine.ray_session import join_error

    class AuthenticationError(Exception):
        pass

    error = join_error("10.0.0.1:6379", AuthenticationError("Authentication failed. For remote clusters, ensure that "
                                                            "the token is propagated to all nodes of the cluster"))
    assert error is not None
    assert "simulation.ray_address" in str(error) and "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in str(error)
    assert "disabled" in str(error)
    plain = join_error("10.0.0.1:6379", ConnectionError("refused"))
    assert plain is not None and "RAY_AUTH" not in str(plain)
    assert join_error("10.0.0.1:6379", KeyError("x")) is None


@pytest.mark.ray
@pytest.mark.slow
def test_a_cluster_started_without_token_auth_is_joined(tmp_path):
    """``ray start --head`` without token authentication (Ray's default): ``simulation.ray_address`` joins it (fedsim
    no longer turns token authentication on for a cluster it did not start)."""
    from fedsim.deploy import free_port

    port = free_port()
    env = subprocess_env(tmp_path, RAY_TMPDIR=str(tmp_path / "r") if len(str(tmp_path)) < 40 else "/tmp")
    (tmp_path / "r").mkdir()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    members: set[int] = set()
    try:
        scenario = tmp_path / "s.toml"
        scenario.write_text(RAY_AFL)
        code = textwrap.dedent(f"""
            import json
            from fedsim.config import load_scenarios
            from fedsim.engine.ray_session import auth_mode, ensure_ray, ray_session
            config = load_scenarios({str(scenario)!r}, ["simulation.ray_address='127.0.0.1:{port}'"])[0][1]
            with ray_session():
                ensure_ray(config)
                import ray
                print("RESULT " + json.dumps({{"nodes": len(ray.nodes()), "auth": auth_mode()}}))
        """)
        deadline = time.monotonic() + 120
        out = None
        while time.monotonic() < deadline:
            members |= set(descendants(head.pid))
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=240)
            if "RESULT " in out.stdout or "cannot reach" not in out.stderr:
                break
            time.sleep(2)  # the head is still starting
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, out.stderr[-3000:]
        seen = json.loads(lines[-1][len("RESULT "):])
        assert seen == {"nodes": 1, "auth": "disabled"}, seen
    finally:
        members |= set(descendants(head.pid)) | {head.pid}
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        _kill_all(set(wait_gone(members, 15)))


@pytest.mark.ray
def test_joining_a_cluster_that_never_answers_fails_within_the_stated_time(tmp_path):
    """A GCS address that accepts TCP connections and never answers (preflight's reachability check passes): the
    join gives up after ``RAY_JOIN_TIMEOUT`` (15 s here) with a ConfigError saying what to check."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(RAY_AFL)
    code = textwrap.dedent(f"""
        import json, socket, threading, time
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        held = []
        threading.Thread(target=lambda: [held.append(srv.accept()) for _ in iter(int, 1)], daemon=True).start()
        from fedsim.config import load_scenarios
        from fedsim.engine import ray_session
        from fedsim.errors import ConfigError
        ray_session.RAY_JOIN_TIMEOUT = 15.0
        config = load_scenarios({str(scenario)!r}, [f"simulation.ray_address='127.0.0.1:{{port}}'"])[0][1]
        start = time.monotonic()
        try:
            with ray_session.ray_session():
                ray_session.ensure_ray(config)
            result = {{"error": None}}
        except ConfigError as exc:
            result = {{"error": str(exc)}}
        result["seconds"] = time.monotonic() - start
        print("RESULT " + json.dumps(result), flush=True)
        import os
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(tmp_path), capture_output=True,
                         text=True, timeout=180)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["error"] and "within 15 s" in result["error"] and "check that the cluster" in result["error"]
    assert result["seconds"] < 60, result
