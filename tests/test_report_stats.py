"""fedsim report's statistics over seeds (issue #12), on run directories written by hand: grouping by label and
sweep point, mean / sample std / 95% Student-t half-width, continual metrics, missing seeds, --csv columns."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from scipy.stats import t

from fedsim.cli import main
from fedsim.results.report import mean_std_ci, statistics_table, load_grouped


def _run(d, label, kind, seed, acc, **extra):
    d.mkdir(parents=True)
    summary = {"label": label, "kind": kind, "seed": seed, "status": "completed", "final_accuracy": acc,
               "best_accuracy": acc + 0.01, "bytes_up": 1000 * (seed + 1), "bytes_down": 10, "wall_seconds": 2.0,
               **extra}
    (d / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame({"round": [0, 1, 2], "accuracy": [0.1, acc - 0.1, acc], "bytes_up": [0, 500, 1000]}).to_csv(
        d / "metrics.csv", index=False)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "runs"
    for s, acc in zip((0, 1, 2), (0.5, 0.6, 0.7), strict=True):
        _run(root / "fedavg" / f"seed-{s}", "fedavg", "federated", s, acc, worst_client_accuracy=acc - 0.2)
        _run(root / "dpcr" / "strategy.gamma=1.0" / f"seed-{s}", "dpcr", "continual", s, acc / 2,
             average_incremental_accuracy=acc, forgetting=0.1 * s, num_tasks=2)
    _run(root / "afl" / "seed-0", "afl", "federated", 0, 0.8)
    _run(root / "afl" / "seed-2", "afl", "federated", 2, 0.8)
    failed = root / "afl" / "seed-1"
    _run(failed, "afl", "federated", 1, 0.1)
    summary = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    return root


def test_mean_std_ci_is_student_t_and_exact_for_equal_values():
    mean, std, ci = mean_std_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert ci == pytest.approx(t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    assert mean_std_ci([0.1, 0.1, 0.1])[1] == 0.0  # exactly, where a naive mean would leave 1e-17
    m, s, c = mean_std_ci([0.3])
    assert m == 0.3 and math.isnan(s) and math.isnan(c)


def test_groups_by_label_and_point_with_continual_metrics_and_missing_seeds(tree):
    table = statistics_table(load_grouped([tree], warn=False)).set_index("label")
    assert set(table.index) == {"fedavg", "dpcr/strategy.gamma=1.0", "afl"}
    assert table.loc["fedavg", "n"] == 3 and table.loc["fedavg", "kind"] == "federated"
    assert table.loc["fedavg", "worst_client_accuracy_mean"] == pytest.approx(0.4)
    assert table.loc["fedavg", "bytes_up_std"] == pytest.approx(1000.0)
    dpcr = table.loc["dpcr/strategy.gamma=1.0"]
    assert dpcr["last_accuracy_mean"] == pytest.approx(0.3) and dpcr["kind"] == "continual"
    assert dpcr["average_incremental_accuracy_mean"] == pytest.approx(0.6)
    assert dpcr["forgetting_mean"] == pytest.approx(0.1)
    assert math.isnan(table.loc["fedavg", "last_accuracy_mean"])  # not a continual run
    # the failed seed is not averaged in, and is named
    assert table.loc["afl", "n"] == 2 and table.loc["afl", "final_accuracy_std"] == 0.0
    assert table.loc["afl", "missing_seeds"] == "1" and table.loc["fedavg", "missing_seeds"] == ""


def test_report_cli_csv_columns_and_band_plots(tree, tmp_path, capsys):
    assert main(["report", str(tree), "--csv", str(tmp_path / "s.csv"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "federated runs" in out and "continual runs" in out  # one table per part
    assert "missing seeds: afl: 1" in out
    frame = pd.read_csv(tmp_path / "s.csv")
    assert list(frame.columns[:5]) == ["label", "n", "final_accuracy_mean", "final_accuracy_std",
                                       "final_accuracy_ci95"]
    for key in ("best_accuracy", "worst_client_accuracy", "bytes_up", "wall_seconds", "last_accuracy",
                "average_incremental_accuracy", "forgetting"):
        assert {f"{key}_mean", f"{key}_std", f"{key}_ci95"} <= set(frame.columns)
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "accuracy_per_task.png", "statistics.csv"):
        assert (tmp_path / "rep" / name).is_file()


def test_runs_without_seeds_keep_the_per_run_table(tmp_path, capsys):
    _run(tmp_path / "r" / "a", "a", "federated", 0, 0.5)
    _run(tmp_path / "r" / "b", "b", "continual", 0, 0.4)
    assert main(["report", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "mean +- std" not in out and "0.5000" in out
    assert list(pd.read_csv(tmp_path / "r" / "report.csv")["run"]) == ["a", "b"]
    assert not (tmp_path / "r" / "statistics.csv").exists()
