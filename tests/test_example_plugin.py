"""The example plugin package examples/fedsim-fedexp (FedExP, Jhunjhunwala et al. ICLR 2023) against its math and
through every way fedsim loads a plugin: in-process, ``--plugin FILE`` and the ``fedsim.plugins`` entry point its
pyproject declares, under the inline backend, the Ray backend and ``fedsim deploy``.

- The update rule by hand: Delta = sum_i p_i Delta_i, eta_g = max(1, sum_i p_i ||Delta_i||^2 / (2 (||Delta||^2 +
  eps))), x <- x + eta_g Delta, on replies written by the test (exact numbers) and on a real round whose local models
  come from FedAvg's own client part (same seeds, same local SGD), so nothing of FedExP's client is trusted.
- Identical client updates give eta_g = 1 (FedAvg); replies combine exactly (a node serving all clients == one
  client per node); the saved model is the mean of the last two iterates and reproduces final_accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import inline_digits_scenario, scenario_config, subprocess_env
from test_stateful_baselines import TINY  # 3 digits clients, width-8 MLP, full-batch plain SGD

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "examples" / "fedsim-fedexp"
SRC = PACKAGE / "src"
PLUGIN_FILE = PACKAGE / "fedexp_plugin.py"

if str(SRC) not in sys.path:  # in this process the package is imported from its source folder
    sys.path.append(str(SRC))

from fedsim_fedexp import protocol  # noqa: E402  (registers "fedexp" in this process)
from fedsim_fedexp.client import FedExPClient  # noqa: E402
from fedsim_fedexp.server import FedExPServer, fedexp_step, mean_of_two  # noqa: E402

from fedsim.algorithms.fedavg import protocol as sgd_protocol  # noqa: E402
from fedsim.clients.sgd import SGDClient  # noqa: E402
from fedsim.engine.runner import run_scenario  # noqa: E402
from fedsim.errors import ConfigError  # noqa: E402
from fedsim.scenario import partition_for  # noqa: E402


def _reply(update: list[float], n: int, sq_norm: float | None = None):  # noqa: ANN202
    delta = np.asarray(update, dtype=np.float64)
    norm = float(delta @ delta) if sq_norm is None else sq_norm
    return protocol.reply({"w": delta}, {}, n, 1, 0.0, norm)


# -- the update rule by hand ------------------------------------------------------------------------------------
def test_the_server_step_by_hand():
    x = {"w": np.array([2.0, -1.0])}
    # p = (1/4, 3/4): Delta = 1/4 (3, 1) + 3/4 (-1, 1) = (0, 1); sum p ||Delta_i||^2 = 10/4 + 3 * 2/4 = 4
    merged = protocol.merge([protocol.parse_reply(_reply([3.0, 1.0], 1)), protocol.parse_reply(_reply([-1.0, 1.0], 3))])
    assert np.array_equal(merged.update["w"], [0.0, 1.0]) and merged.extra[protocol.SQ_NORM_KEY] == 4.0
    new, eta = fedexp_step(x, merged, ["w"], epsilon=0.25)
    assert eta == 4.0 / (2 * (1.0 + 0.25))  # 1.6: the updates partly cancel, so the server extrapolates
    assert np.array_equal(new["w"], [2.0, -1.0 + 1.6])
    # equal weights: the paper's sum_i ||Delta_i||^2 / (2 M (||Delta||^2 + eps)) = (10 + 2) / (2 * 2 * (2 + 0.5))
    merged = protocol.merge([protocol.parse_reply(_reply([3.0, 1.0], 5)), protocol.parse_reply(_reply([-1.0, 1.0], 5))])
    assert fedexp_step(x, merged, ["w"], epsilon=0.5)[1] == 12.0 / (2 * 2 * 2.5)
    # updates that cancel completely: eta_g = mean ||Delta_i||^2 / (2 eps), applied to a zero mean
    merged = protocol.merge([protocol.parse_reply(_reply([1.0, 0.0], 2)), protocol.parse_reply(_reply([-1.0, 0.0], 2))])
    new, eta = fedexp_step(x, merged, ["w"], epsilon=1e-3)
    assert eta == pytest.approx(500.0, rel=1e-12) and np.array_equal(new["w"], x["w"])


def test_identical_updates_are_fedavg():
    """sum_i p_i ||Delta_i||^2 = ||Delta||^2 when every Delta_i is the same, so eta_g = max(1, 1/2 ...) = 1."""
    x = {"w": np.array([0.5, 0.25, -1.0])}
    same = [protocol.parse_reply(_reply([0.1, -0.2, 0.3], n)) for n in (1, 4, 7)]
    new, eta = fedexp_step(x, protocol.merge(same), ["w"], epsilon=1e-9)
    assert eta == 1.0 and np.allclose(new["w"], x["w"] + [0.1, -0.2, 0.3], rtol=0, atol=1e-15)


def test_replies_combine_exactly():
    replies = [_reply([3.0, 1.0], 1), _reply([-1.0, 1.0], 3), _reply([0.5, -2.0], 4)]
    flat = protocol.merge([protocol.parse_reply(r) for r in replies])
    nested = protocol.merge([protocol.parse_reply(protocol.combine(replies[:2])), protocol.parse_reply(replies[2])])
    assert np.allclose(nested.update["w"], flat.update["w"], rtol=0, atol=1e-15)
    assert nested.extra[protocol.SQ_NORM_KEY] == pytest.approx(flat.extra[protocol.SQ_NORM_KEY], rel=1e-15) and nested.clients == 3
    assert nested.num_examples == flat.num_examples == 8


def test_the_mean_of_the_last_two_iterates():
    latest = {"w": np.array([1.0, 3.0], dtype=np.float32), "bn": np.array([7.0])}
    previous = {"w": np.array([0.0, 1.0], dtype=np.float32), "bn": np.array([5.0])}
    out = mean_of_two(latest, previous, ["w"])
    assert out["w"].dtype == np.float32 and np.array_equal(out["w"], [0.5, 2.0]) and out["bn"][0] == 7.0


def test_parameters_and_checks_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^strategy\.epsilon: 0\.0 is out of range; it must be a finite number > 0"):
        scenario_config(TINY, tmp_path, "strategy.name=fedexp", "strategy.epsilon=0.0")
    with pytest.raises(ConfigError, match=r"^strategy\.average_last_two: 1 has the wrong type; it must be true or false"):
        scenario_config(TINY, tmp_path, "strategy.name=fedexp", "strategy.average_last_two=1")
    with pytest.raises(ConfigError, match=r"^client\.epochs: 0 trains nothing"):
        scenario_config(TINY, tmp_path, "strategy.name=fedexp", "client.epochs=0")


# -- a real round, in this process ------------------------------------------------------------------------------
def _run(tmp_path, label, *overrides):  # noqa: ANN202
    config = scenario_config(TINY, tmp_path, "strategy.name=fedexp", *overrides, filename=f"{label}.toml")
    summary = run_scenario(config, tmp_path / label, show_progress=False)
    model = torch.load(tmp_path / label / "model.pt", weights_only=False)
    return config, summary, model, pd.read_csv(tmp_path / label / "metrics.csv")


def test_one_round_is_the_rule_over_fedavgs_local_models(tmp_path, monkeypatch):
    seen: dict[int, tuple[dict, dict, int]] = {}  # pid -> (received x, local model y_i, n_i), FedAvg's client
    train = SGDClient.train

    def spying(self, content, env):  # noqa: ANN001, ANN202
        out = train(self, content, env)
        received = {k: np.array(v, dtype=np.float64) for k, v in sgd_protocol.parse_train(content)[0].items()}
        sent, n, _ = sgd_protocol.parse_reply(out)
        seen[env.partition_id] = (received, {k: np.array(v, dtype=np.float64) for k, v in sent.items()}, n)
        return out

    monkeypatch.setattr(SGDClient, "train", spying)
    run_scenario(scenario_config(TINY, tmp_path, "strategy.name=fedavg", "rounds=1", filename="avg.toml"),
                 tmp_path / "avg", show_progress=False)
    config, summary, model, metrics = _run(tmp_path, "exp", "rounds=1", "strategy.epsilon=1e-6")

    sizes = [len(p) for p in partition_for(config)]
    assert [seen[pid][2] for pid in sorted(seen)] == sizes and len(set(sizes)) > 1  # the weights p_i differ
    p = np.array(sizes, dtype=np.float64) / sum(sizes)
    x = seen[0][0]
    names = [n for n, _ in model.named_parameters()]
    deltas = [{k: seen[pid][1][k] - x[k] for k in names} for pid in sorted(seen)]
    mean = {k: sum(pi * d[k] for pi, d in zip(p, deltas)) for k in names}
    mean_sq = sum(pi * sum(float(np.sum(d[k] ** 2)) for k in names) for pi, d in zip(p, deltas))
    eta = max(1.0, mean_sq / (2 * (sum(float(np.sum(mean[k] ** 2)) for k in names) + 1e-6)))
    assert eta > 1.0  # non-IID clients disagree: the server extrapolates
    assert metrics["eta_g"].iloc[-1] == pytest.approx(eta, rel=1e-5)  # measured 2e-7 (float32 updates)
    assert summary["mean_eta_g"] == metrics["eta_g"].iloc[-1]
    state = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    for k in names:
        assert np.allclose(state[k], x[k] + eta * mean[k], rtol=0, atol=1e-5), k


def test_grouped_equals_single_and_the_saved_model_is_the_mean_of_the_last_two(tmp_path, monkeypatch):
    kept: list[dict] = []
    aggregate = FedExPServer.aggregate

    def keeping(self, model, replies):  # noqa: ANN001, ANN202
        new = aggregate(self, model, replies)
        kept.append({k: np.array(v, dtype=np.float64) for k, v in new.items()})
        return new

    monkeypatch.setattr(FedExPServer, "aggregate", keeping)
    config, summary, single, metrics = _run(tmp_path, "single")
    x1, x2 = kept
    saved = {k: v.detach().double().numpy() for k, v in single.named_parameters()}
    for k in saved:
        assert np.allclose(saved[k], (x1[k] + x2[k]) / 2, rtol=0, atol=1e-6), k
    from fedsim.nn.training import evaluate
    from fedsim.scenario import test_split

    test = test_split(config)
    assert evaluate(single, test.x, test.y)["accuracy"] == summary["final_accuracy"]
    assert list(metrics["eta_g"].dropna().index) == [1, 2] and (metrics["eta_g"].dropna() >= 1.0).all()
    _, _, grouped, grouped_metrics = _run(tmp_path, "grouped", "simulation.clients_per_node=3")
    for (k, a), (_, b) in zip(single.state_dict().items(), grouped.state_dict().items()):
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6), k
    assert np.allclose(grouped_metrics["eta_g"].dropna(), metrics["eta_g"].dropna(), rtol=1e-6)
    assert callable(FedExPClient.reduce)


# -- the ways fedsim loads it: --plugin FILE and the pyproject's entry point, in fresh processes -----------------
def _fedsim(tmp_path: Path, *argv: str, pythonpath: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m fedsim.cli ARGV`` in a fresh process, from a directory where the example is not on sys.path."""
    env = subprocess_env(tmp_path, PYTHONPATH=os.pathsep.join(p for p in [pythonpath, str(REPO)] if p))
    env.pop("FEDSIM_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd or tmp_path, timeout=400)


def _scenario(tmp_path: Path, clients: int = 4) -> Path:
    path = tmp_path / "fedexp.toml"
    text = inline_digits_scenario("fedexp", clients).replace("rounds = 1", "rounds = 2")
    path.write_text(text + '[model]\nname = "mlp"\nwidth = 16\n[client]\nepochs = 1\nbatch_size = 64\nlr = 0.1\n')
    return path


def _entry_point_site(tmp_path: Path) -> Path:
    """A folder holding a dist-info whose entry_points.txt is the one pyproject.toml declares (what pip writes)."""
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["fedsim.plugins"]
    site = tmp_path / "site"
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (dist / "entry_points.txt").write_text("[fedsim.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    return site


def _completed(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "fedexp", summary
    assert summary["mean_eta_g"] >= 1.0 and 0.0 < summary["final_accuracy"] <= 1.0
    return summary


def test_via_plugin_file_from_another_directory(tmp_path):
    scenario = _scenario(tmp_path)  # without --plugin the name is unknown: tests/test_plugin_layer.py
    run = _fedsim(tmp_path, "run", str(scenario), "--plugin", str(PLUGIN_FILE), "--out", str(tmp_path / "run"),
                  "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    _completed(tmp_path / "run")


def test_the_entry_point_the_pyproject_declares_validates_the_shipped_scenario(tmp_path):
    """``fedsim validate`` (torch-free, so cheap) finds fedexp through the entry point alone; the inline run
    through it is slow-marked below, the --plugin one above runs by default."""
    pythonpath = os.pathsep.join([str(SRC), str(_entry_point_site(tmp_path))])
    out = _fedsim(tmp_path, "validate", str(PACKAGE / "scenarios" / "fedexp-digits.toml"), pythonpath=pythonpath)
    assert out.returncode == 0 and "fedexp: ok (fedexp, digits, 10 clients, 20 rounds)" in out.stdout, out.stderr


@pytest.mark.slow
def test_via_the_entry_point_inline(tmp_path):
    pythonpath = os.pathsep.join([str(SRC), str(_entry_point_site(tmp_path))])
    run = _fedsim(tmp_path, "run", str(_scenario(tmp_path)), "--out", str(tmp_path / "run"), "--quiet",
                  pythonpath=pythonpath)
    assert run.returncode == 0, run.stderr[-3000:]
    _completed(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("how", ["plugin", "entry-point"])
def test_on_the_ray_backend(tmp_path, how):
    """Two clients per Ray actor (the client part's reduce), the plugin imported in the workers."""
    scenario = _scenario(tmp_path)
    argv = ["run", str(scenario), "--set", "simulation.backend=ray", "--set", "simulation.clients_per_node=2",
            "--out", str(tmp_path / "run"), "--quiet"]
    if how == "plugin":
        out = _fedsim(tmp_path, *argv, "--plugin", str(PLUGIN_FILE))
    else:
        out = _fedsim(tmp_path, *argv, pythonpath=os.pathsep.join([str(SRC), str(_entry_point_site(tmp_path))]))
    assert out.returncode == 0, out.stderr[-3000:]
    inline = _fedsim(tmp_path, "run", str(scenario), "--plugin", str(PLUGIN_FILE), "--out", str(tmp_path / "inline"),
                     "--quiet")
    assert inline.returncode == 0, inline.stderr[-3000:]
    assert _completed(tmp_path / "run")["final_accuracy"] == _completed(tmp_path / "inline")["final_accuracy"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("how", ["plugin", "entry-point"])
def test_with_fedsim_deploy(tmp_path, how):
    """Two SuperNodes serving two clients each (reduce), the plugin imported by the ServerApp and the SuperNodes."""
    argv = ["deploy", str(_scenario(tmp_path)), "--nodes", "2", "--out", str(tmp_path / "run"), "--quiet"]
    if how == "plugin":
        out = _fedsim(tmp_path, *argv, "--plugin", str(PLUGIN_FILE))
    else:
        out = _fedsim(tmp_path, *argv, pythonpath=os.pathsep.join([str(SRC), str(_entry_point_site(tmp_path))]))
    assert out.returncode == 0, out.stderr[-3000:]
    _completed(tmp_path / "run")


@pytest.mark.slow
def test_pip_installs_the_package_offline(tmp_path):
    """``pip install --no-deps --no-build-isolation --target DIR examples/fedsim-fedexp``: the installed
    dist's entry point registers fedexp (nothing installed into the venv; DIR is the test's)."""
    import shutil

    source = tmp_path / "fedsim-fedexp"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "target"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(target), str(source)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=subprocess_env(tmp_path))
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert not (PACKAGE / "build").exists() and not list(PACKAGE.glob("src/*.egg-info"))
    listed = _fedsim(tmp_path, "list", pythonpath=str(target))
    assert listed.returncode == 0 and "FedExP (Jhunjhunwala et al. 2023)" in listed.stdout, listed.stderr


# -- the plugin files reach Ray workers on other nodes (issue #21) -----------------------------------------------
def test_the_ray_runtime_env_carries_the_plugin_files(tmp_path, monkeypatch):
    """FEDSIM_PLUGINS travels in the workers' env_vars (a cluster's nodes do not inherit this process's
    environment), and joining a cluster the files travel as py_modules (its nodes may not have them)."""
    from fedsim.engine import ray_session
    from fedsim.registry import PLUGINS_ENV

    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    bare = ray_session.worker_runtime_env("10.0.0.1:6379")
    assert list(bare) == ["env_vars"] and list(bare["env_vars"]) == ["PYTHONPATH"]  # no plugins: nothing more
    monkeypatch.setenv(PLUGINS_ENV, str(PLUGIN_FILE))
    local = ray_session.worker_runtime_env(None)
    assert local["env_vars"][PLUGINS_ENV] == str(PLUGIN_FILE) and "py_modules" not in local
    joined = ray_session.worker_runtime_env("10.0.0.1:6379")
    assert joined["env_vars"][PLUGINS_ENV] == str(PLUGIN_FILE) and joined["py_modules"] == [str(PLUGIN_FILE)]
    assert joined["env_vars"]["PYTHONPATH"].split(os.pathsep)[:len(sys.path)] == sys.path

    seen = {}

    def joining(ray, args, timeout):  # noqa: ANN001, ANN202 -- ensure_ray's join, captured instead of run
        seen.update(args)

    monkeypatch.setattr(ray_session, "_join_within", joining)
    config = scenario_config(TINY, tmp_path, "strategy.name=fedexp",
                             'simulation.ray_address="10.0.0.1:6379"', "simulation.backend=ray")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray is running in this process")
    ray_session.ensure_ray(config)
    assert seen["address"] == "10.0.0.1:6379" and seen["runtime_env"]["py_modules"] == [str(PLUGIN_FILE)]
    assert seen["runtime_env"]["env_vars"][PLUGINS_ENV] == str(PLUGIN_FILE)


WHERE_PLUGIN = '''
"""Each client answers whether its worker imported this module from the file fedsim was given (1) or from a copy
Ray shipped to the cluster (0)."""
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import MetricRecord, RecordDict

from fedsim.registry import StrategySpec, register_strategy


@dataclass
class WhereParams:
    pass


class WhereServer:
    def __init__(self, params):
        self.params = params

    def run(self, ctx):
        replies = ctx.send(RecordDict(), round=1)
        same = [int(r.content["where"]["same"]) for r in replies if r.ok]
        ctx.log(1, accuracy=0.0)
        ctx.summary(final_accuracy=0.0, answered=len(same), from_the_given_file=sum(same))


class WhereClient:
    def __init__(self, params):
        self.params = params

    def train(self, content, env):
        given = Path(os.environ["FEDSIM_PLUGINS"]).resolve()
        return RecordDict({"where": MetricRecord({"same": int(Path(__file__).resolve() == given)})})


register_strategy(StrategySpec(name="where", params=WhereParams, server=WhereServer, client=WhereClient))
'''

JOIN_A_CLUSTER = """
import json, sys
from ray.cluster_utils import Cluster
from fedsim.config import load_scenarios
from fedsim.engine.runner import run_scenario
from fedsim.registry import load_plugin
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    load_plugin(sys.argv[1])
    config = load_scenarios(sys.argv[2], [f"simulation.ray_address={cluster.address!r}"])[0][1]
    summary = run_scenario(config, sys.argv[3], show_progress=False)
finally:
    cluster.shutdown()
print("RESULT " + json.dumps(summary))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_joined_cluster_gets_the_plugin_file_as_py_modules(tmp_path):
    """A two-node ray.cluster_utils.Cluster joined by simulation.ray_address: every worker imports the plugin from
    the copy Ray shipped (py_modules), not from the path given to --plugin (which a remote node would lack)."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    plugin = folder / "where_plugin.py"
    plugin.write_text(WHERE_PLUGIN)
    scenario = tmp_path / "where.toml"
    scenario.write_text(inline_digits_scenario("where").replace('backend = "inline"', 'backend = "ray"\nnum_cpus = 1'))
    env = subprocess_env(tmp_path, PYTHONPATH=str(REPO))
    env.pop("FEDSIM_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", JOIN_A_CLUSTER, str(plugin), str(scenario), str(tmp_path / "run")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    summary = json.loads(lines[-1][len("RESULT "):])
    assert summary["answered"] == 4 and summary["from_the_given_file"] == 0, summary
