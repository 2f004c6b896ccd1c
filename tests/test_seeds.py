"""fedsim run --seeds / --sweep / a scenario's `seeds`: one normal run directory per (variant, point, seed); a
failing seed does not lose the others; --resume and --only per seed and point (issue #12)."""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.errors import ConfigError
from fedsim.sweep import grid, parse_seeds, parse_sweeps, plan_jobs

# AFL (identity features), FedAvg and FedProx on the bundled digits set, Dirichlet(0.5) over 4 clients: the seed
# changes the partition
SCENARIO = """
seed = 0
rounds = 1
[data]
name = "digits"
[partition]
kind = "dirichlet"
num_clients = 4
alpha = 0.5
[model]
name = "cnn"
width = 8
feature_map = "identity"
[client]
epochs = 1
lr = 0.05
[simulation]
backend = "inline"
[strategy]
name = "fedavg"

[[variants]]
label = "afl"
set = { "strategy.name" = "afl" }

[[variants]]
label = "fedavg"

[[variants]]
label = "prox"
set = { "strategy.name" = "fedprox", "strategy.proximal_mu" = 0.1 }
"""

METRICS = ("final_accuracy", "best_accuracy", "worst_client_accuracy", "bytes_up", "bytes_down", "wall_seconds")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    scenario = root / "s.toml"
    scenario.write_text(SCENARIO)
    out = root / "runs"
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--seeds", "0,1,2"]) == 0
    assert main(["report", str(out), "--csv", str(root / "stats.csv"), "--out", str(root / "rep")]) == 0
    return root, out


def test_three_variants_three_seeds_make_nine_run_directories(seeded):
    _, out = seeded
    dirs = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json"))
    assert dirs == [f"{v}/seed-{s}" for v in ("afl", "fedavg", "prox") for s in (0, 1, 2)]
    for v in ("afl", "fedavg", "prox"):
        for s in (0, 1, 2):
            saved = json.loads((out / v / f"seed-{s}" / "config.json").read_text())
            assert saved["config"]["seed"] == s and saved["label"] == v
            assert json.loads((out / v / f"seed-{s}" / "summary.json").read_text())["seed"] == s
    # each seed has its own Dirichlet partition
    sizes = [tuple(pd.read_csv(out / "afl" / f"seed-{s}" / "partition.csv")["size"]) for s in (0, 1, 2)]
    assert len(set(sizes)) == 3


def test_report_csv_means_and_stds_equal_the_summaries(seeded):
    root, out = seeded
    table = pd.read_csv(root / "stats.csv").set_index("label")
    assert list(pd.read_csv(root / "stats.csv").columns[:2]) == ["label", "n"]
    for v in ("afl", "fedavg", "prox"):
        summaries = [json.loads((out / v / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1, 2)]
        assert table.loc[v, "n"] == 3
        for key in METRICS:
            values = [float(s[key]) for s in summaries]
            assert table.loc[v, f"{key}_mean"] == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-15)
            assert table.loc[v, f"{key}_std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
            # 95% Student t half-width with 2 degrees of freedom: t = 4.302653
            assert table.loc[v, f"{key}_ci95"] == pytest.approx(4.302652729749464 * statistics.stdev(values)
                                                                 / math.sqrt(3), rel=1e-9, abs=1e-15)
    # the run's own report wrote the same statistics beside the runs
    assert (out / "statistics.csv").is_file() and (out / "accuracy_vs_round.png").is_file()


def test_afl_identity_features_are_invariant_to_the_partition_fedavg_is_not(seeded):
    root, _ = seeded
    table = pd.read_csv(root / "stats.csv").set_index("label")
    assert table.loc["afl", "final_accuracy_std"] == 0.0  # exactly: the ridge solution of the pooled data
    assert table.loc["fedavg", "final_accuracy_std"] > 0.0


def test_resume_skips_completed_seeds_and_reruns_a_missing_one(seeded, capsys):
    root, out = seeded
    before = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    (out / "fedavg" / "seed-1" / "summary.json").unlink()
    assert main(["run", str(root / "s.toml"), "--out", str(out), "--seeds", "3", "--resume",
                 "--only", "fedavg"]) == 0
    err = capsys.readouterr().err
    assert err.count("completed earlier") == 2 and "fedavg/seed-1" in err
    after = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert (out / "fedavg" / "seed-1" / "summary.json").is_file()
    assert all(after[p] == t for p, t in before.items() if "fedavg/seed-1" not in p.as_posix())


def test_a_failing_seed_does_not_lose_the_others(tmp_path, capsys, monkeypatch):
    import fedsim.engine.runner as runner

    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "runs"
    real = runner.run_scenario

    def seed_1_crashes(config, run_dir, **kwargs):  # noqa: ANN001, ANN003
        if config.seed == 1:
            raise RuntimeError("injected crash for seed 1")
        return real(config, run_dir, **kwargs)

    monkeypatch.setattr(runner, "run_scenario", seed_1_crashes)
    code = main(["run", str(scenario), "--out", str(out), "--quiet", "--seeds", "0,1,2", "--only", "fedavg",
                 "--sweep", "client.lr=0.05,0.1"])
    assert code == 1  # non-zero, after running the rest
    err = capsys.readouterr().err
    assert "2 of 6 runs failed" in err and "fedavg/client.lr=0.1/seed-1" in err
    for lr in ("0.05", "0.1"):
        for s in (0, 2):
            summary = json.loads((out / "fedavg" / f"client.lr={lr}" / f"seed-{s}" / "summary.json").read_text())
            assert summary["status"] == "completed"
    stats = pd.read_csv(out / "statistics.csv", dtype={"missing_seeds": str}).set_index("label")
    assert stats.loc["fedavg/client.lr=0.05", "n"] == 2
    assert stats.loc["fedavg/client.lr=0.1", "missing_seeds"] == "1"
    # --resume runs only the missing seed
    monkeypatch.setattr(runner, "run_scenario", real)
    assert main(["run", str(scenario), "--out", str(out), "--seeds", "0,1,2", "--only", "fedavg",
                 "--sweep", "client.lr=0.05,0.1", "--resume"]) == 0
    assert capsys.readouterr().err.count("completed earlier") == 4
    stats = pd.read_csv(out / "statistics.csv", dtype={"missing_seeds": str}).set_index("label")
    assert stats.loc["fedavg/client.lr=0.1", "n"] == 3 and stats["missing_seeds"].isna().all()


def test_scenario_seeds_key_and_sweep_grid_layout(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text("seeds = [4, 7]\n" + SCENARIO)
    jobs, single = plan_jobs(scenario, [], ["afl", "fedavg"], tmp_path / "o",
                             sweeps=["client.lr=0.05,0.1", "partition.alpha=0.5,1.0"])
    assert not single
    names = [j.name for j in jobs]
    # AFL has no client.lr but the partition changes it: every point; FedAvg: every point
    assert len([n for n in names if n.startswith("fedavg/")]) == 2 * 2 * 2
    assert "fedavg/client.lr=0.1,partition.alpha=1.0/seed-7" in names
    job = next(j for j in jobs if j.name == "fedavg/client.lr=0.1,partition.alpha=1.0/seed-7")
    assert job.config.client.lr == 0.1 and job.config.partition.alpha == 1.0 and job.config.seed == 7
    assert job.run_dir == tmp_path / "o" / "fedavg" / "client.lr=0.1,partition.alpha=1.0" / "seed-7"
    # a sweep that leaves a variant unchanged runs it once, without the point level
    jobs, _ = plan_jobs(scenario, [], ["afl", "prox"], tmp_path / "o", seeds=[0],
                        sweeps=["strategy.proximal_mu=0.01,0.5"])
    assert sorted(j.name for j in jobs) == ["afl/seed-0", "prox/strategy.proximal_mu=0.01/seed-0",
                                            "prox/strategy.proximal_mu=0.5/seed-0"]
    assert [j.config.strategy.params.proximal_mu for j in jobs if j.label == "prox"] == [0.01, 0.5]


def test_parsing_and_errors(tmp_path):
    assert parse_seeds("5") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3,") == [0, 1, 2]
    for bad in ("0", "a", "-1,2", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert grid(parse_sweeps(["a.b=1,2", "c.d=x"])) == [("a.b=1,c.d=x", ["a.b=1", "c.d=x"]),
                                                         ("a.b=2,c.d=x", ["a.b=2", "c.d=x"])]
    for bad in (["a.b"], ["a.b="], ["a.b=1", "a.b=2"], ["seed=1,2"], ["data.name=a/b"], ["a.b=1,1"]):
        with pytest.raises(ConfigError, match="--sweep"):
            parse_sweeps(bad)
    scenario = tmp_path / "s.toml"
    for bad in ("seeds = 3\n", "seeds = []\n", "seeds = [1, 1]\n", "seeds = [-1]\n"):
        scenario.write_text(bad + SCENARIO)
        assert main(["validate", str(scenario)]) == 2
    scenario.write_text("seeds = [0, 1]\n" + SCENARIO)
    assert main(["validate", str(scenario)]) == 0
    assert main(["run", str(scenario), "--out", str(tmp_path / "o"), "--sweep", "client.nope=1,2"]) == 2
