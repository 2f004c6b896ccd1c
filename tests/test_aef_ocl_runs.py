"""AEF-OCL and its baselines end to end on real Fashion-MNIST slices (inline backend: the same Flower apps, in one
process, messages serialized): PFG beats the plain analytic learner on mean class accuracy of a long-tailed stream,
the analytic learner equals joint ridge, federated statistics folding equals the centralized learner on the union
of the clients' streams, run files and config errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import aef_ocl_one_client, dirichlet, fmnist_slice, long_tail_stream
from fedsim.algorithms.aef_ocl.learner import learner_for
from fedsim.config import load_scenario, load_scenarios
from fedsim.scenario import partition_for, scenario_feature_map, scenario_streams, train_split
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError
from fedsim.results.report import report

CENTRAL = aef_ocl_one_client(max_train=10000, max_test=2000, imbalance_ratio=100, buffer_width=512,
                             eval_every=50) + """\
[[variants]]
label = "aef-ocl"
[[variants]]
label = "no-pfg"
set = { "strategy.pfg" = false }
[[variants]]
label = "online-sgd"
set = { "strategy.name" = "online-sgd" }
[[variants]]
label = "joint-ridge"
set = { "strategy.name" = "joint-ridge" }
"""

FEDERATED = f"""
seed = 1
{fmnist_slice(6000, 1000, dirichlet(6, 0.1))}
{long_tail_stream(100)}
[simulation]
backend = "inline"
clients_per_node = 2
[strategy]
name = "aef-ocl"
buffer_width = 256
sync_every = 15
[[variants]]
label = "fed-no-pfg"
set = {{ "strategy.pfg" = false }}
[[variants]]
label = "fed-aef-ocl"
"""


def head_weights(run_dir) -> np.ndarray:
    """W (d x c) of a saved model (backbone -> buffer -> float64 linear head)."""
    model = torch.load(run_dir / "model.pt", weights_only=False)
    return model[-1].weight.detach().double().numpy().T


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def central_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("aef-central")
    (root / "s.toml").write_text(CENTRAL)
    summaries = {label: run_scenario(config, root / label, label=label, show_progress=False)
                 for label, config in load_scenarios(root / "s.toml")}
    return root, summaries


def test_pfg_raises_mean_class_accuracy_on_the_long_tailed_stream(central_runs):
    _, s = central_runs
    # measured (seed 0, 10k-sample slice -> 2517-sample stream, width 512): PFG 0.724 vs 0.637 without it
    assert s["aef-ocl"]["mean_class_accuracy"] > s["no-pfg"]["mean_class_accuracy"] + 0.05
    assert s["aef-ocl"]["final_accuracy"] > s["no-pfg"]["final_accuracy"] + 0.05
    # online SGD fine-tuning forgets the early (head) classes: measured 0.21 mean class accuracy
    assert s["online-sgd"]["mean_class_accuracy"] < s["no-pfg"]["mean_class_accuracy"] - 0.2
    for label in ("aef-ocl", "no-pfg", "online-sgd", "joint-ridge"):
        assert s[label]["stream_samples"] == 2517
        assert s[label]["samples_per_second"] > 0
        per_class = s[label]["per_class_accuracy"]
        assert len(per_class) == 10
        assert s[label]["mean_class_accuracy"] == pytest.approx(np.mean(per_class), abs=1e-6)


def test_analytic_learner_without_pfg_equals_joint_ridge_on_the_stream(central_runs):
    root, s = central_runs
    assert rel_err(head_weights(root / "no-pfg"), head_weights(root / "joint-ridge")) < 1e-8
    assert s["no-pfg"]["final_accuracy"] == s["joint-ridge"]["final_accuracy"]


def test_metrics_rows_hold_prequential_accuracy_and_test_checkpoints(central_runs, tmp_path):
    root, s = central_runs
    m = pd.read_csv(root / "aef-ocl" / "metrics.csv")
    assert list(m["round"]) == [50, 100, 150, 200, 250, 252]  # every eval_every batches and the last batch
    assert m["samples"].iloc[-1] == 2517 and m["prequential_accuracy"].between(0, 1).all()
    assert s["aef-ocl"]["prequential_accuracy"] == m["prequential_accuracy"].iloc[-1]
    assert m["accuracy"].notna().all()  # test accuracy at every row (test_every = 1), what `fedsim report` plots
    assert m["accuracy"].iloc[-1] == s["aef-ocl"]["final_accuracy"] and m["accuracy"].max() == s["aef-ocl"][
        "best_accuracy"]
    assert m["mean_class_accuracy"].iloc[-1] == s["aef-ocl"]["mean_class_accuracy"]
    assert s["aef-ocl"]["balances"] >= 5 + 10  # every 50 batches and at each of the 10 classes' arrival
    sgd = pd.read_csv(root / "online-sgd" / "metrics.csv")
    # prequential accuracy rewards following the current class; the test set shows the forgetting
    assert sgd["prequential_accuracy"].iloc[-1] > 0.9 and sgd["accuracy"].iloc[-1] < 0.4
    saved = json.loads((root / "aef-ocl" / "summary.json").read_text())
    assert {"final_accuracy", "mean_class_accuracy", "per_class_accuracy", "samples_per_second"} <= set(saved)
    table = report([root], out_dir=tmp_path, show=False)  # fedsim report: table + accuracy over the stream
    assert len(table) == 4 and (tmp_path / "accuracy_vs_step.png").stat().st_size > 0  # stream steps


def test_federated_global_weights_equal_the_centralized_learner_on_the_union(tmp_path):
    (tmp_path / "f.toml").write_text(FEDERATED)
    runs = dict(load_scenarios(tmp_path / "f.toml"))
    config = runs["fed-no-pfg"]
    summary = run_scenario(config, tmp_path / "fed", show_progress=False)
    streams = scenario_streams(config, partition_for(config))
    assert summary["sync_rounds"] == -(-max(len(s) for s in streams) // 15) > 1
    train = train_split(config)
    fmap = scenario_feature_map(config)
    central = learner_for(config.strategy.params, config, train.num_classes, solver="recursive")
    union = np.concatenate([b for s in streams for b in s.batches])
    for start in range(0, len(union), 10):  # the union of the clients' streams, any order
        idx = union[start:start + 10]
        central.partial_fit(fmap(train.x[idx], dtype=torch.float64), train.labels[idx])
    assert central.n_seen_ == summary["learned_samples"] == summary["stream_samples"]
    assert rel_err(head_weights(tmp_path / "fed"), central.coef_) < 1e-8
    # and an independent numpy ridge on the same buffer features
    x = fmap(train.x[union], dtype=torch.float64).numpy()
    h = np.maximum(x @ central.buffer_.weight.double().numpy(), 0.0)
    ref = np.linalg.solve(h.T @ h + 1e-3 * np.eye(256), h.T @ np.eye(10)[train.labels[union]])
    assert rel_err(head_weights(tmp_path / "fed"), ref) < 1e-8
    # statistics go up, weights come down: bytes counted from the real messages
    assert summary["bytes_up"] > summary["sync_rounds"] * 256 * 257 / 2 * 8
    assert summary["bytes_down"] > 0 and summary["failed_client_rounds"] == 0

    pfg = run_scenario(runs["fed-aef-ocl"], tmp_path / "fed-pfg", show_progress=False)
    # PFG statistics merged on the server correct the union's imbalance (measured 0.738 vs 0.622)
    assert pfg["mean_class_accuracy"] > summary["mean_class_accuracy"] + 0.06


@pytest.mark.parametrize("override, match", [
    ("stream.kind='none'", "stream.kind"),
    ("strategy.balance='median'", "strategy.balance"),
    ("strategy.gamma=0", "strategy.gamma"),
    ("strategy.draws=0", "strategy.draws"),
    ("strategy.pfg_space='pixels'", "strategy.pfg_space"),
    ("strategy.mode='sometimes'", "strategy.mode"),
    ("strategy.buffer_width=0", "strategy.buffer_width"),
    ("strategy.momentum=0.9", "strategy.momentum: unknown setting"),
])
def test_bad_settings_are_config_errors_naming_the_field(tmp_path, override, match):
    (tmp_path / "s.toml").write_text(CENTRAL.split("[[variants]]")[0])
    with pytest.raises(ConfigError, match=match):
        load_scenario(tmp_path / "s.toml", [override])


@pytest.mark.slow
def test_federated_run_on_ray_equals_the_inline_run(tmp_path):
    (tmp_path / "f.toml").write_text(FEDERATED)
    overrides = ["data.max_train=3000", "strategy.buffer_width=128", "strategy.pfg=false"]
    inline = load_scenarios(tmp_path / "f.toml", overrides)[0][1]
    ray = load_scenarios(tmp_path / "f.toml", overrides + ["simulation.backend='ray'", "simulation.num_cpus=1"])[0][1]
    a = run_scenario(inline, tmp_path / "inline", show_progress=False)
    b = run_scenario(ray, tmp_path / "ray", show_progress=False)
    assert b["status"] == "completed" and b["sync_rounds"] == a["sync_rounds"] > 1
    assert rel_err(head_weights(tmp_path / "ray"), head_weights(tmp_path / "inline")) < 1e-10
    assert b["bytes_up"] == a["bytes_up"] and b["prequential_accuracy"] == a["prequential_accuracy"]
