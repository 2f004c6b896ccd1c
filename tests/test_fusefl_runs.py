"""FuseFL and the one-shot baselines end to end (inline backend: the same Flower apps, messages serialized) on a
real Fashion-MNIST slice: rounds, exact uploads per stage, accuracy against the baselines, saved models, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from conftest import assert_config_error_names, fusefl_scenario, scenario_config
from fedsim.clients.fusefl import FuseFLClient
from fedsim.codec import to_record
from fedsim.analytic import RidgeStatistics, ridge_solve
import fedsim.scenario as engine_client
from fedsim.engine.accounting import failing_clients, record_nbytes
from fedsim.algorithms.fusefl.protocol import COLUMN_PREFIX, META_PREFIX, WEIGHT_KEY, stage_message, stage_training
from fedsim.scenario import partition_for, scenario_model
from fedsim.engine.node import ClientEnv
from fedsim.engine.runner import run_scenario
from fedsim.frameworks.oneshot import FusedNet, build_fused, fused_embedding, stage_modules
from fedsim.nn.training import evaluate

# Dirichlet(0.1) over 5 clients (FuseFL's default client count), a small cnn, short local training.
SCENARIO = fusefl_scenario(max_train=3000, max_test=1000, num_clients=5, alpha=0.1, width=8)


def _config(tmp_path, *overrides):
    return scenario_config(SCENARIO, tmp_path, *overrides)


def _run(tmp_path, name, *overrides):
    config = _config(tmp_path, *overrides)
    out = tmp_path / name
    summary = run_scenario(config, out, show_progress=False)
    return config, summary, out


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """FuseFL (ridge head), one-shot FedAvg and the ensemble on the same partition and seed."""
    tmp = tmp_path_factory.mktemp("trio")
    return {
        "fusefl": _run(tmp, "fusefl", 'strategy.head="ridge"'),
        "fedavg-oneshot": _run(tmp, "oneshot", 'strategy.name="fedavg-oneshot"'),
        "ensemble": _run(tmp, "ensemble", 'strategy.name="ensemble"'),
    }


def _expected_upload(pid, n, arrays, head=None):
    """The bytes of exactly one column (+ the head, the example count and loss): what a client's reply weighs."""
    reply = RecordDict({f"{COLUMN_PREFIX}{pid}": to_record(arrays),
                        f"{META_PREFIX}{pid}": MetricRecord({WEIGHT_KEY: n, "train_loss": 0.5})})
    if head is not None:
        reply[f"head.{pid}"] = to_record(head)
    return record_nbytes(reply)


def test_k_stages_take_k_rounds_and_each_client_uploads_exactly_its_block(tmp_path):
    # head "avg": K rounds (the default recalibrated head adds a statistics round: tests/test_fusefl_protocol.py)
    config, summary, out = _run(tmp_path, "ff", "strategy.stages=3", 'strategy.merge="sum"', 'strategy.head="avg"')
    metrics = pd.read_csv(out / "metrics.csv")
    assert summary["rounds"] == 3 and list(metrics["round"]) == [1, 2, 3]
    assert summary["messages_up"] == 3 * 5 and summary["messages_down"] == 3 * 5
    assert np.isnan(metrics["accuracy"].iloc[0]) and metrics["accuracy"].iloc[-1] > 0.1
    net = scenario_model(config, 10, (1, 28, 28))
    templates = stage_modules(net, 3)
    sizes = pd.read_csv(out / "partition.csv")["size"].tolist()
    for k in range(3):
        # column of stage k = block k (+ nothing for "sum"); the final stage adds the classifier head
        arrays = {key: v.numpy() for key, v in templates[k].state_dict().items()}
        arrays = {f"block.{key}": v for key, v in arrays.items()}
        head = {key: v.numpy() for key, v in net.head.state_dict().items()} if k == 2 else None
        expected = sum(_expected_upload(pid, n, arrays, head) for pid, n in enumerate(sizes))
        assert metrics["round_bytes_up"].iloc[k] == expected
    stages = pd.read_csv(out / "stages.csv")
    assert stages["column_parameters"].tolist() == [sum(p.numel() for p in t.parameters()) for t in templates]
    assert summary["block_parameters_per_stage"] == stages["column_parameters"].tolist()
    # the fused model has one column per client and stage: 5x the blocks, one (averaged) head
    assert summary["num_parameters"] == 5 * (summary["single_model_parameters"] - 650) + 650
    assert "grows" in summary["model_note"]


def test_client_uploads_its_column_state_and_nothing_else(tmp_path):
    config = _config(tmp_path, 'strategy.merge="conv1x1"')
    parts = partition_for(config)
    pid = int(np.argmax([len(p) for p in parts]))
    env = ClientEnv(config, pid, 1, parts[pid])
    client = FuseFLClient(config.strategy.params)
    first = client.train(stage_message(1, [], None, stage_training(config.strategy.params, config.client, 1)), env)
    assert set(first.keys()) == {f"{COLUMN_PREFIX}{pid}", f"{META_PREFIX}{pid}"}
    net = scenario_model(config, 10, (1, 28, 28))
    template = stage_modules(net, 2)
    got = first[f"{COLUMN_PREFIX}{pid}"]
    assert {k: v.numpy().size for k, v in got.items()} == \
        {f"block.{k}": v.numel() for k, v in template[0].state_dict().items()}
    # stage 2 on a lower part of 3 columns: the upload is the conv1x1 adaptor (3c -> c) + block 2 + the head
    lower = build_fused(template, [3], "conv1x1", (1, 28, 28))
    arrays = {k: v.numpy() for k, v in lower.state_dict().items()}
    env2 = ClientEnv(config, pid, 2, parts[pid])
    second = client.train(stage_message(2, [3], arrays, stage_training(config.strategy.params, config.client, 2)),
                          env2)
    col = second[f"{COLUMN_PREFIX}{pid}"]
    c = template[0][-1].conv.out_channels
    assert tuple(col["merge.adaptor.weight"].shape) == (c, 3 * c, 1, 1)
    assert {k for k in col.keys() if k.startswith("block.")} == {f"block.{k}" for k in template[1].state_dict()}
    assert set(second[f"head.{pid}"].keys()) == set(net.head.state_dict())
    assert int(second[f"{META_PREFIX}{pid}"][WEIGHT_KEY]) == len(parts[pid])


def test_fusefl_beats_one_shot_fedavg_and_the_ensemble_on_dirichlet_0_1(trio):
    acc = {name: s["final_accuracy"] for name, (_, s, _) in trio.items()}
    # measured (seed 0): fusefl (ridge head) 0.797, one-shot FedAvg (uniform) 0.349, ensemble (mean logits) 0.561,
    # best local model 0.372 (the default recalibrated head: 0.759; head "avg": 0.453)
    assert acc["fusefl"] > 0.72
    assert acc["fusefl"] > acc["fedavg-oneshot"] + 0.15
    assert acc["fusefl"] > acc["ensemble"] + 0.15
    ens = trio["ensemble"][1]
    assert ens["best_local_accuracy"] <= acc["ensemble"] + 0.1 and ens["mean_local_accuracy"] < 0.5
    # same local training in both baselines: identical uploads
    assert trio["fedavg-oneshot"][1]["bytes_up"] == trio["ensemble"][1]["bytes_up"]


@pytest.mark.parametrize("name", ["fusefl", "fedavg-oneshot", "ensemble"])
def test_saved_model_reloads_and_reproduces_the_reported_accuracy(trio, name):
    config, summary, out = trio[name]
    model = torch.load(out / "model.pt", weights_only=False)
    assert isinstance(model, torch.nn.Module)
    test = engine_client.test_split(config)
    res = evaluate(model, test.x, test.y)
    assert res["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert sum(p.numel() for p in model.parameters()) == summary["num_parameters"]


def test_ridge_head_is_the_centralized_ridge_solution_on_the_fused_features(trio):
    config, summary, out = trio["fusefl"]
    assert summary["rounds"] == 3  # K = 2 stages + the statistics round
    model = torch.load(out / "model.pt", weights_only=False)
    train = engine_client.train_split(config)
    net = scenario_model(config, 10, (1, 28, 28))
    with torch.no_grad():
        e = fused_embedding(FusedNet(model.stages), net.head, train.x).double()
    z = torch.cat([e, torch.ones(len(e), 1, dtype=torch.float64)], 1).numpy()
    stats = RidgeStatistics.from_data(z, train.labels, 10)
    w = ridge_solve(stats.gram, stats.cross, config.strategy.params.ridge_gamma)
    np.testing.assert_allclose(model.head.fc.weight.detach().double().numpy(), w[:-1].T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.head.fc.bias.detach().double().numpy(), w[-1], rtol=1e-4, atol=1e-6)


def test_failed_clients_leave_their_column_out(tmp_path):
    config, summary, out = _run(tmp_path, "ff", "simulation.failure_rate=0.2", 'strategy.merge="conv1x1"',
                                'strategy.head="logits"')
    failed = [failing_clients(config.seed, r, 5, 0.2) for r in (1, 2)]
    assert all(len(f) == 1 for f in failed)
    assert summary["columns_per_stage"] == [4, 4]
    model = torch.load(out / "model.pt", weights_only=False)
    assert [len(s.columns) for s in model.stages] == [4, 4] and len(model.head) == 4
    assert model.stages[1].columns[0].merge.num_inputs == 4  # stage 2 reads the 4 columns of stage 1
    assert summary["failed_client_rounds"] == 2
    assert json.loads((out / "summary.json").read_text())["final_accuracy"] > 0.1


BAD = [
    (["rounds=5"], "rounds", "set rounds = 3"),  # K = 2 + the recalibration round
    (["rounds=5", 'strategy.head="avg"'], "rounds", "set rounds = 2"),
    (["rounds=2", 'strategy.head="ridge"'], "rounds", "set rounds = 3"),
    (["strategy.stages=0"], "strategy.stages", ">= 1"),
    (["strategy.stages=5"], "strategy.stages", "blocks"),
    (['strategy.merge="max"'], "strategy.merge", "conv1x1"),
    (['strategy.head="vote"'], "strategy.head", "ridge"),
    (['strategy.head_features="sum"'], "strategy.head_features", "concat"),
    (["strategy.ridge_gamma=-1"], "strategy.ridge_gamma", ">= 0"),
    (["strategy.epochs_per_stage=0"], "strategy.epochs_per_stage", ">= 1"),
    (["client.epochs=0"], "client.epochs", "trains nothing"),
    (['strategy.name="fedavg-oneshot"', "rounds=3"], "rounds", "one-shot"),
    (['strategy.name="fedavg-oneshot"', 'strategy.weighting="size"'], "strategy.weighting", "uniform"),
    (['strategy.name="ensemble"', 'strategy.combine="vote"'], "strategy.combine", "softmax"),
]


@pytest.mark.parametrize("overrides, field, fragment", BAD)
def test_bad_settings_name_the_field(tmp_path, overrides, field, fragment):
    assert_config_error_names(field, fragment, lambda: _config(tmp_path, *overrides))


def test_rounds_default_to_the_stages(tmp_path):
    assert _config(tmp_path, "strategy.stages=4").rounds == 5  # + the recalibration round of the default head
    assert _config(tmp_path, "strategy.stages=4", 'strategy.head="avg"').rounds == 4
    assert _config(tmp_path, "strategy.stages=4", 'strategy.head="logits"').rounds == 4
    assert _config(tmp_path, "strategy.stages=3", 'strategy.head="ridge"').rounds == 4
    assert _config(tmp_path, 'strategy.name="ensemble"').rounds == 1


@pytest.mark.slow
@pytest.mark.ray
def test_fusefl_through_flowers_ray_backend_matches_inline(tmp_path):
    """The same FuseFL run on Flower's Ray simulation backend: same rounds, same bytes, same accuracy."""
    _, ray, _ = _run(tmp_path, "ray", 'strategy.head="ridge"', 'simulation.backend="ray"', "simulation.num_cpus=1")
    _, inline, _ = _run(tmp_path, "inline", 'strategy.head="ridge"')
    assert ray["status"] == "completed" and ray["rounds"] == inline["rounds"] == 3
    assert ray["messages_up"] == 15 and ray["bytes_up"] == inline["bytes_up"]
    assert ray["bytes_down"] == inline["bytes_down"]
    # torch's thread count differs between a Ray actor (1) and this process: allow float-level differences
    assert ray["final_accuracy"] == pytest.approx(inline["final_accuracy"], abs=0.02)


@pytest.mark.slow
def test_default_fusefl_is_ten_points_above_one_shot_fedavg_and_above_the_ensemble(tmp_path):
    """The issue's goal in the benchmark's own setting (scripts/bench_fusefl.py, docs/results-fusefl.md: alpha 0.1,
    seed 0, 12,000-image training slice, 5 clients, cnn width 16, client.epochs = 2 in total for every method,
    K = 2, default merge and head): FuseFL >= one-shot FedAvg + 10 points and above the ensemble (mean logits)."""
    text = SCENARIO.replace("max_train = 3000\nmax_test = 1000\n", "max_train = 12000\n")
    assert "max_test" not in text
    full = ["model.width=16", "client.lr=0.01", "client.momentum=0.9", "seed=0"]
    fusefl = run_scenario(scenario_config(text, tmp_path, *full), tmp_path / "fusefl", show_progress=False)
    oneshot = run_scenario(scenario_config(text, tmp_path, *full, 'strategy.name="fedavg-oneshot"'),
                           tmp_path / "oneshot", show_progress=False)
    ensemble = run_scenario(scenario_config(text, tmp_path, *full, 'strategy.name="ensemble"'),
                            tmp_path / "ensemble", show_progress=False)
    assert fusefl["rounds"] == 3 and fusefl["local_epochs_total"] == 2
    # measured (docs/results-fusefl.md, seed 0): 0.7877 vs one-shot FedAvg 0.2883 and the ensemble 0.5458
    assert fusefl["final_accuracy"] >= oneshot["final_accuracy"] + 0.10
    assert fusefl["final_accuracy"] > ensemble["final_accuracy"]
