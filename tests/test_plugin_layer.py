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

from conftest import scenario_config
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

COUNTER = """
seed = 0
rounds = 1
[data]
name = "digits"
[partition]
kind = "iid"
num_clients = 4
[simulation]
backend = "inline"
[strategy]
name = "test-counter"
"""


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
