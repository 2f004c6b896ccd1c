"""One private Ray per ``fedsim run`` (fedsim.engine.ray_session): started once for all variants, token
authentication on, node IP 127.0.0.1, never a cluster someone else started, nothing left running afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import AFL_DIGITS, subprocess_env

from fedsim.deploy import free_port
from fedsim.engine.ray_session import DIRECT_CALL_BYTES, PRIVATE_SYSTEM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")

THREE_VARIANTS = AFL_DIGITS.replace('backend = "inline"', 'backend = "ray"') + """\
[[variants]]
label = "a"
[[variants]]
label = "b"
set = { "strategy.gamma" = 0.5 }
[[variants]]
label = "c"
set = { "strategy.gamma" = 2.0 }
"""

# the command run in a fresh process; afterwards it reports what the engine saw
DRIVER = textwrap.dedent("""
    import json, os, sys
    pythonpath = os.environ.get("PYTHONPATH")
    from fedsim.cli import main
    from fedsim.engine import ray_session
    rc = main(sys.argv[1:])
    ray = sys.modules.get("ray")
    print("RESULT " + json.dumps({"rc": rc, "starts": ray_session.STATS["starts"], "auth": ray_session.auth_mode(),
                                   "initialized": bool(ray and ray.is_initialized()),
                                   "pythonpath_unchanged": os.environ.get("PYTHONPATH") == pythonpath}))
""")


_SHORT_DIRS: list[str] = []


@pytest.fixture(autouse=True)
def _remove_short_dirs():
    yield
    while _SHORT_DIRS:
        shutil.rmtree(_SHORT_DIRS.pop(), ignore_errors=True)


def _env(tmp_path: Path) -> dict[str, str]:
    """A fresh process's environment: HOME in tmp_path, Ray's files in a short folder (socket paths <= 107 bytes)."""
    _SHORT_DIRS.append(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    return subprocess_env(tmp_path, RAY_TMPDIR=_SHORT_DIRS[-1])


def _script_result(tmp_path: Path, code: str) -> dict:
    """Run ``code`` in a fresh process on the one-variant scenario (its path is argv[1], ``tmp_path`` argv[2]);
    its RESULT line."""
    (tmp_path / "s.toml").write_text(THREE_VARIANTS.split("[[variants]]")[0])
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.toml"), str(tmp_path)], cwd=ROOT,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_driver(tmp_path: Path, scenario: Path, out: Path) -> tuple[dict, set[int]]:
    """Run ``fedsim run`` in a fresh process; its result and every process that ever ran below it (polled)."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "run", str(scenario), "--out", str(out), "--quiet"],
                            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    while proc.poll() is None:
        seen |= _descendants(proc.pid)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["rc"] == 0, stderr[-3000:]
    return result, seen


@pytest.mark.ray
def test_three_variants_start_ray_once_and_leave_nothing_running(tmp_path):
    scenario = tmp_path / "three.toml"
    scenario.write_text(THREE_VARIANTS)
    result, seen = _run_driver(tmp_path, scenario, tmp_path / "run")
    assert result["rc"] == 0
    assert result["starts"] == 1  # one Ray for the three variants
    assert result["auth"] == "token"  # Ray's token authentication on the private instance
    assert not result["initialized"]  # shut down at the end of the command
    assert result["pythonpath_unchanged"]  # the workers' PYTHONPATH went through runtime_env only
    assert seen, "Ray's processes were not seen"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.2)
    assert not [p for p in seen if _alive(p)]
    for label in "abc":
        summary = json.loads((tmp_path / "run" / label / "summary.json").read_text())
        assert summary["status"] == "completed"


@pytest.mark.ray
def test_a_plain_run_does_not_join_a_cluster_started_with_ray_start(tmp_path):
    port = free_port()
    env = _env(tmp_path)
    stranger = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert stranger.poll() is None, "ray start failed"
            time.sleep(0.5)
        else:
            pytest.fail("the ray start cluster did not come up")
        code = textwrap.dedent(f"""
            import json, sys
            from fedsim.config import load_scenarios
            from fedsim.engine.ray_session import ensure_ray, ray_session
            config = load_scenarios({str(tmp_path / 's.toml')!r})[0][1]
            with ray_session():
                ensure_ray(config)
                import ray
                ctx = ray.get_runtime_context()
                import subprocess
                gcs = ray._private.worker._global_node.all_processes["gcs_server"][0].process.pid
                import shutil
                ports = None  # without ss, not checked
                if shutil.which("ss"):
                    ss = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout
                    ports = [ln.split()[3] for ln in ss.splitlines() if f"pid={{gcs}}," in ln]
                system = ray._private.worker._global_node._ray_params._system_config or {{}}
                print("RESULT " + json.dumps({{"gcs": ctx.gcs_address, "nodes": len(ray.nodes()), "listen": ports,
                                              "direct": system.get("max_direct_call_object_size"),
                                              "system": system}}))
        """)
        (tmp_path / "s.toml").write_text(THREE_VARIANTS.split("[[variants]]")[0])
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, out.stderr[-3000:]
        seen = json.loads(lines[-1][len("RESULT "):])
        assert not seen["gcs"].endswith(f":{port}")  # its own Ray, not the stranger's
        assert seen["nodes"] == 1
        assert seen["direct"] == DIRECT_CALL_BYTES  # a model per client travels in the call, not via the raylet
        assert PRIVATE_SYSTEM_CONFIG.items() <= seen["system"].items()  # no per-task events, loop stats, metrics
        assert seen["system"]["task_events_report_interval_ms"] == 0 and not seen["system"]["enable_metrics_collection"]
        assert seen["gcs"].startswith("127.0.0.1:")  # node IP 127.0.0.1 ...
        assert seen["listen"] is None or seen["listen"] and all("127.0.0.1" in a for a in seen["listen"])  # ... GCS on loopback only
    finally:
        members = _descendants(stranger.pid) | {stranger.pid}
        os.killpg(stranger.pid, signal.SIGTERM)
        try:
            stranger.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(stranger.pid, signal.SIGKILL)
            stranger.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in members):
            time.sleep(0.2)
        for pid in members:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not [p for p in members if _alive(p)]


PRESTARTED = textwrap.dedent("""
    import json, os, sys, time
    os.environ["PYTHONPATH"] = "/before/fedsim"
    from fedsim.config import load_scenarios
    from fedsim.engine.processes import descendants
    from fedsim.engine.ray_session import ensure_ray, ray_session
    config = load_scenarios(sys.argv[1])[0][1]
    with ray_session():
        ensure_ray(config)
        import ray
        after = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_AUTH_TOKEN")}
        def workers():  # Ray's idle workers below this driver
            idle = set()
            for pid in descendants(os.getpid()):
                try:
                    if open(f"/proc/{pid}/comm").read().startswith("ray::IDLE"):
                        idle.add(pid)
                except OSError:  # gone meanwhile
                    pass
            return idle
        deadline = time.monotonic() + 60
        while len(workers()) < 2 and time.monotonic() < deadline:  # Ray prestarts one per CPU for the driver
            time.sleep(0.1)
        prestarted = workers()
        below = {}  # what ran below the driver meanwhile, to explain a run where Ray prestarted none
        for pid in descendants(os.getpid()):
            try:
                below[pid] = open(f"/proc/{pid}/comm").read().strip()
            except OSError:
                pass
        waited = round(60 - (deadline - time.monotonic()), 1)

        @ray.remote(num_cpus=1)
        class Probe:
            def where(self):
                return os.getpid(), os.environ.get("PYTHONPATH", "")

        probes = [Probe.remote() for _ in range(2)]
        seen = ray.get([p.where.remote() for p in probes])
        print("RESULT " + json.dumps({"prestarted": sorted(prestarted), "actors": sorted(s[0] for s in seen),
                                      "paths": [s[1] for s in seen], "sys_path": sys.path, "after": after,
                                      "below": below, "waited_s": waited}))
""")


@pytest.mark.ray
def test_the_actors_run_in_the_workers_ray_prestarted_and_see_the_drivers_path(tmp_path):
    """The private Ray takes the workers' PYTHONPATH from the environment it starts in, not from a runtime env:
    the two workers Ray prestarts for the driver become the actors (no fresh process per actor), each actor's
    PYTHONPATH is the driver's sys.path and its own PYTHONPATH, and the driver's environment is as before."""
    seen = _script_result(tmp_path, PRESTARTED)
    assert len(seen["prestarted"]) >= 2, {k: seen[k] for k in ("below", "waited_s", "actors")}
    assert set(seen["actors"]) <= set(seen["prestarted"]), seen
    for path in seen["paths"]:
        entries = path.split(os.pathsep)
        assert entries[:len(seen["sys_path"])] == seen["sys_path"] and "/before/fedsim" in entries
    assert seen["after"] == {"PYTHONPATH": "/before/fedsim", "RAY_AUTH_TOKEN": None}


MULTINODE = textwrap.dedent("""
    import json, sys
    import pandas as pd
    import torch
    from ray.cluster_utils import Cluster
    from fedsim.config import load_scenarios
    from fedsim.engine.runner import run_scenario
    out = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    result = {}
    try:
        for name in ("afl", "fedavg"):
            runs = {}
            for where, sets in (("cluster", [f"simulation.ray_address={cluster.address!r}",
                                             "simulation.backend='ray'"]),
                                ("single", ["simulation.backend='inline'"])):
                rounds = ["rounds=1"] if name == "afl" else []
                config = load_scenarios(sys.argv[2], [f"strategy.name={name!r}"] + rounds + sets)[0][1]
                summary = run_scenario(config, f"{out}/{name}-{where}", show_progress=False)
                model = torch.load(f"{out}/{name}-{where}/model.pt", weights_only=False)
                metrics = pd.read_csv(f"{out}/{name}-{where}/metrics.csv")
                runs[where] = (summary, model.state_dict(), metrics)
            (s1, w1, m1), (s2, w2, m2) = runs["cluster"], runs["single"]
            placement = pd.read_csv(f"{out}/{name}-cluster/nodes.csv", dtype=str).fillna("")
            result[name] = {
                "ray_nodes": s1.get("ray_nodes"),
                "placed_on": len({n for cell in placement["ray_nodes"] for n in cell.split(";") if n}),
                "placed_clients": sorted(int(c) for c in placement["client"]),
                "max_weight_diff": max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1),
                "accuracy": [list(m1["accuracy"]), list(m2["accuracy"])],
                "bytes": [s1["bytes_up"], s2["bytes_up"]],
            }
    finally:
        cluster.shutdown()
    print("RESULT " + json.dumps(result))
""")

MULTINODE_SCENARIO = """
seed = 0
rounds = 2
[data]
name = "digits"
[partition]
kind = "iid"
num_clients = 4
[model]
name = "cnn"
width = 8
feature_map = "random"
feature_dim = 32
[client]
epochs = 1
lr = 0.05
[simulation]
num_cpus = 1
[strategy]
name = "afl"
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_node_cluster_serves_clients_on_both_nodes_with_single_node_results(tmp_path):
    """ray.cluster_utils.Cluster, two nodes of one CPU each on this machine; AFL and FedAvg joined to it
    (simulation.ray_address) equal the single-process run (inline engine, same partition and seed)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(MULTINODE_SCENARIO)
    env = _env(tmp_path)
    out = subprocess.run([sys.executable, "-c", MULTINODE, str(tmp_path / "runs"), str(scenario)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for name in ("afl", "fedavg"):
        assert result[name]["ray_nodes"] == 2, result  # clients ran on both nodes
        assert result[name]["placed_on"] == 2 and result[name]["placed_clients"] == [0, 1, 2, 3], result  # nodes.csv
        assert result[name]["bytes"][0] == result[name]["bytes"][1]
    assert result["afl"]["max_weight_diff"] <= 1e-9, result
    assert result["fedavg"]["accuracy"][0] == result["fedavg"]["accuracy"][1], result


def test_gpus_per_client_are_left_to_a_cluster_named_by_ray_address(tmp_path, monkeypatch):
    """Without a local GPU, num_gpus > 0 is refused for the private Ray, but not for a cluster named by RAY_ADDRESS
    (its nodes have GPUs of their own); no Ray is started either way."""
    from fedsim.config import load_scenarios
    from fedsim.engine.ray_backend import client_resources
    from fedsim.errors import ConfigError

    scenario = tmp_path / "s.toml"
    scenario.write_text(THREE_VARIANTS.split("[[variants]]")[0])
    config = load_scenarios(scenario, ["simulation.num_gpus=0.5"])[0][1]
    monkeypatch.setattr("fedsim.engine.ray_backend.gpu_count", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="simulation.num_gpus"):
        client_resources(config)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert client_resources(config) == {"num_cpus": 1.0, "num_gpus": 0.5}


LIGHT_ACTOR = textwrap.dedent("""
    import json, sys
    from fedsim.config import load_scenarios
    from fedsim.engine.ray_backend import _light_actors
    from fedsim.engine.ray_session import ensure_ray, ray_session
    config = load_scenarios(sys.argv[1])[0][1]
    with ray_session():
        ensure_ray(config)  # before anything imports Ray (its auth mode is read at import)
        import ray
        from flwr.clientapp.client_app import ClientAppException
        from flwr.server.superlink.fleet.vce.backend import raybackend
        flower_actor = raybackend.ClientAppActor
        with _light_actors():
            actor_class = raybackend.ClientAppActor
            actor = actor_class.options(num_cpus=1).remote()
        restored = raybackend.ClientAppActor is flower_actor

        def app(message, context):  # what the worker has imported when the first message arrives
            import sys
            heavy = ("flwr.simulation", "sqlalchemy", "fastapi", "flwr.cli")
            return {"heavy": sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)),
                    "message": message}

        def broken(message, context):
            raise RuntimeError("client failed: " + message)

        cid, reply, context = ray.get(actor.run.remote(lambda: app, "m1", "7", {"state": 1}))
        try:
            ray.get(actor.run.remote(lambda: broken, "m2", "8", {}))
            error = None
        except ClientAppException as ex:  # what Flower's engine catches and turns into an error reply
            error = str(ex)

        def probes(message, context):  # an exit handler, and an object only the interpreter's teardown frees
            import atexit, os, sys, types
            atexit.register(lambda: open(message + "/handler", "w").write("ran"))
            class Probe:
                def __init__(self, path, opener=open):
                    self.path, self.opener = path, opener
                def __del__(self):
                    with self.opener(self.path, "w") as f:
                        f.write("ran")
            module = types.ModuleType("fedsim_probe")
            module.probe = Probe(message + "/teardown")
            sys.modules["fedsim_probe"] = module
            return os.getpid()

        _, pid, _ = ray.get(actor.run.remote(lambda: probes, sys.argv[2], "9", {}))
        actor.terminate.remote()  # as Flower's pool ends a simulation
        import time
        from fedsim.engine.processes import alive
        deadline = time.time() + 60
        while alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        print("RESULT " + json.dumps({"class": actor_class.__module__, "restored": restored, "cid": cid,
                                      "reply": reply, "context": context, "error": error,
                                      "actor_gone": not alive(pid)}))
""")


@pytest.mark.ray
def test_the_actors_are_flowers_client_app_actor_without_flwr_simulation_in_the_worker(tmp_path):
    """Flower's Ray backend gets fedsim's NodeActor while a run is on (Flower's actor restored afterwards): it
    answers as Flower's does (cid, reply, context; a client's exception as ClientAppException) and its worker
    has not imported flwr.simulation, the link state's SQLAlchemy, FastAPI or flwr.cli; terminated, it runs its
    exit handlers and leaves without the interpreter's teardown."""
    seen = _script_result(tmp_path, LIGHT_ACTOR)
    assert seen["class"] == "fedsim.engine.ray_actor" and seen["restored"]
    # terminate: the actor's exit handlers run, the interpreter's teardown does not (exit_after_handlers)
    assert seen["actor_gone"] and (tmp_path / "handler").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()
    assert seen["cid"] == "7" and seen["context"] == {"state": 1}
    assert seen["reply"] == {"heavy": [], "message": "m1"}
    assert seen["error"] is not None and "client failed: m2" in seen["error"]


EARLY_RAY = textwrap.dedent("""
    import json, sys, warnings
    import ray  # as a plugin importing Ray at import time would: before fedsim starts its Ray
    from fedsim.config import load_scenarios
    from fedsim.engine.ray_session import auth_mode, ensure_ray, ray_session
    config = load_scenarios(sys.argv[1])[0][1]
    with warnings.catch_warnings(record=True) as caught, ray_session():
        warnings.simplefilter("always")
        ensure_ray(config)
        mode = auth_mode()
    print("RESULT " + json.dumps({"auth": mode, "warnings": [str(w.message) for w in caught
                                                            if issubclass(w.category, RuntimeWarning)]}))
""")


@pytest.mark.ray
def test_ray_imported_before_fedsim_starts_it_is_a_warning_that_says_what_to_set(tmp_path):
    """Ray reads RAY_AUTH_MODE at its first import: imported earlier, the private Ray has no token
    authentication, and fedsim says so (instead of running a reachable GCS silently)."""
    seen = _script_result(tmp_path, EARLY_RAY)
    assert seen["auth"] == "disabled"
    assert len(seen["warnings"]) == 1 and "WITHOUT token authentication" in seen["warnings"][0]
    assert "RAY_AUTH_MODE=token" in seen["warnings"][0]
