"""Issue #23, run directories: one fedsim run at a time per directory (``.fedsim-lock``, flock), ``--resume``
never trusts an unreadable metrics.csv, and an interrupt says what summary.json really says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AFL_DIGITS
from fedsim.cli import main
from fedsim.results.rundir import LOCK_FILE, RunDirLocked, RunRecorder, lock_run_dir

ROOT = Path(__file__).resolve().parents[1]
FEDSIM = [sys.executable, "-m", "fedsim.cli"]
WAIT = 180.0  # seconds a subprocess gets to reach a state on a busy machine

# a strategy whose rounds only sleep: a run that lasts until it is interrupted
PLUGIN = '''
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedsim.registry import StrategySpec, register_strategy


@dataclass
class NapParams:
    sleep: float = 0.05


class NapServer:
    def __init__(self, params):
        self.params = params

    def run(self, ctx):
        for r in range(1, ctx.config.rounds + 1):
            ctx.send(RecordDict({"nap": ConfigRecord({"r": r})}), round=r)
            ctx.log(r, accuracy=0.5)
        ctx.summary(final_accuracy=0.5)


class NapClient:
    def __init__(self, params):
        self.params = params

    def train(self, content, env):
        time.sleep(self.params.sleep)
        return RecordDict({"nap": ConfigRecord({"pid": env.partition_id})})


register_strategy(StrategySpec(name="nap", params=NapParams, server="nap_plugin:NapServer",
                               client="nap_plugin:NapClient", description="test strategy: sleeps"))
'''

DRIVER = '''
import sys
import nap_plugin  # noqa: F401
from fedsim.cli import main
sys.exit(main())
'''

NAP = """
seed = 0
rounds = 100000
[data]
name = "digits"
[partition]
num_clients = 2
[simulation]
backend = "inline"
[strategy]
name = "nap"
"""

HOLDER = '''
import sys, time
from fedsim.results.rundir import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
lock.release()
'''


def _env(*paths: Path) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*(str(p) for p in paths), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")]))


def _stop(proc: subprocess.Popen) -> None:
    """Every process a test started ends, whatever happened."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _hold(tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir`` (as a fedsim run does from its checks to its end)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
    except BaseException:
        _stop(proc)
        raise
    return proc


def _wait_for(condition, timeout: float = WAIT, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _scenario(tmp_path: Path, text: str = AFL_DIGITS) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- the lock
def test_a_run_into_a_directory_another_process_holds_is_refused_and_kill_9_frees_it(tmp_path, capsys):
    out = tmp_path / "run"
    scenario = _scenario(tmp_path)
    holder = _hold(tmp_path, out)
    try:
        assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)
        assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: --out: {out} is in use: another fedsim run (process {holder.pid}) is writing it; "
                       "wait for that run to end, or choose another --out\n")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, nothing deleted
        # --resume and --overwrite do not get past it either
        assert main(["run", str(scenario), "--out", str(out), "--quiet", "--overwrite"]) == 2
        assert main(["run", str(scenario), "--out", str(out), "--quiet", "--resume"]) == 2
        assert "another fedsim run" in capsys.readouterr().err
        holder.kill()  # kill -9: the kernel drops the flock; the stale file does not block anyone
        holder.wait(timeout=30)
        assert (out / LOCK_FILE).exists()
        assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
        assert json.loads((out / "summary.json").read_text())["status"] == "completed"
        assert not (out / LOCK_FILE).exists()  # released (and removed) at the end of the run
    finally:
        _stop(holder)


def test_two_concurrent_fedsim_runs_into_one_out_the_second_refuses(tmp_path):
    """Run A holds --out from its checks on; run B (another configuration) exits 2 with one error line naming the
    directory, and A's config.json is the one there (B never wrote it)."""
    (tmp_path / "nap_plugin.py").write_text(PLUGIN)
    (tmp_path / "drive.py").write_text(DRIVER)
    scenario = _scenario(tmp_path, NAP)
    out = tmp_path / "run"
    a = subprocess.Popen([sys.executable, str(tmp_path / "drive.py"), "run", str(scenario), "--out", str(out),
                          "--quiet"], stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=tmp_path)
    try:
        _wait_for(lambda: (out / "metrics.csv").exists() or a.poll() is not None, what="run A's first round")
        assert a.poll() is None, a.stderr.read()
        assert (out / LOCK_FILE).read_text().strip() == str(a.pid)
        b = subprocess.run([sys.executable, str(tmp_path / "drive.py"), "run", str(scenario), "--out", str(out),
                            "--quiet", "--set", "strategy.sleep=0.01", "--overwrite"], capture_output=True,
                           text=True, env=_env(tmp_path), cwd=tmp_path, timeout=WAIT)
        assert b.returncode == 2, b.stderr
        assert b.stderr.splitlines() == [f"error: --out: {out} is in use: another fedsim run (process {a.pid}) is "
                                         "writing it; wait for that run to end, or choose another --out"]
        assert json.loads((out / "config.json").read_text())["config"]["strategy"]["sleep"] == 0.05  # A's
        a.send_signal(signal.SIGINT)
        a.wait(timeout=WAIT)
        assert a.returncode == 130
        assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
        assert not (out / LOCK_FILE).exists()
    finally:
        _stop(a)


def test_a_sweep_holds_every_run_directory_without_locking_itself_out(tmp_path, capsys):
    scenario = _scenario(tmp_path)
    out = tmp_path / "sweep"
    holder = _hold(tmp_path, out / "seed-1")
    try:
        assert main(["run", str(scenario), "--out", str(out), "--seeds", "2", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out: {out / 'seed-1'} is in use: another fedsim run (process {holder.pid})")
        assert sorted(p.name for p in out.iterdir()) == ["seed-1"]  # seed-0 (created for its lock) is gone again
    finally:
        _stop(holder)
    assert main(["run", str(scenario), "--out", str(out), "--seeds", "2", "--quiet"]) == 0
    for seed in (0, 1):
        assert json.loads((out / f"seed-{seed}" / "summary.json").read_text())["status"] == "completed"
        assert not (out / f"seed-{seed}" / LOCK_FILE).exists()


def test_the_lock_is_reentrant_in_one_process_and_released_with_the_recorder(tmp_path):
    d = tmp_path / "d"
    outer = lock_run_dir(d)
    recorder = RunRecorder(d)
    recorder.start({"a": 1})  # the CLI holds it, the run takes it again: no deadlock
    recorder.close()
    assert (d / LOCK_FILE).exists()  # still the CLI's
    outer.release()
    assert not (d / LOCK_FILE).exists()
    with lock_run_dir(tmp_path / "new" / "deeper"):
        pass
    assert not (tmp_path / "new").exists()  # folders created only for the lock are removed when nothing was written
    with pytest.raises(Exception, match="is a file"):
        (tmp_path / "f").write_text("x")
        lock_run_dir(tmp_path / "f")


LOCK_THEN_WRITE_BELOW = '''
import subprocess, sys
from fedsim.results.rundir import lock_run_dir

lock = lock_run_dir(sys.argv[1])
WRITE = "import sys; from fedsim.results.rundir import RunRecorder; r = RunRecorder(sys.argv[1]); " \\
        "r.start({'a': 1}); r.write_summary({'status': 'completed'}); r.close()"
grandchild = subprocess.run([sys.executable, "-c", WRITE, sys.argv[1]], capture_output=True, text=True, timeout=120)
print("grandchild", grandchild.returncode, grandchild.stderr.strip().splitlines()[-1:], flush=True)
print("held", flush=True)
sys.stdin.read()
'''


def test_a_recorder_in_another_process_is_refused_but_one_below_the_holder_writes(tmp_path):
    """fedsim deploy holds its run directories while its ServerApp (a process below it) writes them."""
    d = tmp_path / "d"
    (tmp_path / "child.py").write_text(LOCK_THEN_WRITE_BELOW)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(d)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "grandchild 0 []"
        assert proc.stdout.readline().strip() == "held"
        assert json.loads((d / "summary.json").read_text())["status"] == "completed"
        with pytest.raises(RunDirLocked, match=f"{d} is in use: another fedsim run \\(process {proc.pid}\\)"):
            RunRecorder(d).start({"a": 2})  # this process is above the holder, not below it
        assert json.loads((d / "config.json").read_text())["config"] == {"a": 1}
    finally:
        _stop(proc)


DEPLOY_CHILD = '''
import subprocess, sys
from pathlib import Path
from fedsim import deploy as deploy_mod


class Federation:  # a started LocalFederation as deploy sees it; run() stands for flwr run and its ServerApp
    nodes, address = 2, "127.0.0.1:1"
    routes = {"127.0.0.1:1": "/nonexistent.sock"}
    home = Path(sys.argv[3])

    def run(self, app, run_config, timeout=None):
        out = run_config["out"]
        app = subprocess.run([sys.executable, "-c", f"""
from fedsim.results.rundir import RunRecorder
r = RunRecorder({out!r}); r.start({{"deployed": 1}}); r.write_summary({{"status": "completed"}}); r.close()
"""], capture_output=True, text=True, timeout=120)
        print("serverapp", app.returncode, app.stderr.strip().splitlines()[-1:], flush=True)
        sys.stdin.read()  # the run goes on until the test says
        return 0


Federation.home.mkdir(exist_ok=True)
deploy_mod.deploy(sys.argv[1], 2, sys.argv[2], federation=Federation())
print("done", flush=True)
'''


def test_fedsim_deploy_holds_its_run_directory_while_its_serverapp_writes_it(tmp_path, capsys):
    scenario = _scenario(tmp_path)
    out = tmp_path / "deployed"
    (tmp_path / "deploy_child.py").write_text(DEPLOY_CHILD)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "deploy_child.py"), str(scenario), str(out),
                             str(tmp_path / "home")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "serverapp 0 []"  # the ServerApp wrote under deploy's lock
        assert main(["run", str(scenario), "--out", str(out), "--quiet", "--overwrite"]) == 2
        assert f"{out} is in use: another fedsim run (process {proc.pid})" in capsys.readouterr().err
        assert json.loads((out / "config.json").read_text())["config"] == {"deployed": 1}
        proc.stdin.close()
        assert proc.stdout.readline().strip() == "done"
        proc.wait(timeout=WAIT)
        assert proc.returncode == 0 and not (out / LOCK_FILE).exists()
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("damage", ["binary", "empty", "not-fedsim", "missing"])
def test_resume_runs_again_a_completed_run_whose_metrics_are_unreadable(tmp_path, capsys, damage):
    scenario = _scenario(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    metrics = out / "metrics.csv"
    if damage == "binary":
        metrics.write_bytes(b"\x00\xff\xfe garbage \x00" * 10)
    elif damage == "empty":
        metrics.write_bytes(b"")
    elif damage == "not-fedsim":
        metrics.write_text("a,b\n1,2\n")
    else:
        metrics.unlink()
    capsys.readouterr()
    assert main(["run", str(scenario), "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "completed earlier" not in err and "-> " in err  # it ran again
    assert "round" in metrics.read_text().splitlines()[0]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert main(["run", str(scenario), "--out", str(out), "--resume"]) == 0  # now intact: skipped
    assert "completed earlier" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- interrupts
def test_an_interrupt_before_the_run_directory_exists_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    import fedsim.preflight

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(fedsim.preflight, "preflight", interrupted)
    out = tmp_path / "run"
    assert main(["run", str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted (SIGINT): before any run started; no summary.json was written\n"
    assert not out.exists()


def test_an_interrupt_during_a_run_names_the_summary_that_says_interrupted(tmp_path, capsys, monkeypatch):
    from fedsim.engine import runner

    original = runner.RunRecorder.append_metrics

    def append_then_interrupt(self, row):  # noqa: ANN001, ANN202
        original(self, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.RunRecorder, "append_metrics", append_then_interrupt)
    out = tmp_path / "run"
    assert main(["run", str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"interrupted (SIGINT): the run directory keeps what was written so far ({out}; summary.json: "
                       "status interrupted)")
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


CTRL_C_DURING_IMPORTS = '''
import sys


class CtrlC:  # Ctrl-C while numpy is half imported (its C extension loaded, the package not)
    fired = False

    def find_spec(self, name, path=None, target=None):
        if name == "numpy._core.overrides" and not CtrlC.fired:
            CtrlC.fired = True
            raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, CtrlC())
from fedsim.cli import main
sys.exit(main())
'''


def test_ctrl_c_during_imports_exits_130_with_one_line(tmp_path):
    (tmp_path / "drive.py").write_text(CTRL_C_DURING_IMPORTS)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(tmp_path / "drive.py"), "run", str(_scenario(tmp_path)), "--out",
                           str(out), "--quiet"], capture_output=True, text=True, env=_env(), timeout=WAIT)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == ["interrupted (SIGINT): before any run started; no summary.json was written"]
    assert not out.exists()
