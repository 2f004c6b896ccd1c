"""scripts/bench_fusefl.py (issue #22's FuseFL budget sweep) on a tiny Fashion-MNIST slice through the engine:
the strict one-shot rows (no statistics round) read from the default run equal a real run without it, completed
runs are read back instead of run again, and a bad --strict-heads is refused by name."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from fedsim.config import config_from_dict
from fedsim.engine.runner import run_scenario
from fedsim.results.rundir import load_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_fusefl.py"
_spec = importlib.util.spec_from_file_location("bench_fusefl", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _args(out: Path, strict_heads: list[str]) -> argparse.Namespace:
    return argparse.Namespace(max_train=600, max_test=300, clients=3, width=4, batch_size=32, lr=0.05,
                              backend="inline", out=str(out), reuse=True, strict_heads=strict_heads,
                              fedavg_rounds=[])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = _args(out, ["avg", "logits"])
    setting = {"partition": "dirichlet", "alpha": 0.3, "epochs": 3, "seed": 0}
    rows = bench.fusefl_rows(args, setting, "dirichlet", 0.3, 3, 0, 2, "avg")
    return args, setting, rows


def test_strict_avg_row_equals_a_run_of_the_avg_head(sweep, tmp_path):
    args, _, rows = sweep
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == [bench.DEFAULT, bench.strict_name("avg"), bench.strict_name("logits")]
    strict = by_method[bench.strict_name("avg")]
    # the same scenario with head "avg": K rounds, no statistics round
    tree = bench.scenario(args, "dirichlet", 0.3, 3, 0, {"name": "fusefl", "stages": 2, "merge": "avg",
                                                         "head": "avg"})
    run_scenario(config_from_dict(tree), tmp_path / "avg", show_progress=False)
    avg = load_run(tmp_path / "avg")["summary"]
    assert avg["rounds"] == strict["rounds"] == 2
    assert strict["accuracy"] == avg["final_accuracy"]
    assert strict["bytes_up_per_client"] == avg["bytes_up_per_client"]
    assert strict["bytes_down_per_client"] == avg["bytes_down_per_client"]
    default = by_method[bench.DEFAULT]
    assert default["rounds"] == 3 and default["bytes_up_per_client"] > strict["bytes_up_per_client"]
    logits = by_method[bench.strict_name("logits")]
    assert logits["rounds"] == 2 and logits["bytes_up_per_client"] == strict["bytes_up_per_client"]


def test_completed_runs_are_read_back_not_run_again(sweep):
    args, setting, rows = sweep
    dirs = [bench.run_dir(args, "dirichlet", 0.3, 3, 0, label) for label in ("fusefl-K2-avg", "fusefl-K2-avg-logits")]
    stamps = [(d / "summary.json").stat().st_mtime_ns for d in dirs]
    again = bench.fusefl_rows(args, setting, "dirichlet", 0.3, 3, 0, 2, "avg")
    assert again == rows
    assert [(d / "summary.json").stat().st_mtime_ns for d in dirs] == stamps


def test_unknown_strict_head_is_refused_by_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_fusefl.py", "--strict-heads", "avg,ridge"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--strict-heads: unknown ridge (choose from avg, logits)" in capsys.readouterr().err
