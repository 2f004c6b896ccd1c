"""Byzantine clients (``simulation.byzantine_fraction``): a seeded set of clients whose nodes replace their model
update d by factor * d; FedAvg breaks, the robust aggregators resist, and the set is the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DIGITS, scenario_config
from fedsim.clients.sgd import SGDClient
from fedsim.engine.node import byzantine_clients, byzantine_factor, byzantine_update
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError
from fedsim.algorithms.fedavg import protocol

ATTACK = ["simulation.byzantine_fraction=0.17", "simulation.byzantine_mode=sign-flip", "simulation.byzantine_scale=4"]


def _run(tmp_path, label, *overrides):
    config = scenario_config(DIGITS, tmp_path, *overrides, filename=f"{label}.toml")
    summary = run_scenario(config, tmp_path / label, show_progress=False)
    return summary, config


def test_fedavg_breaks_and_krum_and_fedmedian_resist_one_sign_flipping_client(tmp_path):
    # 6 IID clients, 3 rounds of 1 epoch; client 0 (seeded) sends -4 times its update
    base = ["rounds=3", "partition.kind=iid", "client.epochs=1"]
    acc = {}
    for name, extra in [("fedavg", []), ("krum", ["strategy.num_malicious_nodes=1"]), ("fedmedian", [])]:
        clean, _ = _run(tmp_path, f"{name}-clean", *base, f"strategy.name={name}", *extra)
        attacked, _ = _run(tmp_path, f"{name}-attacked", *base, f"strategy.name={name}", *extra, *ATTACK)
        assert attacked["byzantine_clients"] == [0] and attacked["byzantine_factor"] == -4.0
        assert "byzantine_clients" not in clean
        acc[name] = (clean["final_accuracy"], attacked["final_accuracy"])
    # measured (seed 3): fedavg 0.658 -> 0.100, krum 0.556 -> 0.783, fedmedian 0.658 -> 0.647
    assert acc["fedavg"][1] < acc["fedavg"][0] - 0.3
    for name in ("krum", "fedmedian"):
        assert acc[name][1] > acc["fedavg"][1] + 0.3, (name, acc)


def test_the_attack_replaces_the_update_relative_to_the_received_model(tmp_path, monkeypatch):
    seen = []
    train = SGDClient.train

    def spying(self, content, env):
        out = train(self, content, env)
        received = {k: np.array(v) for k, v in protocol.parse_train(content)[0].items()}
        sent, n, _ = protocol.parse_reply(out)
        seen.append((env.partition_id, received, {k: np.array(v) for k, v in sent.items()}, n))
        return out

    monkeypatch.setattr(SGDClient, "train", spying)
    attack = ["simulation.byzantine_fraction=0.34", "simulation.byzantine_mode=scale"]  # 2 clients, factor 10
    summary, config = _run(tmp_path, "scaled", "rounds=1", *attack)
    bad = set(summary["byzantine_clients"])
    assert len(bad) == 2 and summary["byzantine_factor"] == 10.0 == byzantine_factor(config)
    weights = np.array([n for *_, n in seen], dtype=np.float64)
    weights /= weights.sum()
    model = torch.load(tmp_path / "scaled" / "model.pt", weights_only=False).state_dict()
    for key, value in model.items():
        if not value.is_floating_point():
            continue
        sent = [received[key] + 10.0 * (honest[key].astype(np.float64) - received[key]) if pid in bad else honest[key]
                for pid, received, honest, _ in seen]
        want = sum(w * np.asarray(s, np.float64) for w, s in zip(weights, sent))
        np.testing.assert_allclose(value.numpy(), want, atol=2e-5, rtol=1e-5, err_msg=key)


def test_grouped_nodes_attack_each_client_before_combining(tmp_path):
    single, _ = _run(tmp_path, "single", "rounds=1", *ATTACK)
    grouped, _ = _run(tmp_path, "grouped", "rounds=1", *ATTACK, "simulation.clients_per_node=2")
    assert grouped["byzantine_clients"] == single["byzantine_clients"]
    assert grouped["bytes_up"] == single["bytes_up"]
    a = torch.load(tmp_path / "single" / "model.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "grouped" / "model.pt", weights_only=False).state_dict()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_byzantine_update_leaves_integer_counters_alone():
    received = {"w": np.ones(3, np.float32), "n": np.array(4, np.int64)}
    local = {"w": np.array([2.0, 1.0, 0.0], np.float32), "n": np.array(9, np.int64)}
    out = byzantine_update(local, received, -4.0)
    np.testing.assert_array_equal(out["w"], np.array([-3.0, 1.0, 5.0], np.float32))
    assert out["w"].dtype == np.float32 and int(out["n"]) == 9


def test_the_byzantine_set_is_seeded_and_the_same_in_another_process(tmp_path):
    config = scenario_config(DIGITS, tmp_path, "partition.num_clients=20", "simulation.byzantine_fraction=0.25")
    here = sorted(byzantine_clients(config))
    assert len(here) == 5 and here == sorted(byzantine_clients(config))
    other_seed = scenario_config(DIGITS, tmp_path, "partition.num_clients=20", "simulation.byzantine_fraction=0.25",
                                 "seed=4", filename="other.toml")
    assert sorted(byzantine_clients(other_seed)) != here
    code = ("import json, sys; sys.path.insert(0, 'tests'); from conftest import scenario_config, DIGITS; "
            "from pathlib import Path; from fedsim.engine.node import byzantine_clients; "
            f"c = scenario_config(DIGITS, Path({str(tmp_path)!r}), 'partition.num_clients=20', "
            "'simulation.byzantine_fraction=0.25', filename='sub.toml'); print(json.dumps(sorted(byzantine_clients(c))))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_no_byzantine_clients_by_default(tmp_path):
    config = scenario_config(DIGITS, tmp_path)
    assert byzantine_clients(config) == frozenset()


@pytest.mark.parametrize("override, field", [
    ("simulation.byzantine_fraction=1.5", "simulation.byzantine_fraction"),
    ("simulation.byzantine_mode=noise", "simulation.byzantine_mode"),
    ("simulation.byzantine_scale=0", "simulation.byzantine_scale"),
])
def test_invalid_byzantine_settings_are_refused(tmp_path, override, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        scenario_config(DIGITS, tmp_path, override)
