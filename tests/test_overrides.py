"""Override precedence (issue #21): the scenario < a global --set < the variant's own set < --set LABEL:key and a
sweep point; errors name the variant; a --set or sweep a variant cannot take skips it, named, never silently."""

from __future__ import annotations

import pytest

from fedsim.cli import main
from fedsim.config import load_scenarios
from fedsim.errors import ConfigError
from fedsim.sweep import plan_jobs

SCENARIO = """
seed = 0
[data]
name = "digits"
[partition]
kind = "iid"
num_clients = 3
[model]
feature_map = "identity"
[simulation]
backend = "inline"
[strategy]
name = "fedavg"

[[variants]]
label = "afl"
set = { "strategy.name" = "afl", "rounds" = 1 }

[[variants]]
label = "fedavg"
set = { "rounds" = 4 }

[[variants]]
label = "prox"
set = { "strategy.name" = "fedprox", "strategy.proximal_mu" = 0.1 }
"""


@pytest.fixture()
def scenario(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO)
    return path


def test_a_variants_own_set_beats_a_global_set(scenario):
    notes: list[str] = []
    runs = dict(load_scenarios(scenario, ["rounds=5", "strategy.proximal_mu=0.5"], notes=notes))
    assert runs["afl"].rounds == 1 and runs["fedavg"].rounds == 4  # their own
    assert runs["prox"].rounds == 5 and runs["prox"].strategy.params.proximal_mu == 0.1
    assert any("variant 'fedavg' keeps its own rounds = 4" in n for n in notes)
    assert any("variant 'prox' keeps its own strategy.proximal_mu" in n for n in notes)


def test_label_targets_one_variant_and_beats_its_set(scenario):
    runs = dict(load_scenarios(scenario, ["fedavg:rounds=7", "prox:strategy.proximal_mu=0.3", "rounds=2"]))
    assert runs["fedavg"].rounds == 7 and runs["prox"].rounds == 2 and runs["afl"].rounds == 1
    assert runs["prox"].strategy.params.proximal_mu == 0.3
    with pytest.raises(ConfigError, match=r"^--set nope:\.\.\.: no variant is labelled 'nope'; variants are afl"):
        load_scenarios(scenario, ["nope:rounds=2"])
    with pytest.raises(ConfigError, match="LABEL:key=value"):
        load_scenarios(scenario, [":rounds=2"])


def test_errors_name_the_variant(scenario):
    with pytest.raises(ConfigError, match=r"^variant 'afl': rounds: 3 rounds requested, but AFL is single-round"):
        load_scenarios(scenario, ["afl:rounds=3"])
    with pytest.raises(ConfigError, match=r"^variant 'prox': strategy.proximal_mu: -1.0 is out of range"):
        load_scenarios(scenario, ["prox:strategy.proximal_mu=-1.0"])
    with pytest.raises(ConfigError, match=r"^variant 'fedavg': client.lr: 0(.0)? is out of range"):
        load_scenarios(scenario, ["fedavg:client.lr=0"])


def test_a_global_rounds_skips_strategies_that_define_theirs(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.replace(', "rounds" = 1 }', ' }'))  # afl without rounds of its own
    notes: list[str] = []
    runs = dict(load_scenarios(path, ["rounds=5"], notes=notes))
    assert runs["afl"].rounds == 1 and runs["prox"].rounds == 5
    assert any("not applied to variant 'afl' ('afl' defines its own rounds)" in n for n in notes)


def test_a_sweep_wins_over_the_variants_set_and_names_a_variant_it_skips(scenario, tmp_path, capsys):
    jobs, _ = plan_jobs(scenario, [], [], tmp_path / "o", sweeps=["strategy.proximal_mu=0.01,0.5"], show=True)
    names = sorted(j.name for j in jobs)
    assert names == ["afl", "fedavg", "prox/strategy.proximal_mu=0.01", "prox/strategy.proximal_mu=0.5"]
    err = capsys.readouterr().err
    assert "variant 'afl' runs once" in err and "'afl' has no parameter 'proximal_mu'" in err
    assert "variant 'fedavg' runs once" in err
    with pytest.raises(ConfigError, match="^strategy.nope: no variant's strategy has this setting"):
        plan_jobs(scenario, [], [], tmp_path / "o", sweeps=["strategy.nope=1,2"])


def test_the_command_line_names_the_variant(scenario, capsys):
    assert main(["validate", str(scenario), "--set", "afl:rounds=3"]) == 2
    assert capsys.readouterr().err.startswith("error: variant 'afl': rounds: 3 rounds requested")
    assert main(["validate", str(scenario), "--set", "rounds=5"]) == 0
    assert "note: --set rounds: variant 'fedavg' keeps its own rounds = 4" in capsys.readouterr().err
