"""Security: no telemetry, no path escapes out of --out, no code run from data files, run files with the umask."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import AFL_DIGITS, subprocess_env
from fedsim.cli import main
from fedsim.errors import DataUnavailableError

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh process: none of fedsim's quiet settings, HOME in tmp_path."""
    return subprocess_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"), **extra)


# ------------------------------------------------------------------------------------------------ telemetry
def test_importing_fedsim_turns_telemetry_off_before_flower_reads_it(tmp_path):
    code = ("import os, fedsim, flwr.supercore.telemetry as t; "
            "print(t.FLWR_TELEMETRY_ENABLED, os.environ['RAY_USAGE_STATS_ENABLED'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_clean_env(tmp_path), cwd=ROOT)
    assert out.stdout.split() == ["0", "0"]
    # a user who turns telemetry on explicitly keeps it (setdefault, not overwrite)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_clean_env(tmp_path, FLWR_TELEMETRY_ENABLED="1"), cwd=ROOT)
    assert out.stdout.split()[0] == "1"


TELEMETRY_PROBE = """
import sys, time
import fedsim.engine.telemetry as telemetry
import flwr.simulation
rs = sys.modules["flwr.simulation.run_simulation"]  # the module (the package attribute is the function)
if sys.argv[1] == "silenced":
    assert telemetry.silence_flower_telemetry()
rs.event(rs.EventType.PYTHON_API_RUN_SIMULATION_ENTER, event_details={"backend": "ray"})
time.sleep(1.0)  # Flower builds the event on a daemon thread
"""


def test_no_telemetry_event_is_built(tmp_path):
    """FLWR_TELEMETRY_LOGGING=1 makes Flower log every event it builds (with the payload it would POST)."""
    env = _clean_env(tmp_path, FLWR_TELEMETRY_LOGGING="1")
    run = [sys.executable, "-c", TELEMETRY_PROBE]
    control = subprocess.run(run + ["control"], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert "POST" in control.stderr  # the probe sees events: Flower builds them even with sending disabled
    (tmp_path / ".flwr" / "source").unlink()  # ...and writes a persistent id into ~/.flwr
    silenced = subprocess.run(run + ["silenced"], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert "POST" not in silenced.stderr, silenced.stderr
    assert not (tmp_path / ".flwr" / "source").exists()


def test_the_runner_silences_telemetry_before_the_simulation_starts(tmp_path, monkeypatch):
    """run_scenario on the Ray backend: at the moment run_simulation is called, Flower's event is the no-op."""
    import flwr.simulation

    from fedsim.config import load_scenario
    from fedsim.engine import ray_backend, runner, telemetry

    seen = {}

    def fake_run_simulation(**kwargs):  # noqa: ANN003
        seen["event"] = sys.modules["flwr.simulation.run_simulation"].event
        raise RuntimeError("stop before Ray starts")

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.setattr(ray_backend, "_init_ray", lambda init_args: None)
    scenario = tmp_path / "s.toml"
    scenario.write_text(AFL_DIGITS.replace('backend = "inline"', 'backend = "ray"'))
    with pytest.raises(BaseException, match="stop before Ray starts"):
        runner.run_scenario(load_scenario(scenario), tmp_path / "run", show_progress=False)
    assert seen["event"] is telemetry._no_telemetry_event


@pytest.mark.slow
def test_a_ray_run_builds_no_telemetry_event(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text(AFL_DIGITS.replace('backend = "inline"', 'backend = "ray"'))
    env = _clean_env(tmp_path, FLWR_TELEMETRY_LOGGING="1")
    out = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(tmp_path / "run"),
                          "--quiet"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "POST" not in out.stderr and "telemetry" not in out.stderr.lower()
    assert not (tmp_path / ".flwr" / "source").exists()


# -------------------------------------------------------------------------------------- labels and --out
def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("label", ["../../escaped-run", "/abs", "/tmp/fedsim-escaped", ".", "..", "", "a/b",
                                   "a\\b", "x\x00y"])
def test_a_label_never_escapes_out(tmp_path, capsys, label):
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    toml_label = label.replace("\\", "\\\\").replace("\x00", "\\u0000")
    scenario = work / "s.toml"
    scenario.write_text(AFL_DIGITS + f'\n[[variants]]\nlabel = "{toml_label}"\n\n[[variants]]\nlabel = "ok"\n')
    before = _tree(tmp_path)
    assert main(["run", str(scenario), "--out", str(work / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: variants[0].label: ") and "Traceback" not in err
    assert _tree(tmp_path) == before  # nothing written anywhere, not even --out
    assert not Path("/tmp/fedsim-escaped").exists() and not Path("/abs").exists()


@pytest.mark.parametrize("value, why", [("1", "wrong type"), ("true", "wrong type"), ('["a"]', "wrong type")])
def test_a_label_of_the_wrong_type_is_refused(tmp_path, capsys, value, why):
    scenario = tmp_path / "s.toml"
    scenario.write_text(AFL_DIGITS + f"\n[[variants]]\nlabel = {value}\n")
    assert main(["validate", str(scenario)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: variants[0].label: ") and why in err


def test_a_scenario_name_that_would_escape_is_refused(tmp_path, capsys):
    """A scenario without variants names its run by `name`: the same rule applies."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "../up"\n' + AFL_DIGITS)
    assert main(["run", str(scenario), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: name: ")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "up").exists()


# ------------------------------------------------------------------------------------- CIFAR pickles
class _RunsCommand:
    """Unpickling this runs a shell command (what a crafted data file would do with pickle.load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _write_batches(folder: Path, n: int = 5, protocol: int = pickle.DEFAULT_PROTOCOL, evil: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    evil = evil or {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": "training batch", "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 "labels": [np.int64(i % 10) for i in range(n)], "filenames": [f"img{i}.png" for i in range(n)]}
        batch.update(evil.get(name, {}))
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072, **evil.get("batches.meta", {})}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))


@pytest.fixture
def fresh_data_cache():
    from fedsim import data

    data.clear_cache()
    yield
    data.clear_cache()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_valid_cifar_batches_load_with_the_restricted_unpickler(tmp_path, fresh_data_cache, protocol):
    from fedsim.data import load_dataset

    _write_batches(tmp_path / "cifar-10-batches-py", n=4, protocol=protocol)
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert len(train) == 20 and len(test) == 4 and train.input_shape == (3, 32, 32)
    assert train.classes[3] == "c3" and list(test.labels) == [0, 1, 2, 3]


@pytest.mark.parametrize("victim", ["data_batch_3", "batches.meta", "test_batch"])
def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, fresh_data_cache, victim):
    from fedsim.data import load_dataset

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder, evil={victim: {"payload": _RunsCommand(marker)}})
    split = "test" if victim == "test_batch" else "train"
    with pytest.raises(DataUnavailableError) as info:
        load_dataset("cifar10", split, root=tmp_path, download=False)
    assert str(folder / victim) in str(info.value) and "os" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_fedsim_run_refuses_a_crafted_cifar_root(tmp_path, capsys, fresh_data_cache):
    marker = tmp_path / "pwned"
    _write_batches(tmp_path / "data" / "cifar-10-batches-py", evil={"data_batch_1": {"x": _RunsCommand(marker)}})
    scenario = tmp_path / "s.toml"
    scenario.write_text(AFL_DIGITS.replace('name = "digits"', f'name = "cifar10"\nroot = "{tmp_path / "data"}"'))
    assert main(["run", str(scenario), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data_batch_1" in err and "Traceback" not in err
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_run_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    from fedsim.results.rundir import atomic_write

    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
        atomic_write(tmp_path / "atomic.txt", "x")
        atomic_write(tmp_path / "atomic.bin", b"x")
    finally:
        os.umask(previous)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == plain
    assert stat.S_IMODE((tmp_path / "atomic.bin").stat().st_mode) == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.bin", "atomic.txt", "plain.txt"]  # no leftovers


def test_replacing_a_file_keeps_its_mode(tmp_path):
    from fedsim.results.rundir import atomic_write

    path = tmp_path / "summary.json"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_run_directory_is_written_with_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        scenario = tmp_path / "s.toml"
        scenario.write_text(AFL_DIGITS)
        assert main(["run", str(scenario), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {"config.json", "summary.json", "metrics.csv", "model.pt"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
