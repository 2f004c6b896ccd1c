"""FuseFL's protocol as published (issue #11): warm start across stages, one training budget, the recalibration
round and its bytes, the paper's baseline definitions (mean logits, uniform average) checked by hand, the
recalibrated ensemble, per-variant model widths. Small real Fashion-MNIST slices, inline backend."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import fedsim.clients.fusefl as fusefl_client
import fedsim.clients.oneshot as oneshot_client
from conftest import assert_config_error_names, fusefl_scenario, scenario_config
from fedsim.clients.fusefl import OWN_KEY, TRAINED_KEY, FuseFLClient, client_stage_model
from fedsim.clients.oneshot import LocalModelClient
from fedsim.codec import from_record
from fedsim.config import load_scenarios
from fedsim.engine.accounting import record_nbytes
from fedsim.engine.node import ClientEnv
from fedsim.engine.runner import run_scenario
from fedsim.algorithms.fusefl.learner import StageModel
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.frameworks.oneshot import Column, Merge, build_fused, stage_modules, stage_output_shapes
from fedsim.frameworks.oneshot import class_statistics_of as class_moments_of
from fedsim.nn.models import num_parameters
from fedsim.algorithms.fusefl.protocol import COLUMN_PREFIX, FuseFLParams, stage_epochs, stage_message, stage_training
from fedsim.frameworks.oneshot_protocol import MODEL_PREFIX, class_statistics_reply
from fedsim.scenario import partition_for, scenario_model, test_split
from fedsim.nn.training import arrays_to_state, train_epochs

SCENARIO = fusefl_scenario(max_train=2000, max_test=500, num_clients=4, alpha=0.3, width=4)


def _config(tmp_path, *overrides):
    return scenario_config(SCENARIO, tmp_path, *overrides)


def _run(tmp_path, name, *overrides):
    config = _config(tmp_path, *overrides)
    summary = run_scenario(config, tmp_path / name, show_progress=False)
    return config, summary, tmp_path / name


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- warm start --------------------------------------------------------------------------------------------------
def test_warm_start_continues_the_clients_own_upper_blocks_and_head(tmp_path):
    config = _config(tmp_path, "strategy.stages=3", "client.epochs=3", 'strategy.merge="conv1x1"')
    p = config.strategy.params
    parts = partition_for(config)
    pid = int(np.argmax([len(q) for q in parts]))
    env1 = ClientEnv(config, pid, 1, parts[pid])
    client = FuseFLClient(p)
    first = client.train(stage_message(1, [], None, stage_training(p, config.client, 1)), env1)
    # stage 2 on top of a fused stage 1 of 2 columns: this client's block 1 and a perturbed copy
    col = from_record(first[f"{COLUMN_PREFIX}{pid}"])
    net = scenario_model(config, 10, (1, 28, 28))
    templates = stage_modules(net, 3)
    lower = build_fused(templates, [2], "conv1x1", (1, 28, 28))
    state = {}
    for m in range(2):
        for k, v in col.items():
            state[f"stages.0.columns.{m}.{k}"] = torch.as_tensor(np.array(v)) * (1.0 if m == 0 else 0.9)
    lower.load_state_dict(state)
    lower_arrays = {k: v.numpy() for k, v in lower.state_dict().items()}
    env2 = ClientEnv(config, pid, 2, parts[pid], state=env1.state)
    second = client.train(stage_message(2, [2], lower_arrays, stage_training(p, config.client, 2)), env2)
    own = from_record(env2.state[OWN_KEY])

    # by hand: the same client trained continuously (stage 1, then stage 2 with its trained blocks 2..3 and head)
    data = env1.train_data()
    c = config.client
    model1 = client_stage_model(env1, p, 1, [], None)
    train_epochs(model1, data.x, data.y, epochs=stage_epochs(p, 3, 1), batch_size=c.batch_size, lr=c.lr,
                 momentum=c.momentum, seed=env1.seed)
    shape = stage_output_shapes(templates[:1], (1, 28, 28))[-1]
    lower2 = build_fused(templates, [2], "conv1x1", (1, 28, 28))
    arrays_to_state(lower2, lower_arrays)
    model2 = StageModel(lower2, Column(model1.upper[0], Merge("conv1x1", 2, shape)),
                        nn.Sequential(*model1.upper[1:]), model1.head)
    train_epochs(model2, data.x, data.y, epochs=stage_epochs(p, 3, 2), batch_size=c.batch_size, lr=c.lr,
                 momentum=c.momentum, seed=env2.seed)
    fresh = stage_modules(scenario_model(config, 10, (1, 28, 28)), 3)[2]
    for key, value in model2.upper[0].state_dict().items():
        assert np.array_equal(own[f"stage2.{key}"], value.numpy()), key  # equals continued local training
    for key, value in model2.head.state_dict().items():
        assert np.array_equal(own[f"head.{key}"], value.numpy()), key
    assert any(not np.array_equal(own[f"stage2.{k}"], v.numpy()) for k, v in fresh.state_dict().items()
               if v.is_floating_point())  # and differs from a fresh initialization
    uploaded = from_record(second[f"{COLUMN_PREFIX}{pid}"])
    for key, value in model2.column.state_dict().items():
        assert np.array_equal(uploaded[key], value.numpy()), key
    assert int(env2.state[TRAINED_KEY]["stage"]) == 2

    # without warm start the client restarts its blocks from the common initialization (fedsim 0.1's form)
    cold = FuseFLClient(FuseFLParams(**{**p.__dict__, "warm_start": False}))
    env_cold = ClientEnv(config, pid, 2, parts[pid], state=env1.state)
    reply = cold.train(stage_message(2, [2], lower_arrays, stage_training(p, config.client, 2)), env_cold)
    assert not np.array_equal(from_record(reply[f"{COLUMN_PREFIX}{pid}"])["block.0.conv.weight"],
                              uploaded["block.0.conv.weight"])


# -- one training budget -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs, stages, expected", [(4, 2, [2, 2]), (3, 2, [2, 1]), (5, 3, [2, 2, 1]),
                                                      (1, 2, [1, 0])])
def test_the_total_budget_is_spread_over_the_stages_remainder_first(epochs, stages, expected):
    p = FuseFLParams(stages=stages)
    assert [stage_epochs(p, epochs, k) for k in range(1, stages + 1)] == expected
    assert [stage_epochs(FuseFLParams(stages=stages, epochs_per_stage=3), epochs, k)
            for k in range(1, stages + 1)] == [3] * stages  # the per-stage form


def _count_steps(monkeypatch, module):
    steps: dict[int, int] = {}
    real = module.train_epochs

    def counting(model, x, y, **kw):
        out = real(model, x, y, **kw)
        steps[len(y)] = steps.get(len(y), 0) + int(out["steps"])
        return out

    monkeypatch.setattr(module, "train_epochs", counting)
    return steps


def test_fusefl_takes_as_many_local_optimizer_steps_as_one_shot_fedavg(tmp_path, monkeypatch):
    fusefl_steps = _count_steps(monkeypatch, fusefl_client)
    oneshot_steps = _count_steps(monkeypatch, oneshot_client)
    _, ff, _ = _run(tmp_path, "ff", "client.epochs=3", 'strategy.head="avg"')
    _, one, _ = _run(tmp_path, "one", "client.epochs=3", 'strategy.name="fedavg-oneshot"')
    sizes = [len(q) for q in partition_for(_config(tmp_path))]
    expected = {n: 3 * math.ceil(n / 32) for n in sizes if n > 0}
    assert fusefl_steps == oneshot_steps == expected  # per client (keyed by its data size)
    assert ff["epochs_per_stage"] == [2, 1] and ff["local_epochs_total"] == 3
    fusefl_steps.clear()
    _, per_stage, _ = _run(tmp_path, "ps", "client.epochs=3", 'strategy.head="avg"', "strategy.epochs_per_stage=3")
    assert fusefl_steps == {n: 2 * v for n, v in expected.items()} and per_stage["local_epochs_total"] == 6


# -- the paper's baselines, by hand --------------------------------------------------------------------------------
def _local_models_by_hand(config):
    """Every client's locally trained model, trained here by the client part (same seeds as in a run)."""
    parts = partition_for(config)
    client = LocalModelClient(config.strategy.params)
    models = []
    for pid, idx in enumerate(parts):
        if len(idx) == 0:
            continue
        reply = client.train(_one_shot_request(config), ClientEnv(config, pid, 1, idx))
        arrays = from_record(reply[f"{MODEL_PREFIX}{pid}"])
        models.append(arrays_to_state(scenario_model(config, 10, (1, 28, 28)), arrays).eval())
    return models


def _one_shot_request(config):
    """The one-shot request: the scenario's local training, as the server sends it."""
    from fedsim.frameworks.oneshot_protocol import request

    return request(LocalTraining.from_settings(config.client))


def test_ensemble_is_the_mean_of_the_local_models_logits_by_hand(tmp_path):
    config, summary, out = _run(tmp_path, "ens", 'strategy.name="ensemble"')
    assert config.strategy.params.combine == "logits"  # the paper's baseline is the default
    saved = torch.load(out / "model.pt", weights_only=False).eval()
    models = _local_models_by_hand(config)
    x = test_split(config).x[:200]
    with torch.no_grad():
        by_hand = sum(m(x) for m in models) / len(models)
        torch.testing.assert_close(saved(x), by_hand, rtol=1e-5, atol=1e-5)


def test_one_shot_fedavg_is_the_uniform_parameter_average_by_hand(tmp_path):
    config, summary, out = _run(tmp_path, "avg", 'strategy.name="fedavg-oneshot"')
    assert config.strategy.params.weighting == "uniform"
    saved = torch.load(out / "model.pt", weights_only=False)
    models = _local_models_by_hand(config)
    states = [m.state_dict() for m in models]
    for key, value in saved.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(s[key] for s in states) / len(states), rtol=1e-6, atol=1e-7)
    # example weights stay an option, and then one-shot FedAvg is one round of FedAvg
    _, weighted, _ = _run(tmp_path, "w", 'strategy.name="fedavg-oneshot"', 'strategy.weighting="examples"')
    _, fedavg1, _ = _run(tmp_path, "f1", 'strategy.name="fedavg"', "rounds=1")
    assert weighted["final_accuracy"] == fedavg1["final_accuracy"]


# -- the recalibrated head ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recal")
    return {"default": _run(tmp, "default"), "avg": _run(tmp, "avg", 'strategy.head="avg"'),
            "k1": _run(tmp, "k1", "strategy.stages=1"),
            "ens-recal": _run(tmp, "ens-recal", 'strategy.name="ensemble-recalibrated"'),
            "ensemble": _run(tmp, "ensemble", 'strategy.name="ensemble"')}


def test_default_head_is_recalibrated_in_one_more_round_counted_in_bytes_and_stages(recalibrated):
    config, summary, out = recalibrated["default"]
    p = config.strategy.params
    assert p.head == "recalibrated" and p.warm_start and p.virtual_per_class == 5000
    assert p.recalibration_lr == 0.01 and p.recalibration_epochs == 1 and p.recalibration_covariance == "unbiased"
    assert config.rounds == summary["rounds"] == 3  # K = 2 stages + the statistics round
    metrics = pd.read_csv(out / "metrics.csv")
    stages = pd.read_csv(out / "stages.csv")
    assert list(stages["stage"].astype(str)) == ["1", "2", "head"]
    # the statistics round's upload, by hand: each client's class moments of the summed fused features
    model = torch.load(out / "model.pt", weights_only=False)
    net = scenario_model(config, 10, (1, 28, 28))
    lower = copy.deepcopy(model)
    lower.head = None
    parts = partition_for(config)
    sizes = []
    for pid, idx in enumerate(parts):
        env = ClientEnv(config, pid, 3, idx)
        data = env.train_data()
        moments = class_moments_of(lower, net.head, data.x, data.y, 10)
        sizes.append(record_nbytes(class_statistics_reply(pid, moments, len(data))))
    assert metrics["round_bytes_up"].iloc[2] == sum(sizes)
    assert stages["bytes_up_per_client"].iloc[2] == pytest.approx(np.mean([s for s in sizes if s > 0]))
    assert summary["head_bytes_up_per_client"] == stages["bytes_up_per_client"].iloc[2]
    assert summary["bytes_up"] == metrics["round_bytes_up"].sum()
    assert summary["virtual_features"] == 5000 * summary["recalibration_classes"]


def test_accuracy_before_recalibration_is_the_avg_head_run(recalibrated):
    _, default, _ = recalibrated["default"]
    _, avg, _ = recalibrated["avg"]
    assert avg["rounds"] == 2 and "accuracy_before_recalibration" not in avg
    assert default["accuracy_before_recalibration"] == avg["final_accuracy"]
    assert default["bytes_up_per_stage"] == avg["bytes_up_per_stage"]


def test_recalibrated_ensemble_is_fusefl_with_one_stage_and_reports_the_plain_ensemble(recalibrated):
    _, k1, _ = recalibrated["k1"]
    _, ens_recal, out = recalibrated["ens-recal"]
    _, ensemble, _ = recalibrated["ensemble"]
    assert ens_recal["rounds"] == 2 and k1["rounds"] == 2
    assert ens_recal["ensemble_accuracy"] == ensemble["final_accuracy"]
    assert ens_recal["best_local_accuracy"] == ensemble["best_local_accuracy"]
    # K = 1: every client trains its whole model once, the fused stage is the M local models side by side
    assert ens_recal["accuracy_before_recalibration"] == k1["accuracy_before_recalibration"]
    assert ens_recal["final_accuracy"] == k1["final_accuracy"]
    assert ens_recal["head_bytes_up_per_client"] == k1["head_bytes_up_per_client"]
    model = torch.load(out / "model.pt", weights_only=False)
    assert num_parameters(model) == ens_recal["num_parameters"]


def test_official_covariance_option_runs_and_changes_the_head(tmp_path, recalibrated):
    _, default, out = recalibrated["default"]
    _, official, out2 = _run(tmp_path, "official", 'strategy.recalibration_covariance="official"')
    a = torch.load(out / "model.pt", weights_only=False).head.fc.weight
    b = torch.load(out2 / "model.pt", weights_only=False).head.fc.weight
    assert official["accuracy_before_recalibration"] == default["accuracy_before_recalibration"]
    assert not torch.equal(a, b)


# -- configuration ---------------------------------------------------------------------------------------------
BAD = [
    (["strategy.virtual_per_class=0"], "strategy.virtual_per_class", ">= 1"),
    (["strategy.recalibration_lr=0"], "strategy.recalibration_lr", "> 0"),
    (['strategy.recalibration_covariance="biased"'], "strategy.recalibration_covariance", "official"),
    (["strategy.warm_start=1"], "strategy.warm_start", "true or false"),
    (["rounds=2"], "rounds", "set rounds = 3"),
    (['strategy.name="ensemble-recalibrated"', "rounds=1"], "rounds", "set rounds = 2"),
    (['strategy.name="ensemble-recalibrated"', "strategy.virtual_per_class=-3"], "strategy.virtual_per_class",
     ">= 1"),
]


@pytest.mark.parametrize("overrides, field, fragment", BAD)
def test_bad_recalibration_settings_name_the_field(tmp_path, overrides, field, fragment):
    assert_config_error_names(field, fragment, lambda: _config(tmp_path, *overrides))


def test_model_width_can_differ_between_variants_of_one_scenario(tmp_path):
    """The paper compares FuseFL at a small base width against baselines at a larger one: a per-variant set."""
    text = SCENARIO + """
[[variants]]
label = "fusefl-narrow"
set = { "model.width" = 2 }

[[variants]]
label = "ensemble-wide"
set = { "strategy.name" = "ensemble", "model.width" = 6 }
"""
    path = tmp_path / "widths.toml"
    path.write_text(text)
    variants = dict(load_scenarios(path))
    assert variants["fusefl-narrow"].model.width == 2 and variants["ensemble-wide"].model.width == 6
    narrow = scenario_model(variants["fusefl-narrow"], 10, (1, 28, 28))
    wide = scenario_model(variants["ensemble-wide"], 10, (1, 28, 28))
    assert num_parameters(narrow) < num_parameters(wide)
    summary = run_scenario(variants["fusefl-narrow"], tmp_path / "narrow", show_progress=False)
    assert summary["single_model_parameters"] == num_parameters(narrow)


def test_the_shipped_alpha_0_1_scenario_runs_fusefl_narrower_than_its_baselines():
    variants = dict(load_scenarios("scenarios/fusefl-fmnist-alpha0.1.toml"))
    narrow = variants["fusefl-narrow"]
    assert narrow.strategy.name == "fusefl" and narrow.model.width < variants["ensemble"].model.width
