"""fedsim as a Flower App (``fedsim.flower_app``): run config, node config, ``flwr run`` in Flower's simulation
runtime, and the deployment engine on loopback (``fedsim.deploy``) against fedsim's own simulation."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedsim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

SMALL_AFL = """
seed = 0
rounds = 1
[data]
name = "fashion-mnist"
max_train = 2000
max_test = 500
[partition]
kind = "dirichlet"
num_clients = 6
alpha = 0.5
[model]
feature_map = "random"
feature_dim = 128
[simulation]
num_cpus = 1
[strategy]
name = "afl"
"""

# AFL and FedAvg on the same data and partition: one Flower run each on the deployment
AFL_AND_FEDAVG = SMALL_AFL + """
[[variants]]
label = "afl"
[[variants]]
label = "fedavg"
set = { "strategy.name" = "fedavg", "rounds" = 2, "model.name" = "mlp", "client.epochs" = 1 }
"""


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------- run config
def test_overrides_are_one_semicolon_separated_string():
    from fedsim.flower_app import split_overrides

    assert split_overrides("rounds=3;partition.alpha=0.5") == ["rounds=3", "partition.alpha=0.5"]
    assert split_overrides(" rounds=3 ; ;") == ["rounds=3"]
    assert split_overrides("") == []


def test_run_config_is_a_scenario_with_overrides(tmp_path, monkeypatch):
    from fedsim.flower_app import config_from_run_config

    monkeypatch.chdir(tmp_path)
    _write(tmp_path, SMALL_AFL)
    label, config = config_from_run_config({"scenario": "s.toml", "out": "", "set": "rounds=1;partition.alpha=0.3",
                                            "only": "", "nodes": 0})
    assert label is None and config.strategy.name == "afl" and config.partition.alpha == 0.3


def test_bad_run_configs_name_the_key(tmp_path, monkeypatch):
    from fedsim.flower_app import config_from_run_config

    monkeypatch.chdir(tmp_path)
    _write(tmp_path, SMALL_AFL)
    _write(tmp_path, AFL_AND_FEDAVG, "two.toml")
    cases = [
        ({"scenario": "s.toml", "rounds": 3}, "unknown key(s) rounds"),
        ({"scenario": ""}, "'scenario' is empty"),
        ({"scenario": "missing.toml"}, "scenario 'missing.toml' not found"),
        ({"scenario": str(tmp_path / "missing.toml")}, "does not exist"),
        ({"scenario": "two.toml"}, "has 2 variants (afl, fedavg)"),
        ({"scenario": "s.toml", "only": "other"}, "has no variants"),
        ({"scenario": "s.toml", "set": "partition.alpha=-1"}, "partition.alpha"),
    ]
    for run_config, message in cases:
        with pytest.raises(ConfigError) as err:
            config_from_run_config(run_config)
        assert message in str(err.value), (run_config, str(err.value))
    label, config = config_from_run_config({"scenario": "two.toml", "only": "fedavg"})
    assert label == "fedavg" and config.strategy.name == "fedavg" and config.rounds == 2


def test_a_relative_scenario_is_found_in_the_app_directory(tmp_path, monkeypatch):
    """Flower puts the installed app (the FAB) first on sys.path; the scenario it carries is found from any cwd."""
    from fedsim.flower_app import resolve_scenario

    app = tmp_path / "app"
    (app / "scenarios").mkdir(parents=True)
    (app / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (app / "scenarios" / "x.toml").write_text(SMALL_AFL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(app))
    assert resolve_scenario("scenarios/x.toml") == app / "scenarios" / "x.toml"


def test_node_config_assigns_equal_blocks_and_names_its_keys(tmp_path):
    from fedsim.config import load_scenario
    from fedsim.flower_app import for_nodes, node_group

    config = for_nodes(load_scenario(_write(tmp_path, SMALL_AFL), ["partition.num_clients=7"]), 3)
    blocks = [node_group({"partition-id": p, "num-partitions": 3}, config) for p in range(3)]
    assert blocks == [[0, 1, 2], [3, 4, 5], [6]]
    assert config.num_nodes == 3
    with pytest.raises(ConfigError, match="needs integer 'partition-id' and 'num-partitions'"):
        node_group({"partition-id": 0}, config)
    with pytest.raises(ConfigError, match="partition-id = 3 is outside 0..2"):
        node_group({"partition-id": 3, "num-partitions": 3}, config)


def test_the_project_declares_fedsims_flower_app():
    """pyproject.toml's [tool.flwr.app]: the components load as Flower apps, the config has every key the app
    reads, and the FAB carries the shipped scenarios (and no copy of fedsim, which comes from the install)."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    from fedsim.flower_app import RUN_CONFIG_DEFAULTS

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert isinstance(load_app(app["components"]["serverapp"], RuntimeError, ROOT), ServerApp)
    assert isinstance(load_app(app["components"]["clientapp"], RuntimeError, ROOT), ClientApp)
    assert app["config"] == RUN_CONFIG_DEFAULTS
    assert app["fab-include"] == ["scenarios/*.toml"]


def test_deploy_refuses_bad_input_before_starting_anything(tmp_path):
    bad = _write(tmp_path, SMALL_AFL.replace("alpha = 0.5", "alpha = -1"))
    run = subprocess.run([sys.executable, "-m", "fedsim.cli", "deploy", str(bad), "--nodes", "2", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "partition.alpha" in run.stderr, run.stderr
    from fedsim.deploy import DeployError, LocalFederation

    with pytest.raises(DeployError, match="--nodes: 0"):
        LocalFederation(0)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- end to end
def _inline_run(scenario: Path, tmp_path: Path, label: str | None, nodes: int) -> tuple[dict, dict, pd.DataFrame]:
    """The same variant through fedsim's own engine (inline: one process), grouped as on ``nodes`` nodes."""
    from fedsim.config import load_scenarios, select_variants
    from fedsim.engine.runner import run_scenario
    from fedsim.flower_app import for_nodes

    every = load_scenarios(scenario, ["simulation.backend='inline'"])
    config = select_variants(every, [label])[0][1] if label else every[0][1]
    out = tmp_path / f"inline-{label}"
    summary = run_scenario(for_nodes(config, nodes), out, show_progress=False)
    model = torch.load(out / "model.pt", weights_only=False)
    return summary, model.state_dict(), pd.read_csv(out / "metrics.csv")


@pytest.mark.ray  # Flower's simulation runtime runs the clients on Ray
def test_flwr_run_in_flowers_simulation_runtime_writes_a_run_directory_report_reads(tmp_path):
    """``flwr run <project> --run-config ...`` with the project's own pyproject (the FAB carries scenarios/)."""
    from fedsim.deploy import LocalFederation
    from fedsim.results.report import report

    out = tmp_path / "run"
    federation = LocalFederation(simulation=True, num_supernodes=2, workdir=tmp_path)
    with federation:
        code = federation.run(ROOT, {
            "scenario": "scenarios/afl-fmnist.toml", "out": str(out),
            "set": "data.max_train=2000;data.max_test=500;partition.num_clients=4;model.feature_dim=64",
        }, timeout=600)
        log = federation.log_tail("superlink", 40)
    assert code == 0, log
    assert not federation.alive()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["answered_clients"] == 4, summary
    assert summary["final_accuracy"] > 0.5
    nodes = pd.read_csv(out / "nodes.csv")
    assert sorted(nodes["client"]) == [0, 1, 2, 3] and nodes["flower_node"].nunique() == 2
    table = report([out], out_dir=tmp_path / "report", show=False)
    assert len(table) == 1


def test_deployment_engine_on_loopback_equals_fedsims_simulation_and_leaves_nothing(tmp_path):
    """3 SuperNodes, each loading its own clients' data: AFL's weights equal the simulation's to 1e-9, FedAvg's
    rounds, accuracies and bytes equal; every process started (SuperLink, SuperNodes, app processes) is gone."""
    from fedsim.deploy import LocalFederation, deploy

    scenario = _write(tmp_path, AFL_AND_FEDAVG)
    federation = LocalFederation(3, workdir=tmp_path)
    with federation:
        results = deploy(scenario, 3, tmp_path / "deployed", federation=federation, timeout=600)
        started = set(federation.started_pids)
    assert started and not federation.alive()
    by_label = {label: (run_dir, summary) for label, run_dir, summary in results}
    assert sorted(by_label) == ["afl", "fedavg"]

    run_dir, summary = by_label["afl"]
    ref, ref_weights, _ = _inline_run(scenario, tmp_path, "afl", 3)
    weights = torch.load(run_dir / "model.pt", weights_only=False).state_dict()
    assert max(float((weights[k].double() - ref_weights[k].double()).abs().max()) for k in weights) <= 1e-9
    assert summary["answered_clients"] == 6 and summary["bytes_up"] == ref["bytes_up"]
    nodes = pd.read_csv(run_dir / "nodes.csv")
    assert sorted(nodes["client"]) == list(range(6)) and nodes["flower_node"].nunique() == 3

    run_dir, summary = by_label["fedavg"]
    ref, _, ref_metrics = _inline_run(scenario, tmp_path, "fedavg", 3)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert summary["rounds"] == 2 and list(metrics["round"]) == [0, 1, 2]
    assert list(metrics["accuracy"]) == list(ref_metrics["accuracy"])
    assert summary["bytes_up"] == ref["bytes_up"] > 0 and summary["bytes_down"] == ref["bytes_down"]


_START_TIMES: dict[int, int] = {}  # pid -> start time when a test saw it


def _noted(pids) -> set[int]:  # noqa: ANN001
    """``pids`` (seen below ``fedsim deploy``), noted with their start times for ``_kill_seen``."""
    from fedsim.engine.processes import start_time

    for pid in pids:
        if (started := start_time(pid)) is not None:
            _START_TIMES[pid] = started
    return set(pids)


def _kill_seen(seen: set[int]) -> None:
    """SIGKILL to what a test saw and is still that process (also when the test fails; a reused PID is spared).
    fedsim's watchdog among them is left to finish first: after a kill -9 of fedsim deploy it sweeps what carries
    the federation's token, also what the test never saw (a ServerApp started after its last look); killed at once,
    it left such a ServerApp running."""
    import os
    import signal

    from fedsim.engine.processes import start_time, wait_gone

    ours = [pid for pid in seen if start_time(pid) is not None and start_time(pid) == _START_TIMES.get(pid)]
    wait_gone([pid for pid in ours if "--watchdog" in _cmdline_of(pid)], 20, poll=0.1)
    for pid in seen:
        if start_time(pid) is not None and start_time(pid) == _START_TIMES.get(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_ctrl_c_during_fedsim_deploy_stops_every_process_it_started(tmp_path):
    """SIGINT to ``fedsim deploy`` while its SuperLink and SuperNodes run: exit 130 and every process seen below it
    (SuperLink, SuperNodes, superexec, app processes) is gone afterwards."""
    import os
    import signal
    import time

    from fedsim.engine.processes import descendants, wait_gone

    # 200 rounds: on an idle machine 5 rounds finished within the 5 s the test waits before the SIGINT
    scenario = _write(tmp_path, SMALL_AFL.replace('name = "afl"', 'name = "fedavg"').replace("rounds = 1", "rounds = 200"))
    # started with SIGINT ignored, as a background job of a non-interactive shell is (CI runs the suite so): fedsim
    # deploy still stops on it, as fedsim run does (it ran its 200 rounds to the end before its handler was explicit)
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "deploy", str(scenario), "--nodes", "2", "--out",
                             str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            below = set(descendants(proc.pid))
            seen |= _noted(below)
            names = []
            for pid in below:
                try:
                    names.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
                except OSError:
                    continue
            if sum("flower-supernode" in n for n in names) == 2 and any("flower-superlink" in n for n in names) \
                    and any("\x00run\x00" in n for n in names):  # and `flwr run` submitted the app
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("the SuperLink, SuperNodes and flwr run did not start within 120 s")
        time.sleep(5)  # the run is under way: the ServerApp and ClientApp processes are starting
        seen |= _noted(descendants(proc.pid))
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=180)  # generous: a busy machine (the ServerApp gets up to 30 s)
        assert proc.returncode == 130, err[-2000:]
        assert seen and not wait_gone(seen, 15, poll=0.2)
    finally:  # also when the test fails: nothing it started stays behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        _kill_seen(seen)


# ------------------------------------------------------------------------------------------------- issue #23
def test_overrides_holding_a_semicolon_reach_the_serverapp_as_given(tmp_path, monkeypatch):
    """``fedsim deploy --set "data.root='/x;rounds=5'"``: the ServerApp gets the one override deploy validated (the
    run config carries a JSON list then), not ``data.root='/x`` and ``rounds=5``; plain overrides keep the ``;``
    form users type."""
    from fedsim import deploy as deploy_mod
    from fedsim.config import load_scenarios
    from fedsim.flower_app import config_from_run_config, join_overrides, split_overrides

    assert join_overrides(["rounds=3", "partition.alpha=0.5"]) == "rounds=3;partition.alpha=0.5"
    for overrides in (["data.root='/x;rounds=5'"], ["rounds=1", "data.root='x;y;z'"], ["[x=1"], []):
        assert split_overrides(join_overrides(overrides)) == overrides
    with pytest.raises(ConfigError, match="JSON list"):
        split_overrides('["rounds=1", 3]')

    scenario = _write(tmp_path, SMALL_AFL)
    seen: list[dict] = []

    class Federation:  # stands in for a started LocalFederation: records what flwr run would get
        nodes, address, home = 2, "127.0.0.1:1", tmp_path / "home"
        routes = {"127.0.0.1:1": "/nonexistent.sock"}

        def run(self, app, run_config, timeout=None):  # noqa: ANN001, ANN202
            seen.append(run_config)
            Path(run_config["out"]).mkdir(parents=True, exist_ok=True)
            (Path(run_config["out"]) / "summary.json").write_text('{"status": "completed"}')
            return 0

    Federation.home.mkdir()
    overrides = ["data.root='/x;rounds=5'", "rounds=1"]
    deploy_mod.deploy(scenario, 2, tmp_path / "out", overrides=overrides, federation=Federation())
    assert split_overrides(seen[0]["set"]) == overrides
    monkeypatch.chdir(tmp_path)
    _, config = config_from_run_config({**seen[0], "scenario": str(scenario)})
    assert config.data.root == "/x;rounds=5" and config.rounds == 1
    assert config == load_scenarios(scenario, overrides)[0][1]


def test_deploy_applies_fedsim_runs_run_directory_rules_before_starting_anything(tmp_path, monkeypatch):
    """``fedsim deploy`` refuses what ``fedsim run`` refuses (a user's own files, a completed run of another
    configuration) unless --overwrite, and --resume skips a variant completed with the same configuration, all
    before a SuperLink starts."""
    from fedsim import cli
    from fedsim import deploy as deploy_mod
    from fedsim.config import load_scenario
    from fedsim.flower_app import for_nodes
    from fedsim.results.rundir import RunRecorder

    def started(self):  # noqa: ANN001, ANN202
        raise RuntimeError("a federation was started")

    monkeypatch.setattr(deploy_mod.LocalFederation, "start", started)
    scenario = _write(tmp_path, SMALL_AFL)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my own numbers\n")
    with pytest.raises(ConfigError, match="files fedsim did not write"):
        deploy_mod.deploy(scenario, 2, mine)
    assert (mine / "metrics.csv").read_text() == "my own numbers\n"
    code = cli.main(["deploy", str(scenario), "--nodes", "2", "--out", str(mine)])
    assert code == 2 and (mine / "metrics.csv").read_text() == "my own numbers\n"

    def completed_run(where: Path, config: dict) -> None:
        recorder = RunRecorder(where)
        recorder.start(config)
        recorder.write_summary({"status": "completed", "final_accuracy": 0.5})
        recorder.close()

    config = load_scenario(scenario)
    other, same = tmp_path / "other", tmp_path / "same"
    completed_run(other, for_nodes(load_scenario(scenario, ["partition.alpha=0.3"]), 2).to_dict())
    completed_run(same, for_nodes(config, 2).to_dict())
    with pytest.raises(ConfigError, match="completed run of a different configuration"):
        deploy_mod.deploy(scenario, 2, other)
    with pytest.raises(RuntimeError, match="a federation was started"):
        deploy_mod.deploy(scenario, 2, other, overwrite=True)
    results = deploy_mod.deploy(scenario, 2, same, resume=True)  # nothing left to run: nothing starts
    assert [(label, run_dir, summary["status"]) for label, run_dir, summary in results] == [
        (None, same.resolve(), "completed")]
    assert cli.main(["deploy", str(scenario), "--nodes", "2", "--out", str(same), "--resume"]) == 0
    with pytest.raises(RuntimeError, match="a federation was started"):  # on 3 nodes it is another configuration
        deploy_mod.deploy(scenario, 3, same, overwrite=True)
    with pytest.raises(ConfigError, match="completed run of a different configuration"):
        deploy_mod.deploy(scenario, 3, same)


# slow: ~60 s of the 2-core CI; the deployment-engine equality test above stays in the default run
@pytest.mark.slow
def test_clients_that_do_not_split_evenly_over_the_supernodes(tmp_path):
    """3 SuperNodes for 4 clients (the issue's IndexError): blocks of 2, so the third node serves none and the
    server leaves it out; the run completes and equals fedsim's own simulation with those blocks (AFL to 1e-9)."""
    from fedsim.deploy import LocalFederation, deploy

    scenario = _write(tmp_path, SMALL_AFL.replace("num_clients = 6", "num_clients = 4"))
    federation = LocalFederation(3, workdir=tmp_path)
    with federation:
        [(_, run_dir, summary)] = deploy(scenario, 3, tmp_path / "deployed", federation=federation, timeout=600)
    assert not federation.alive()
    assert summary["status"] == "completed" and summary["answered_clients"] == 4, summary
    nodes = pd.read_csv(run_dir / "nodes.csv")
    assert sorted(nodes["client"]) == [0, 1, 2, 3] and nodes["flower_node"].nunique() == 2
    ref, ref_weights, _ = _inline_run(scenario, tmp_path, None, 3)
    weights = torch.load(run_dir / "model.pt", weights_only=False).state_dict()
    assert max(float((weights[k].double() - ref_weights[k].double()).abs().max()) for k in weights) <= 1e-9
    assert summary["final_accuracy"] == pytest.approx(ref["final_accuracy"], abs=1e-9)


# slow: ~65 s of the 2-core CI (a round of fedavg over 2 SuperNodes first); the default run keeps the SIGINT case
# (test_ctrl_c_during_fedsim_deploy_stops_every_process_it_started) and tests/test_deploy_security.py's kill -9
@pytest.mark.slow
def test_sigterm_mid_run_leaves_an_interrupted_run_with_its_rows(tmp_path):
    """SIGTERM to ``fedsim deploy`` after a round: exit 143, summary.json says interrupted, metrics.csv keeps
    the rows written so far, and every process it started is gone."""
    import os
    import signal
    import time

    from fedsim.engine.processes import descendants, wait_gone

    scenario = _write(tmp_path, SMALL_AFL.replace('name = "afl"', 'name = "fedavg"').replace("rounds = 1",
                                                                                              "rounds = 200"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "deploy", str(scenario), "--nodes", "2", "--out",
                             str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: set[int] = set()
    rows = 0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and rows < 2:  # round 0 (the initial model) and one round
            seen |= _noted(descendants(proc.pid))
            with contextlib.suppress(OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
                rows = len(pd.read_csv(out / "metrics.csv"))
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        assert rows >= 2, "a round did not finish within 300 s"
        seen |= _noted(descendants(proc.pid))
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 143, err[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "interrupted", summary
        assert len(pd.read_csv(out / "metrics.csv")) >= rows
        assert seen and not wait_gone(seen, 30, poll=0.2)
    finally:  # also when the test fails: nothing it started stays behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        _kill_seen(seen)


@pytest.mark.slow  # a SuperLink, 2 SuperNodes and flwr run: about 4 min at load average 12 on the 2-core machine
def test_flwr_run_stream_shows_fedsims_round_lines(tmp_path):
    """``fedsim deploy --verbose`` shows ``flwr run --stream``'s output: the ServerApp's round lines (fedsim's
    progress through Flower's logger, ``fedsim.engine.progress.to_flower_log``) reach it, one per logged round, with
    the accuracy metrics.csv holds. (The fast check of ``to_flower_log`` itself: tests/test_report_outputs.py.)"""
    import re

    from tests.conftest import DIGITS

    text = DIGITS.replace("num_clients = 6", "num_clients = 2").replace("width = 16", "width = 8")
    scenario = _write(tmp_path, text.replace("epochs = 3", "epochs = 1"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "deploy", str(scenario), "--nodes", "2", "--out",
                             str(out), "--verbose"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=540)
    finally:  # also when the test fails: nothing it started stays behind (its processes die with it)
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, log[-3000:]
    lines = re.findall(r"\[fedsim fedavg\] round (\d+)/2  acc (\d\.\d{4}) \(worst client \d\.\d{4}\)  up ", log)
    metrics = pd.read_csv(out / "metrics.csv")
    assert [int(r) for r, _ in lines] == list(metrics["round"]) == [0, 1, 2], log[-3000:]
    assert [acc for _, acc in lines] == [f"{a:.4f}" for a in metrics["accuracy"]]
