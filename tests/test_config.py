"""Scenario validation: every bad field is reported by its dotted name, with the value and what is allowed."""

from __future__ import annotations

import pytest

from fedsim.config import load_scenario, load_scenarios, parse_value
from fedsim.errors import ConfigError

BASE = """
seed = 1
rounds = 2
[data]
name = "digits"
[partition]
kind = "dirichlet"
num_clients = 4
alpha = 0.5
[strategy]
name = "fedavg"
"""

# two variants on the same data: FedAvg and FedProx (mu 0.1)
AVG_AND_PROX = BASE + """
[[variants]]
label = "avg"
[[variants]]
label = "prox"
set = { "strategy.name" = "fedprox", "strategy.proximal_mu" = 0.1 }
"""

# (override, field that must open the error message, a fragment the message must contain)
BAD = [
    ("data.name=imagenet21k", "data.name", "fashion-mnist"),
    ("data.max_train=0", "data.max_train", ">= 1"),
    ("partition.kind=zipf", "partition.kind", "dirichlet"),
    ("partition.num_clients=0", "partition.num_clients", ">= 1"),
    ("partition.alpha=-1", "partition.alpha", "> 0"),
    ("partition.alpha='high'", "partition.alpha", "a number"),
    ("partition.classes_per_client=0", "partition.classes_per_client", ">= 1"),
    ("partition.colour=1", "partition.colour", "allowed settings"),
    ("stream.kind=endless", "stream.kind", "class-incremental"),
    ("stream.tasks=0", "stream.tasks", ">= 1"),
    ("stream.imbalance=zipf", "stream.imbalance", "long-tail"),
    ("stream.imbalance_ratio=0.5", "stream.imbalance_ratio", ">= 1"),
    ("model.name=transformer", "model.name", "cnn"),
    ("model.feature_dim=0", "model.feature_dim", ">= 1"),
    ("client.lr=0", "client.lr", "> 0"),
    ("client.epochs=-1", "client.epochs", ">= 0"),
    ("client.batch_size=0", "client.batch_size", ">= 1"),
    ("client.optimizer=lbfgs", "client.optimizer", "sgd"),
    ("client.momentum=1.5", "client.momentum", "[0, 1)"),
    ("simulation.backend=dask", "simulation.backend", "ray"),
    ("simulation.failure_rate=1.0", "simulation.failure_rate", "[0, 1)"),
    ("simulation.num_cpus=0", "simulation.num_cpus", "> 0"),
    ("simulation.device=tpu", "simulation.device", "cuda"),
    ("simulation.clients_per_node=0", "simulation.clients_per_node", ">= 1"),
    ("strategy.name=fedsgd9", "strategy.name", "fedavg"),
    ("strategy.fraction_train=2", "strategy.fraction_train", "[0, 1]"),
    ("strategy.learning_rate=0.1", "strategy.learning_rate", "fraction_train"),
    ("rounds=0", "rounds", ">= 1"),
    ("seed=-3", "seed", ">= 0"),
    ("seed=1.5", "seed", "an integer"),
    ("colour=1", "colour", "top-level settings"),
    ("evaluation.every=0", "evaluation.every", ">= 1"),
]


@pytest.fixture()
def scenario(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(BASE)
    return path


def test_base_scenario_is_valid(scenario):
    config = load_scenario(scenario)
    assert config.seed == 1 and config.rounds == 2
    assert config.partition.kind == "dirichlet" and config.partition.alpha == 0.5
    assert config.strategy.name == "fedavg" and config.strategy.params.fraction_train == 1.0
    assert config.num_nodes == 4


@pytest.mark.parametrize("override, field, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_field_is_named(scenario, override, field, fragment):
    with pytest.raises(ConfigError) as info:
        load_scenario(scenario, [override])
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert fragment in message, message


def test_at_least_fifteen_bad_scenarios():
    assert len({field for _, field, _ in BAD}) >= 15


def test_overrides_types_and_nesting(scenario):
    config = load_scenario(scenario, ["partition.alpha=0.1", "client.lr=1", "data.name='fashion-mnist'",
                                      "simulation.backend=inline"])
    assert config.partition.alpha == 0.1
    assert isinstance(config.client.lr, float) and config.client.lr == 1.0
    assert config.data.name == "fashion-mnist"
    assert config.simulation.backend == "inline"


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("dirichlet") == "dirichlet"


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="^scenario: file"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)


def test_set_without_equals(scenario):
    with pytest.raises(ConfigError, match="key=value"):
        load_scenario(scenario, ["partition.alpha"])


def test_variants_share_the_base_and_need_unique_labels(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(AVG_AND_PROX)
    runs = load_scenarios(path, ["rounds=3"])
    assert [label for label, _ in runs] == ["avg", "prox"]
    assert all(c.rounds == 3 and c.partition.alpha == 0.5 for _, c in runs)
    assert runs[1][1].strategy.params.proximal_mu == 0.1
    path.write_text(BASE + '[[variants]]\nlabel = "a"\n[[variants]]\nlabel = "a"\n')
    with pytest.raises(ConfigError, match=r"^variants\[1\].label"):
        load_scenarios(path)


def test_grouping_needs_a_reducible_client(scenario):
    config = load_scenario(scenario, ["simulation.clients_per_node=2"])  # SGD clients reduce by weighted average
    assert config.num_nodes == 2


def test_strategies_without_reduce_group_clients_where_the_server_addresses_each(scenario):
    config = load_scenario(scenario, ["strategy.name='krum'", "simulation.clients_per_node=2"])
    assert config.num_nodes == 2  # Krum's clients answer one by one (fedsim.engine.client_grid), never reduced
    with pytest.raises(ConfigError, match=r"^simulation.clients_per_node: 2 needs a strategy whose client part can "
                                          r"combine replies .* or whose server addresses each client; 'fedbuff'"):
        load_scenario(scenario, ["strategy.name='fedbuff'", "simulation.clients_per_node=2"])


def test_centralized_forces_one_client(scenario):
    config = load_scenario(scenario, ["strategy.name=centralized"])
    assert config.num_clients == 1 and config.partition.kind == "iid"


def test_strategy_override_applies_to_the_variants_that_have_it(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(AVG_AND_PROX)
    # issue #21 reverses the precedence: the variant's own set (proximal_mu = 0.1) beats a global --set;
    # LABEL:key targets the variant and beats its set
    runs = dict(load_scenarios(path, ["strategy.proximal_mu=0.5"]))
    assert runs["prox"].strategy.params.proximal_mu == 0.1 and not hasattr(runs["avg"].strategy.params, "proximal_mu")
    runs = dict(load_scenarios(path, ["prox:strategy.proximal_mu=0.5"]))
    assert runs["prox"].strategy.params.proximal_mu == 0.5 and not hasattr(runs["avg"].strategy.params, "proximal_mu")
    with pytest.raises(ConfigError, match="^strategy.mu: no variant's strategy has this setting"):
        load_scenarios(path, ["strategy.mu=0.5"])
    assert [label for label, _ in load_scenarios(path, only=["prox"])] == ["prox"]
    with pytest.raises(ConfigError, match="^--only nope"):
        load_scenarios(path, only=["nope"])
