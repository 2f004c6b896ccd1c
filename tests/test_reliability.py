"""Reliability: signals end runs cleanly, run directories never lie, every bad input is one error line.

Signal tests run `fedsim run` in a subprocess of its own process group and signal the group, as a terminal's
Ctrl-C, `timeout`, Slurm or Kubernetes would; they use a tiny test strategy ("sleepy": every client sleeps, the
server logs one row a round) registered by a driver script, so they exercise the engine, not an algorithm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import AFL_DIGITS
from fedsim.cli import main

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""Test strategy: each round every client sleeps `sleep` s and answers; the server logs one row a round."""
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedsim.registry import StrategySpec, register_strategy


@dataclass
class SleepyParams:
    sleep: float = 0.2
    fail: bool = False


class SleepyServer:
    def __init__(self, params):
        self.params = params

    def run(self, ctx):
        ctx.set_total_steps(ctx.config.rounds)
        for r in range(1, ctx.config.rounds + 1):
            replies = ctx.send(RecordDict({"sleepy": ConfigRecord({"r": r})}), round=r)
            if not any(rep.ok for rep in replies):
                raise ValueError("arrays do not match the model: missing ['w']")  # as FedAvg says it
            ctx.log(r, accuracy=0.5 + 0.001 * r)


class SleepyClient:
    def __init__(self, params):
        self.params = params

    def train(self, content, env):
        if self.params.fail:
            raise RuntimeError(f"client {env.partition_id} broke")
        time.sleep(self.params.sleep)
        return RecordDict({"sleepy": ConfigRecord({"pid": env.partition_id})})


register_strategy(StrategySpec(name="sleepy", params=SleepyParams, server="sleepy_plugin:SleepyServer",
                               client="sleepy_plugin:SleepyClient", description="test strategy"))
'''

DRIVER = '''
import sys
import sleepy_plugin  # noqa: F401  (registers "sleepy")
from fedsim.cli import main
sys.exit(main())  # as the `fedsim` console script calls it
'''

SLEEPY = """
seed = 0
rounds = {rounds}
[data]
name = "digits"
[partition]
num_clients = 2
[simulation]
backend = "{backend}"
[strategy]
name = "sleepy"
sleep = {sleep}
"""

@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    (d / "sleepy_plugin.py").write_text(PLUGIN)
    (d / "drive.py").write_text(DRIVER)
    return d


@pytest.fixture
def sleepy(plugin_dir):
    """The test strategy registered in this process too (removed again afterwards)."""
    from fedsim import registry

    sys.path.insert(0, str(plugin_dir))
    import sleepy_plugin  # noqa: F401

    yield
    registry._REGISTRY.pop("sleepy", None)
    sys.path.remove(str(plugin_dir))


def _alive_in_group(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.split() and not line.split()[1].startswith("Z")]


def _signal_a_run(plugin_dir: Path, tmp_path: Path, backend: str, sig: int, to_group: bool = True,
                  rows: int = 3) -> dict:
    """Start `fedsim run` on the sleepy strategy, wait for `rows` rows of metrics.csv, send `sig`."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(SLEEPY.format(rounds=500, backend=backend, sleep=0.05 if backend == "inline" else 0.2))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(plugin_dir))
    proc = subprocess.Popen([sys.executable, str(plugin_dir / "drive.py"), "run", str(scenario), "--out", str(out),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    metrics = out / "metrics.csv"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never got going"
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        sent = time.time()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    left = _alive_in_group(proc.pid)
    for _ in range(10):  # a process killed at the exit may take a moment to go
        if not left:
            break
        time.sleep(0.1)
        left = _alive_in_group(proc.pid)
    return {"rc": proc.returncode, "took": took, "stderr": stderr, "left": left, "out": out,
            "summary": json.loads((out / "summary.json").read_text()),
            "metrics": metrics.read_text().splitlines()}


def _check_interrupted(result: dict, sig: int, seconds: float) -> None:
    assert result["rc"] == 128 + sig, result["stderr"][-3000:]
    assert result["took"] < seconds, result["took"]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert result["stderr"].strip().splitlines()[-1].startswith(("interrupted", "terminated"))
    summary = result["summary"]
    assert summary["status"] == "interrupted"
    rows = result["metrics"][1:]
    assert len(rows) >= 3 and summary["rounds"] >= 3  # the finished rows are kept
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, len(rows) + 1))  # complete rows, in order
    assert result["left"] == [], result["left"]  # no process of the run is left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_an_inline_run_cleanly(plugin_dir, tmp_path, sig):
    _check_interrupted(_signal_a_run(plugin_dir, tmp_path, "inline", sig), sig, seconds=5)


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [True, False], ids=["group", "driver"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_a_ray_run_cleanly(plugin_dir, tmp_path, sig, to_group):
    """Measured on the 2-core machine: about 2 s from the signal to the exit, every Ray process gone."""
    _check_interrupted(_signal_a_run(plugin_dir, tmp_path, "ray", sig, to_group=to_group), sig, seconds=8)


def test_run_scenario_outside_the_cli_still_writes_interrupted(tmp_path, sleepy, monkeypatch):
    """A plain KeyboardInterrupt (no fedsim signal handlers: run_scenario called from a script)."""
    from fedsim.config import load_scenario
    from fedsim.engine import runner

    scenario = tmp_path / "s.toml"
    scenario.write_text(SLEEPY.format(rounds=5, backend="inline", sleep=0.0))
    config = load_scenario(scenario)
    calls = {"n": 0}
    original = runner.RunRecorder.append_metrics

    def append_then_interrupt(self, row):  # noqa: ANN001
        original(self, row)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.RunRecorder, "append_metrics", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        runner.run_scenario(config, tmp_path / "run", show_progress=False)
    assert getattr(info.value, "exit_code", None) == 130
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds"] == 2


# ------------------------------------------------------------------------------------------ run directories
def _scenario(tmp_path: Path, text: str = AFL_DIGITS, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def test_a_single_variant_run_writes_its_report_into_out_never_beside_it(tmp_path):
    parent = tmp_path / "experiments"
    (parent / "other").mkdir(parents=True)
    (parent / "report.csv").write_text("another experiment's report\n")
    out = parent / "mine"
    assert main(["run", str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 0
    for name in ("report.csv", "accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / name).is_file()
    assert sorted(p.name for p in parent.iterdir()) == ["mine", "other", "report.csv"]
    assert (parent / "report.csv").read_text() == "another experiment's report\n"
    # `fedsim report DIR` writes into DIR as well
    (out / "report.csv").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.csv").is_file() and (parent / "report.csv").read_text().startswith("another")


def test_a_run_into_a_completed_run_of_another_config_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    scenario = _scenario(tmp_path)
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    first = (out / "summary.json").read_text()
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", "strategy.gamma=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and "different configuration" in err and "--overwrite" in err
    assert (out / "summary.json").read_text() == first
    # the same configuration again replaces it (nothing to lose); --overwrite replaces another one
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", "strategy.gamma=3", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["strategy"]["gamma"] == 3.0


def test_unrelated_files_are_never_overwritten_without_overwrite_and_never_deleted(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.csv").write_text("my own metrics\n")
    assert main(["run", str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and "metrics.csv, notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "notes.txt"]
    assert main(["run", str(_scenario(tmp_path)), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and _summary(out)["status"] == "completed"


def test_a_stale_directory_never_passes_as_completed(tmp_path, capsys):
    """Run A completes into D; B (another config) fails inside the run: D now says B failed, and --resume with
    B runs it again instead of saying "completed earlier"; A's files that B did not write are gone."""
    out = tmp_path / "d"
    scenario = _scenario(tmp_path)
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    assert (out / "model.pt").exists()
    failing = ["--set", "simulation.failure_rate=0.9", "--set", "partition.num_clients=2"]  # every client fails
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--overwrite", *failing]) == 2
    capsys.readouterr()
    summary = _summary(out)
    assert summary["status"] == "failed" and "none of the 2 clients answered" in summary["error"]
    assert json.loads((out / "config.json").read_text())["config"]["simulation"]["failure_rate"] == 0.9
    assert not (out / "model.pt").exists()  # A's model is not left beside B's config
    assert main(["run", str(scenario), "--out", str(out), "--resume", *failing]) == 2
    err = capsys.readouterr().err
    assert "completed earlier" not in err and "none of the 2 clients answered" in err


def test_writing_a_new_config_invalidates_the_old_summary_first(tmp_path):
    from fedsim.results.rundir import CONFIG_FILE, SUMMARY_FILE, RunRecorder, completed_run_of

    d = tmp_path / "d"
    rec = RunRecorder(d)
    rec.start({"a": 1})
    rec.write_summary({"status": "completed"})
    rec.save_table("clients.csv", __import__("pandas").DataFrame({"x": [1]}))
    (d / "mine.txt").write_text("user file")
    assert completed_run_of(d, {"a": 1}) is True
    RunRecorder(d).start({"a": 2})
    assert not (d / SUMMARY_FILE).exists() and not (d / "clients.csv").exists()
    assert json.loads((d / CONFIG_FILE).read_text())["config"] == {"a": 2}
    assert (d / "mine.txt").read_text() == "user file"
    assert completed_run_of(d, {"a": 2}) is None and completed_run_of(d, {"a": 1}) is None


def test_a_failed_run_records_why_early_failures_too(tmp_path):
    """Data loading fails inside run_scenario (the CLI's preflight would catch it before): still a summary."""
    from fedsim.config import load_scenario
    from fedsim.engine.runner import run_scenario
    from fedsim.errors import DataUnavailableError

    text = AFL_DIGITS.replace('name = "digits"', f'name = "cifar10"\nroot = "{tmp_path / "nothing"}"\n'
                              "options = { download = false }")
    config = load_scenario(_scenario(tmp_path, text))
    with pytest.raises(DataUnavailableError):
        run_scenario(config, tmp_path / "run", show_progress=False)
    summary = _summary(tmp_path / "run")
    assert summary["status"] == "failed" and "cifar10" in summary["error"] and "not available" in summary["error"]


def test_config_json_records_where_the_data_came_from(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["run", str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 0
    files = json.loads((out / "config.json").read_text())["data_files"]
    assert files == {"train": "sklearn.datasets.load_digits (bundled with scikit-learn)",
                     "test": "sklearn.datasets.load_digits (bundled with scikit-learn)"}


def _idx_pair(d: Path, split: str, n: int = 20, labels=None, label_dtype=np.uint8) -> None:  # noqa: ANN001
    from fedsim.data import write_idx

    stem = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    d.mkdir(parents=True, exist_ok=True)
    write_idx(d / stem[0], np.random.default_rng(0).integers(0, 255, (n, 28, 28), dtype=np.uint8))
    write_idx(d / stem[1], np.asarray(np.arange(n) % 10 if labels is None else labels, dtype=label_dtype))


@pytest.fixture
def fresh_data(monkeypatch):
    from fedsim import data, scenario

    data.clear_cache()
    scenario._split_cached.cache_clear()
    yield
    data.clear_cache()
    scenario._split_cached.cache_clear()


def test_both_splits_come_from_one_place(tmp_path, monkeypatch, fresh_data):
    from fedsim.data import load_dataset
    from fedsim.errors import DataUnavailableError

    both = tmp_path / "both"
    _idx_pair(both, "train")
    _idx_pair(both, "test", n=10)
    monkeypatch.setenv("FEDSIM_DATA", str(both))
    train = load_dataset("mnist", "train", download=False)
    assert str(both) in train.source and "train-images" in train.source
    only_train = tmp_path / "only-train"
    _idx_pair(only_train, "train")
    monkeypatch.setenv("FEDSIM_DATA", str(only_train))
    with pytest.raises(DataUnavailableError, match="both splits must come from one place"):
        load_dataset("mnist", "test", download=False)


# ------------------------------------------------------------------------------------------ bad input table
FEDAVG_DIGITS = """
seed = 0
rounds = 2
[data]
name = "digits"
[partition]
num_clients = 2
[model]
name = "cnn"
width = 4
[simulation]
backend = "inline"
[strategy]
name = "fedavg"
"""

DPCR_DIGITS = """
seed = 0
rounds = 20
[data]
name = "digits"
[partition]
num_clients = 1
[stream]
kind = "class-incremental"
tasks = 20
[model]
name = "cnn"
width = 4
[simulation]
backend = "inline"
[strategy]
name = "dpcr"
"""


def _case_dir_scenario(tmp):  # noqa: ANN001, ANN202
    (tmp / "dir.toml").mkdir()
    return [str(tmp / "dir.toml")]


def _case_binary_scenario(tmp):  # noqa: ANN001, ANN202
    (tmp / "bin.toml").write_bytes(bytes(range(256)) * 4)
    return [str(tmp / "bin.toml")]


def _write(tmp, text, *extra):  # noqa: ANN001, ANN002, ANN202
    return [str(_scenario(tmp, text)), *extra]


def _idx_root(tmp, **kw):  # noqa: ANN001, ANN003, ANN202
    _idx_pair(tmp / "idx", "train", **kw)
    _idx_pair(tmp / "idx", "test", n=10)
    text = AFL_DIGITS.replace('name = "digits"', f'name = "mnist"\nroot = "{tmp / "idx"}"\noptions = {{ download = false }}')
    return _write(tmp, text)


def _case_out_at_file(tmp):  # noqa: ANN001, ANN202
    (tmp / "afile").write_text("x")
    return _write(tmp, AFL_DIGITS, "--out", str(tmp / "afile"))


def _case_out_under_file(tmp):  # noqa: ANN001, ANN202
    (tmp / "afile").write_text("x")
    return _write(tmp, AFL_DIGITS, "--out", str(tmp / "afile" / "run"))


# (id, command, argv builder (gets tmp_path), field the error line starts with, words it contains)
BAD_INPUT = [
    ("directory-as-scenario", "run", _case_dir_scenario, "scenario", "not a file"),
    ("binary-scenario", "run", _case_binary_scenario, "scenario", "not a text file"),
    ("strategy-string", "validate", lambda t: _write(t, 'strategy = "fedavg"\n'), "strategy", "table"),
    ("label-wrong-type", "validate", lambda t: _write(t, AFL_DIGITS + "[[variants]]\nlabel = 3\n"),
     "variants[0].label", "wrong type"),
    ("set-wrong-type", "validate", lambda t: _write(t, AFL_DIGITS + '[[variants]]\nlabel = "a"\nset = "x"\n'),
     "variants[0].set", "wrong type"),
    ("label-escape", "run", lambda t: _write(t, AFL_DIGITS + '[[variants]]\nlabel = "../../escaped-run"\n'),
     "variants[0].label", "not a valid label"),
    ("out-at-a-file", "run", _case_out_at_file, "--out", "is a file"),
    ("out-under-a-file", "run", _case_out_under_file, "--out", "is a file"),
    ("negative-idx-labels", "run", lambda t: _idx_root(t, labels=[-3] + [1] * 19, label_dtype=np.int8), "data",
     "outside the class range"),
    ("zero-sample-idx", "run", lambda t: _idx_root(t, n=0), "data", "no samples"),
    ("every-client-fails", "run", lambda t: _write(t, FEDAVG_DIGITS, "--set", "simulation.failure_rate=0.9"),
     "simulation", "every client failed"),
    ("more-clients-than-samples", "validate",
     lambda t: _write(t, AFL_DIGITS, "--set", "partition.kind=dirichlet", "--set", "partition.num_clients=5000"),
     "partition.num_clients", "1437 training samples"),
    ("classes-per-client", "validate",
     lambda t: _write(t, AFL_DIGITS, "--set", "partition.kind=shards", "--set", "partition.classes_per_client=11"),
     "partition.classes_per_client", "10 classes"),
    ("more-tasks-than-classes", "validate", lambda t: _write(t, DPCR_DIGITS), "stream.tasks", "number of classes"),
    ("nan-imbalance-ratio", "validate",
     lambda t: _write(t, AFL_DIGITS.replace('"afl"', '"aef-ocl"') + '[stream]\nkind = "online"\nimbalance_ratio = nan\n'),
     "stream.imbalance_ratio", "finite"),
    ("unknown-torchvision-map", "validate", lambda t: _write(t, AFL_DIGITS, "--set", "model.feature_map=resnet1800"),
     "model.feature_map", "resnet1800"),
    ("model-width-1e9", "validate", lambda t: _write(t, FEDAVG_DIGITS, "--set", "model.width=1000000000"),
     "model.width", "memory"),
    ("model-width-1e5", "run", lambda t: _write(t, FEDAVG_DIGITS, "--set", "model.width=100000"),
     "model.width", "TiB"),
    ("afl-feature-dim-1e9", "run", lambda t: _write(t, AFL_DIGITS, "--set", "model.feature_dim=1000000000"),
     "model.feature_dim", "PiB"),
    ("unreachable-ray-address", "validate",
     lambda t: _write(t, AFL_DIGITS.replace('"inline"', '"ray"'), "--set", 'simulation.ray_address="127.0.0.1:1"'),
     "simulation.ray_address", "cannot reach"),
]


@pytest.mark.parametrize("case, command, build, field, words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_error_line_naming_the_field(tmp_path, capsys, fresh_data, case, command, build, field,
                                                      words):
    work = tmp_path / "work"
    work.mkdir()
    argv = build(work)
    extra = ["--out", str(tmp_path / "out"), "--quiet"] if command == "run" and "--out" not in argv else []
    if command == "run" and "--quiet" not in argv + extra:
        extra.append("--quiet")
    assert main([command, *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {field}: "), lines[0]
    assert words in lines[0], lines[0]


def test_num_gpus_without_a_gpu_is_refused_by_validate(tmp_path, capsys):
    from fedsim.preflight import gpu_count

    if gpu_count():
        pytest.skip("a GPU is visible here")
    scenario = _scenario(tmp_path, AFL_DIGITS.replace('"inline"', '"ray"'))
    assert main(["validate", str(scenario), "--set", "simulation.num_gpus=1"]) == 2
    assert capsys.readouterr().err.startswith("error: simulation.num_gpus: 1.0 GPUs per client requested")


def test_preflight_refuses_sizes_beyond_the_machine_with_the_size(tmp_path):
    from fedsim.config import load_scenario
    from fedsim.errors import ConfigError
    from fedsim.preflight import check_memory

    config = load_scenario(_scenario(tmp_path), ["model.feature_dim=100000"])
    with pytest.raises(ConfigError, match=r"^model.feature_dim: 100000 needs about 149.0 GiB"):
        check_memory(config, (1, 8, 8), 10, memory=64 * 2**30)
    small = load_scenario(_scenario(tmp_path), ["model.feature_dim=2048"])
    estimates = check_memory(small, (1, 8, 8), 10, memory=64 * 2**30)
    assert estimates["feature_bytes"] == 2 * 8 * 2048**2 + 4 * 64 * 2048
    assert 0 < estimates["model_parameters"] < 10**7


def test_validate_and_load_stay_torch_free_until_preflight(tmp_path):
    code = ("import sys; from fedsim.config import load_scenarios; "
            f"load_scenarios({str(_scenario(tmp_path))!r}); assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------ fedsim report
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    scenario = _scenario(root, AFL_DIGITS + '[[variants]]\nlabel = "a"\n[[variants]]\nlabel = "b"\n'
                         'set = { "strategy.gamma" = 2.0 }\n')
    assert main(["run", str(scenario), "--out", str(root / "runs"), "--quiet"]) == 0
    return root / "runs"


@pytest.mark.parametrize("damage", ["truncated-summary", "binary-summary", "json-list-summary", "binary-metrics",
                                    "foreign-metrics"])
def test_report_skips_an_unreadable_run_with_a_warning(two_runs, tmp_path, capsys, damage):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(two_runs, runs)
    b = runs / "b"
    if damage == "truncated-summary":
        (b / "summary.json").write_text((b / "summary.json").read_text()[:40])
    elif damage == "binary-summary":
        (b / "summary.json").write_bytes(b"\x00\xff\xfe" * 50)
    elif damage == "json-list-summary":
        (b / "summary.json").write_text("[1, 2]")
    elif damage == "binary-metrics":
        (b / "metrics.csv").write_bytes(bytes(range(256)) * 8)
    else:
        (b / "metrics.csv").write_text("x,y\n1,2\n")
    assert main(["report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warning) == 1 and str(b) in warning[0]
    import pandas as pd

    assert list(pd.read_csv(tmp_path / "rep" / "report.csv")["run"]) == ["a"]
    # every run unreadable: one error line, exit 2
    a = runs / "a"
    (a / "summary.json").write_text("{")
    assert main(["report", str(runs), "--out", str(tmp_path / "rep2")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: report: none of the 2 run directories")


def test_out_on_a_read_only_file_system_is_one_error_line(tmp_path, capsys, monkeypatch):
    """As root no directory is unwritable, so the read-only file system is simulated: access(2) says EROFS."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path).startswith(str(tmp_path / "ro"))
                        else real_access(path, mode, **kw))
    (tmp_path / "ro").mkdir()
    assert main(["run", str(_scenario(tmp_path)), "--out", str(tmp_path / "ro" / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: cannot write into ") and "Traceback" not in err
    assert list((tmp_path / "ro").iterdir()) == []


def test_report_out_at_a_file_is_one_error_line(two_runs, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["report", str(two_runs), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: report: cannot write into ") and (tmp_path / "afile").read_text() == "x"


def test_directories_from_before_the_manifest_are_still_recognised(tmp_path):
    """Runs written before .fedsim-files existed: re-running the same scenario into them is not refused (their
    tables and report files count as fedsim's), but only the fixed run files are deleted on that guess."""
    out = tmp_path / "runs"
    scenario = _scenario(tmp_path, AFL_DIGITS + '[[variants]]\nlabel = "a"\n[[variants]]\nlabel = "b"\n'
                         'set = { "strategy.gamma" = 2.0 }\n')
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    for manifest in out.rglob(".fedsim-files"):
        manifest.unlink()
    (out / "a" / "notes.txt").write_text("mine")
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 2  # notes.txt is foreign
    (out / "a" / "notes.txt").unlink()
    (out / "a" / "mine.csv").write_text("user table")
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    assert (out / "a" / "mine.csv").read_text() == "user table"
