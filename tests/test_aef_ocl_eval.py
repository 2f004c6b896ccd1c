"""AEF-OCL's stream evaluation as the official code scores it (issue #11): accuracy on the test samples of the
classes seen so far beside the full test set, the stream-average accuracy, rows at phase ends, and the official
buffer initialisation one setting away."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import aef_ocl_one_client
from fedsim.analytic import RidgeStatistics
from fedsim.config import load_scenario, load_scenarios
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError
from fedsim.algorithms.aef_ocl.learner import learner_for
from fedsim.frameworks.online import OnlineRun, PrequentialMeter, masked_predict, row_points
from fedsim.frameworks.online_protocol import OnlineParams
from fedsim.scenario import partition_for, scenario_feature_map, scenario_streams, test_split, train_split

STREAM = aef_ocl_one_client(max_train=4000, max_test=1000, imbalance_ratio=20, buffer_width=128, eval_every=15)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("aef-eval")
    (root / "s.toml").write_text(STREAM)
    return root


def config(root, *overrides):
    return load_scenario(root / "s.toml", list(overrides))


def direct_seen_accuracy(cfg, batches_done: int) -> tuple[float, float]:
    """(seen-class accuracy, full accuracy) of joint ridge on the first `batches_done` batches, counted by hand."""
    train, test = train_split(cfg), test_split(cfg)
    streams = scenario_streams(cfg, partition_for(cfg))
    fmap = scenario_feature_map(cfg)
    learner = learner_for(cfg.strategy.params, cfg, train.num_classes, solver="statistics")
    idx = np.concatenate(streams[0].batches[:batches_done])
    h = learner.transform(fmap(train.x[idx], dtype=torch.float64))
    stats = RidgeStatistics.zeros(h.shape[1], train.num_classes).update(h, train.labels[idx], train.num_classes)
    weights = stats.solve(cfg.strategy.params.gamma)
    pred = masked_predict(learner.transform(fmap(test.x, dtype=torch.float64)), weights)
    seen = np.unique(train.labels[idx])
    on_seen = np.isin(test.labels, seen)
    correct = int(np.sum(pred[on_seen] == test.labels[on_seen]))
    return correct / int(on_seen.sum()), float(np.mean(pred == test.labels))


def test_seen_class_accuracy_during_the_stream_equals_a_direct_count(scenario):
    """Without PFG the model after t batches is joint ridge on them, so every row can be recomputed by hand."""
    cfg = config(scenario, "strategy.pfg=false")
    summary = run_scenario(cfg, scenario / "no-pfg", show_progress=False)
    m = pd.read_csv(scenario / "no-pfg" / "metrics.csv")
    assert len(m) > 5 and m["seen_accuracy"].notna().all()
    for t, seen_acc, acc, classes in zip(m["round"], m["seen_accuracy"], m["accuracy"], m["classes_seen"]):
        expected_seen, expected_full = direct_seen_accuracy(cfg, int(t))
        assert seen_acc == pytest.approx(expected_seen, abs=1e-12), t
        assert acc == pytest.approx(expected_full, abs=1e-12), t
        if classes < 10:  # early in the stream the full test set holds classes the model has never seen
            assert seen_acc > acc
    assert m["seen_accuracy"].iloc[-1] == m["accuracy"].iloc[-1] == summary["final_accuracy"]  # all classes seen
    # the official average accuracy: the mean over the evaluation points of the seen-class accuracy
    assert summary["stream_average_accuracy"] == pytest.approx(m["seen_accuracy"].mean(), abs=1e-12)
    assert summary["test_evaluations"] == len(m)
    saved = json.loads((scenario / "no-pfg" / "summary.json").read_text())
    assert saved["stream_average_accuracy"] == summary["stream_average_accuracy"]


def test_rows_at_phase_ends_and_pfg_seen_accuracy(scenario):
    """eval_at = "phases": one row per phase of the stream (one class per phase here), as the official code."""
    cfg = config(scenario, "strategy.eval_at='phases'")
    summary = run_scenario(cfg, scenario / "phases", show_progress=False)
    m = pd.read_csv(scenario / "phases" / "metrics.csv")
    train = train_split(cfg)
    batches = scenario_streams(cfg, partition_for(cfg))[0].batches
    assert list(m["classes_seen"]) == list(range(1, 11))  # 10 phases: a row after each
    for t in m["round"].iloc[:-1]:  # the next batch brings a class no earlier batch held
        before = np.unique(train.labels[np.concatenate(batches[:t])])
        assert np.setdiff1d(train.labels[batches[t]], before).size > 0
    assert m["round"].iloc[-1] == len(batches)
    assert m["seen_accuracy"].iloc[0] == pytest.approx(1.0)  # one class seen: every prediction is that class
    assert summary["stream_average_accuracy"] == pytest.approx(m["seen_accuracy"].mean(), abs=1e-12)
    assert summary["final_accuracy"] == m["accuracy"].iloc[-1]
    # the baselines score the same way
    sgd = run_scenario(config(scenario, "strategy.name='online-sgd'", "strategy.eval_at='phases'"),
                       scenario / "sgd", show_progress=False)
    sgd_rows = pd.read_csv(scenario / "sgd" / "metrics.csv")
    assert list(sgd_rows["round"]) == list(m["round"]) and sgd_rows["seen_accuracy"].notna().all()
    assert sgd["stream_average_accuracy"] == pytest.approx(sgd_rows["seen_accuracy"].mean(), abs=1e-12)


class _Ctx:
    """The part of ServerContext that OnlineRun uses."""

    def __init__(self) -> None:
        self.rows, self.values = [], {}

    def set_total_steps(self, n: int) -> None:
        self.total = n

    def log(self, step: int, **values) -> None:
        self.rows.append((step, values))

    def summary(self, **values) -> None:
        self.values = values


class _Evaluator:
    def __init__(self, labels: np.ndarray) -> None:
        from fedsim.frameworks.online import TestEvaluator

        self.labels, self.seconds = labels, 0.0
        self.features = np.zeros((len(labels), 1))
        self.data = type("D", (), {"num_classes": 4})()
        self.metrics = TestEvaluator.metrics.__get__(self)


def test_online_run_scores_the_seen_classes_given_or_counted_by_the_meter():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    guesses = np.array([0, 1, 1, 1, 0, 2, 0, 0])  # what the "model" predicts for each test sample
    ctx = _Ctx()
    run = OnlineRun(ctx, OnlineParams(), _Evaluator(labels), total_rows=3)
    meter = PrequentialMeter(4)
    meter.add(np.array([0]), np.array([0]))  # the stream so far held class 0 only
    run.row(1, meter, lambda h: guesses, last=False)
    meter.add(np.array([1, 1]), np.array([1, 2]))  # then classes 1 and 2
    run.row(2, meter, lambda h: guesses, last=False)
    run.row(3, None, lambda h: guesses, last=True, seen=np.array([3]))  # given explicitly
    seen = [values["seen_accuracy"] for _, values in ctx.rows]
    assert seen == [1 / 2, 4 / 6, 0.0]  # class 0: 1 of 2; classes 0-2: 4 of 6; class 3: 0 of 2
    assert all(values["accuracy"] == 4 / 8 for _, values in ctx.rows)
    run.finish(meter, 3, 1.0)
    assert ctx.values["stream_average_accuracy"] == pytest.approx((1 / 2 + 4 / 6 + 0) / 3)
    assert ctx.values["final_accuracy"] == 0.5 and ctx.values["buffer_init"] == "normal"


def test_row_points():
    labels = np.array([0] * 25 + [1] * 12 + [2] * 3)
    batches = [np.arange(s, min(s + 10, 40)) for s in range(0, 40, 10)]  # classes {0}, {0}, {0,1}, {1,2}
    assert row_points(OnlineParams(eval_every=3), batches, labels) == {3, 4}
    assert row_points(OnlineParams(eval_at="phases"), batches, labels) == {2, 3, 4}


def test_official_buffer_initialisation_and_width_are_one_setting_away(scenario):
    cfg = config(scenario, "strategy.buffer_init='uniform'", "strategy.pfg=false", "data.max_train=1500")
    summary = run_scenario(cfg, scenario / "uniform", show_progress=False)
    assert summary["buffer_init"] == "uniform"
    buffer = torch.load(scenario / "uniform" / "model.pt", weights_only=False)[3]
    w = buffer.weight.double().numpy()
    bound = 1 / np.sqrt(784)
    assert buffer.init == "uniform" and np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.05)
    wide = load_scenario(scenario / "s.toml", ["strategy.buffer_width=8192", "strategy.buffer_init='uniform'"])
    assert (wide.strategy.params.buffer_width, wide.strategy.params.buffer_init) == (8192, "uniform")
    for name in ("online-sgd", "joint-ridge"):  # the baselines share the setting
        assert config(scenario, f"strategy.name='{name}'", "strategy.buffer_init='uniform'").strategy.params \
            .buffer_init == "uniform"


@pytest.mark.parametrize("overrides, match", [
    (["strategy.buffer_init='kaiming'"], "strategy.buffer_init: 'kaiming' is not allowed"),
    (["strategy.eval_at='tasks'"], "strategy.eval_at: 'tasks' is not allowed"),
    (["strategy.eval_at='phases'", "partition.num_clients=3"], "strategy.eval_at: 'phases' needs a centralized run"),
])
def test_bad_evaluation_settings_name_the_field(scenario, overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(scenario, *overrides)
    assert load_scenarios(scenario / "s.toml", ["strategy.eval_at='phases'", "partition.num_clients=3",
                                                "strategy.mode='centralized'"])
