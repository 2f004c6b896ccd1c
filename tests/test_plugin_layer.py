"""The plugin layer's contracts: client state between rounds, the layering of server and client parts, the
installed namespace, and a scenario load that needs no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from conftest import inline_digits_scenario, scenario_config
from fedsim.engine.runner import run_scenario
from fedsim.registry import StrategySpec, register_strategy, strategies

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((REPO / "scenarios").glob("*.toml"))


# -- client state between rounds --------------------------------------------------------------------------------
@dataclass
class CounterParams:
    rounds_to_run: int = 3


class CounterClient:
    """Counts, in its own state, the messages it received, and adds its partition id once (first message)."""

    def __init__(self, params: CounterParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env) -> RecordDict:  # noqa: ANN001
        seen = env.state.get("counter")
        count = 1 if seen is None else int(seen["count"]) + 1
        first = env.partition_id if seen is None else int(seen["first"])
        env.state["counter"] = MetricRecord({"count": count, "first": first})
        return RecordDict({f"count.{env.partition_id}": MetricRecord({"count": count, "first": first,
                                                                      "round": env.round})})

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        out = RecordDict()
        for reply in replies:
            for key, record in reply.items():
                out[key] = record
        return out


class CounterServer:
    def __init__(self, params: CounterParams) -> None:
        self.params = params

    def run(self, ctx) -> None:  # noqa: ANN001
        seen = {}
        for r in range(1, self.params.rounds_to_run + 1):
            for reply in ctx.send(RecordDict(), round=r):
                if not reply.ok:
                    continue
                for key, record in reply.content.metric_records.items():
                    seen.setdefault(int(key.split(".")[1]), []).append(
                        (int(record["round"]), int(record["count"]), int(record["first"])))
            ctx.log(r, accuracy=0.0)
        ctx.save_table("counts.csv", __import__("pandas").DataFrame(
            [{"client": pid, "round": rd, "count": c, "first": f} for pid, rows in seen.items()
             for rd, c, f in rows]), index=False)
        ctx.summary(final_accuracy=0.0)


register_strategy(StrategySpec(name="test-counter", params=CounterParams, server=CounterServer, client=CounterClient,
                               reducible=True, description="test: a stateful client part"))

COUNTER = inline_digits_scenario("test-counter")


def _counts(run_dir: Path):  # noqa: ANN202
    import pandas as pd

    return pd.read_csv(run_dir / "counts.csv").sort_values(["client", "round"])


def _assert_each_client_kept_its_own_state(table) -> None:  # noqa: ANN001
    for pid, rows in table.groupby("client"):
        assert list(rows["count"]) == [1, 2, 3], (pid, rows)  # one counter per client, kept across rounds
        assert set(rows["first"]) == {pid}  # never another client's state


@pytest.mark.parametrize("clients_per_node", [1, 2])
def test_client_state_persists_across_rounds_one_namespace_per_client(tmp_path, clients_per_node):
    config = scenario_config(COUNTER, tmp_path, f"simulation.clients_per_node={clients_per_node}")
    run_scenario(config, tmp_path / "run", show_progress=False)
    _assert_each_client_kept_its_own_state(_counts(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.ray
def test_client_state_persists_on_the_ray_backend(tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get this module's classes by value
    try:
        config = scenario_config(COUNTER, tmp_path, "simulation.backend=ray", "simulation.clients_per_node=2")
        run_scenario(config, tmp_path / "run", show_progress=False)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    _assert_each_client_kept_its_own_state(_counts(tmp_path / "run"))


def test_failed_client_keeps_its_previous_state(tmp_path):
    """An injected failure skips the client part: its state is not touched, so the next count continues."""
    config = scenario_config(COUNTER, tmp_path, "simulation.failure_rate=0.25")
    run_scenario(config, tmp_path / "run", show_progress=False)
    table = _counts(tmp_path / "run")
    assert len(table) == 3 * 3  # one of the four clients fails in each round
    for _, rows in table.groupby("client"):
        assert list(rows["count"]) == list(range(1, len(rows) + 1))


# -- layering --------------------------------------------------------------------------------------------------
def _imports_of(folder: str) -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / folder).glob("*.py")))


def test_server_parts_never_import_client_parts_and_back():
    import re

    server, client = _imports_of("strategies"), _imports_of("clients")
    assert not re.search(r"^\s*(from|import)\s+(fedsim\.)?clients\b", server, re.M)
    assert not re.search(r"^\s*(from|import)\s+(fedsim\.)?strategies\b", client, re.M)


def test_registry_and_config_do_not_import_each_other():
    import re

    registry = (REPO / "fedsim" / "registry.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+fedsim\.(config|engine)\b", registry, re.M)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter outside the repository (no PYTHONPATH pointing into it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


def test_only_fedsim_is_a_top_level_name(tmp_path):
    out = _python("import importlib.util as u; print(u.find_spec('clients'), u.find_spec('strategies'), "
                  "u.find_spec('fedsim.clients') is not None, u.find_spec('fedsim.strategies') is not None)",
                  tmp_path)
    assert out.stdout.split() == ["None", "None", "True", "True"], out.stderr


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_loading_a_shipped_scenario_needs_no_torch(path, tmp_path):
    out = _python("import sys; from fedsim.config import load_scenarios; "
                  f"runs = load_scenarios({str(path)!r}); "
                  "print(len(runs), 'torch' in sys.modules, 'flwr.simulation' in sys.modules)", tmp_path)
    assert out.returncode == 0, out.stderr
    count, torch_loaded, simulation_loaded = out.stdout.split()
    assert int(count) >= 1 and torch_loaded == "False" and simulation_loaded == "False"


def test_every_strategy_module_imports_and_every_spec_resolves():
    from fedsim.registry import broken_strategy_modules

    assert broken_strategy_modules() == {}
    for name, spec in strategies().items():
        server = spec.server_class()
        assert callable(getattr(server, "run", None)), name
        client = spec.client_class()
        if client is not None:
            assert callable(getattr(client, "train", None)), name
            assert spec.reducible == callable(getattr(client, "reduce", None)), f"{name}: reducible is declared wrong"


def test_declared_constraints_give_field_named_errors():
    from fedsim.errors import ConfigError
    from fedsim.params import Interval, Options, validate_params

    @dataclass
    class P:
        gamma: float = 1.0
        mode: str = "a"
        draws: int | None = None
        _parameter_constraints = {"gamma": [Interval(0, None, closed="neither")], "mode": [Options(("a", "b"))],
                                  "draws": [Interval(1, None, integer=True), None]}

    validate_params(P(draws=3), "strategy")
    for bad, message in [(P(gamma=0.0), "strategy.gamma: 0.0 is out of range; it must be a finite number > 0"),
                         (P(gamma=float("nan")), "strategy.gamma: nan is out of range"),
                         (P(mode="c"), "strategy.mode: 'c' is not allowed; choose one of 'a', 'b'"),
                         (P(draws=0), "strategy.draws: 0 is out of range; it must be an integer >= 1 or left unset")]:
        with pytest.raises(ConfigError) as err:
            validate_params(bad, "strategy")
        assert str(err.value).startswith(message), str(err.value)


def test_catalog_names_match_the_builders():
    from fedsim import catalog
    from fedsim.data import DATASETS
    from fedsim.nn.features import ACTIVATIONS
    from fedsim.nn.models import build_model

    assert list(DATASETS) == list(catalog.DATASETS)
    assert set(ACTIVATIONS) == set(catalog.ACTIVATIONS)
    for name, blocks in catalog.MODEL_BLOCKS.items():
        assert build_model(name, (1, 28, 28), num_classes=10, width=4).num_blocks == blocks


def test_codec_round_trips_float64_without_copy():
    from fedsim.codec import from_record, to_record

    a = np.random.default_rng(0).normal(size=(5, 3))
    back = from_record(to_record({"a": a, "i": np.arange(4)}))
    assert back["a"].dtype == np.float64 and np.array_equal(back["a"], a) and not back["a"].flags.writeable
    assert np.array_equal(back["i"], np.arange(4))
    assert from_record(to_record({"a": a}), writable=True)["a"].flags.writeable


def test_byzantine_clients_are_refused_where_they_would_change_nothing(tmp_path):
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^simulation\.byzantine_fraction: 0\.25 needs a strategy"):
        scenario_config(COUNTER, tmp_path, "simulation.byzantine_fraction=0.25")
    from conftest import DIGITS

    assert scenario_config(DIGITS, tmp_path, "simulation.byzantine_fraction=0.25").simulation.byzantine_fraction == 0.25


# -- plugins from another directory: --plugin FILE.py and an entry point (issue #21) -----------------------------
PLUGIN = '''
"""A strategy of one's own, outside the repository: each client replies with its number of examples."""
from dataclasses import dataclass

from flwr.app import MetricRecord, RecordDict

from fedsim.registry import StrategySpec, register_strategy


@dataclass
class CountParams:
    scale: float = 1.0


class CountServer:
    def __init__(self, params):
        self.params = params

    def run(self, ctx):
        replies = ctx.send(RecordDict(), round=1)
        total = sum(int(r.content["count"]["n"]) for r in replies if r.ok)
        ctx.log(1, accuracy=0.0, examples=float(total))
        ctx.summary(final_accuracy=0.0, examples=total * self.params.scale)


class CountClient:
    def __init__(self, params):
        self.params = params

    def train(self, content, env):
        return RecordDict({"count": MetricRecord({"n": int(len(env.indices))})})
{extra}

register_strategy(StrategySpec(name="{name}", params=CountParams, server=CountServer, client=CountClient,
                               description="counts the clients' examples"{spec_extra}))
'''




def _fedsim(*argv: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    full.pop("FEDSIM_PLUGINS", None)
    full["PYTHONPATH"] = os.pathsep.join(p for p in [(env or {}).get("PYTHONPATH", ""), str(REPO)] if p)
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *argv], capture_output=True, text=True, env=full,
                          cwd=cwd or REPO, timeout=300)


def _plugin(tmp_path: Path, stem: str, name: str, extra: str = "", spec_extra: str = "") -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir(exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(PLUGIN.replace("{extra}", extra).replace("{name}", name).replace("{spec_extra}", spec_extra))
    (folder / f"{stem}.toml").write_text(inline_digits_scenario(name))
    return path


def test_a_plugin_file_from_another_directory_via_plugin(tmp_path):
    plugin = _plugin(tmp_path, "count_plugin", "count")
    scenario = plugin.with_suffix(".toml")
    listed = _fedsim("list", "--plugin", str(plugin))
    assert listed.returncode == 0 and "counts the clients' examples" in listed.stdout, listed.stderr
    refused = _fedsim("validate", str(scenario))  # without the plugin the name is unknown
    assert refused.returncode == 2 and "strategy.name: 'count' is not a known strategy" in refused.stderr
    assert _fedsim("validate", str(scenario), "--plugin", str(plugin)).returncode == 0
    run = _fedsim("run", str(scenario), "--plugin", str(plugin), "--out", str(tmp_path / "run"), "--quiet")
    assert run.returncode == 0, run.stderr
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["examples"] == 1437  # digits' training split


def test_a_plugin_without_reduce_is_refused_for_deploy_at_validate(tmp_path):
    plugin = _plugin(tmp_path, "noreduce_plugin", "noreduce")
    scenario = plugin.with_suffix(".toml")
    out = _fedsim("validate", str(scenario), "--plugin", str(plugin), "--nodes", "2")
    assert out.returncode == 2
    assert ("error: --nodes 2: 4 clients on 2 SuperNodes puts 2 clients on a node, which needs a client part that "
            "combines their replies") in out.stderr and "use --nodes 4" in out.stderr
    assert _fedsim("validate", str(scenario), "--plugin", str(plugin), "--nodes", "4").returncode == 0
    deploy = _fedsim("deploy", str(scenario), "--plugin", str(plugin), "--nodes", "2", "--out", str(tmp_path / "d"))
    assert deploy.returncode == 2 and "--nodes 2: 4 clients" in deploy.stderr  # before any process starts
    assert not (tmp_path / "d").exists()
    grouped = _fedsim("validate", str(scenario), "--plugin", str(plugin), "--set", "simulation.clients_per_node=2")
    assert grouped.returncode == 2 and "simulation.clients_per_node" in grouped.stderr


def test_a_declared_reducible_plugin_without_reduce_is_refused_when_it_registers(tmp_path):
    plugin = _plugin(tmp_path, "liar_plugin", "liar", spec_extra=", reducible=True")
    out = _fedsim("validate", str(plugin.with_suffix(".toml")), "--plugin", str(plugin))
    assert out.returncode == 2
    assert "error: --plugin" in out.stderr and "has no reduce(replies) hook, but the spec declares reducible" \
        in out.stderr and "Traceback" not in out.stderr


def test_plugin_errors_name_the_flag(tmp_path):
    out = _fedsim("list", "--plugin", str(tmp_path / "missing.py"))
    assert out.returncode == 2 and out.stderr.startswith("error: --plugin ") and "no such file" in out.stderr
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("x = 1\nraise RuntimeError('boom')\n")
    out = _fedsim("list", "--plugin", str(broken))
    assert out.returncode == 2 and "importing it failed (line 2): RuntimeError: boom" in out.stderr
    taken = tmp_path / "json.py"
    taken.write_text("")
    out = _fedsim("list", "--plugin", str(taken))
    assert out.returncode == 2 and "module name 'json' is taken" in out.stderr


def test_a_plugin_via_an_entry_point_of_an_installed_dist(tmp_path):
    plugin = _plugin(tmp_path, "ep_count_plugin", "ep-count")
    site = plugin.parent
    dist = site / "ep_count-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-count\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedsim.plugins]\nep-count = ep_count_plugin\n")
    env = {"PYTHONPATH": str(site)}
    listed = _fedsim("list", env=env)
    assert listed.returncode == 0 and "ep-count" in listed.stdout, listed.stderr
    run = _fedsim("run", str(plugin.with_suffix(".toml")), "--out", str(tmp_path / "run"), "--quiet", env=env)
    assert run.returncode == 0, run.stderr


def test_parts_named_by_path_are_checked_from_their_source_without_importing_them(tmp_path, monkeypatch):
    from fedsim.errors import ConfigError
    from fedsim.registry import check_parts

    (tmp_path / "srcparts_mod.py").write_text(
        "import torch_is_never_imported_here\n"
        "class Base:\n    def train(self, content, env):\n        return content\n"
        "class Client(Base):\n    def __init__(self, params):\n        pass\n"
        "class Reducing(Client):\n    reduce = staticmethod(lambda replies: replies[0])\n"
        "class Server:\n    def __init__(self, params):\n        pass\n    def run(self, ctx):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = StrategySpec(name="test-src", params=CounterParams, server="srcparts_mod:Server",
                        client="srcparts_mod:Client", reducible=True)
    with pytest.raises(ConfigError, match=r"^strategy.name: 'test-src': .*srcparts_mod:Client has no "
                                          r"reduce\(replies\) hook"):
        check_parts(spec)
    check_parts(StrategySpec(name="test-src", params=CounterParams, server="srcparts_mod:Server",
                             client="srcparts_mod:Reducing", reducible=True))  # reduce inherited
    with pytest.raises(ConfigError, match="needs a client part that combines their replies"):
        check_parts(StrategySpec(name="test-src", params=CounterParams, server="srcparts_mod:Server",
                                 client="srcparts_mod:Client"), clients_per_node=2)
    assert "srcparts_mod" not in sys.modules


@pytest.mark.parametrize("name", sorted(n for n in strategies() if not n.startswith("test-")))
def test_every_shipped_strategy_passes_the_source_check(name):
    from fedsim.registry import check_parts

    spec = strategies()[name]
    check_parts(spec, 2 if spec.reducible else 1)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("command", ["ray", "deploy"])
def test_a_plugin_file_reaches_ray_workers_and_supernodes(tmp_path, command):
    """The plugin's classes are imported in the Ray workers / the ServerApp and SuperNodes by its module name
    (FEDSIM_PLUGINS), from a working directory where the file is not on sys.path."""
    import json

    plugin = _plugin(tmp_path, f"far_{command}_plugin", f"far-{command}")
    scenario = plugin.with_suffix(".toml")
    if command == "ray":
        argv = ["run", str(scenario), "--set", "simulation.backend=ray"]
    else:
        argv = ["deploy", str(scenario), "--nodes", "4"]
    out = _fedsim(*argv, "--plugin", str(plugin), "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["examples"] == 1437
