"""Mid-run resume (issue #24): a run interrupted after round 2 of 4 and resumed with ``resume=True`` ends with
exactly the metrics, clients.csv and model of the uninterrupted run (fedsim.results.checkpoint)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fedsim.cli import main
from fedsim.engine.runner import run_scenario
from fedsim.errors import FedsimError
from fedsim.results import checkpoint as ckpt
from fedsim.results.rundir import check_run_dir
from tests.conftest import DIGITS, scenario_config

TIME_COLUMNS = {"seconds", "elapsed_seconds"}

# 4 rounds on the digits set's 6 Dirichlet(0.5) clients (tests/conftest.py's DIGITS), half of them sampled per
# round (so the sampling RNG matters), one local epoch of a small CNN (BatchNorm buffers included)
SETTINGS = ("rounds=4", "seed=5", "model.width=8", "client.epochs=1")


def _sets(strategy: str, *overrides: str) -> list[str]:
    return [*SETTINGS, f"strategy.name={strategy}", "strategy.fraction_train=0.5", *overrides]


def _config(tmp_path, strategy: str, *overrides: str):
    return scenario_config(DIGITS, tmp_path, *_sets(strategy, *overrides))


def _cli(tmp_path, strategy: str, *args: str) -> int:
    """``fedsim run`` of the scenario ``_config`` loads, with the same settings."""
    sets = [a for kv in _sets(strategy) for a in ("--set", kv)]
    return main(["run", str(tmp_path / "scenario.toml"), *sets, *args, "--quiet"])


def _interrupt_after(monkeypatch, stop_round: int) -> None:
    """The server raises KeyboardInterrupt (what SIGINT / SIGTERM become) right after checkpointing round
    ``stop_round``."""
    save = ckpt.RoundCheckpoint.save

    def save_then_stop(self, round_, state):  # noqa: ANN001, ANN202
        save(self, round_, state)
        if round_ == stop_round:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.RoundCheckpoint, "save", save_then_stop)


def _assert_same_run(resumed, full) -> None:  # noqa: ANN001
    got, want = pd.read_csv(resumed / "metrics.csv"), pd.read_csv(full / "metrics.csv")
    assert list(got["round"]) == [0, 1, 2, 3, 4]
    assert list(got.columns) == list(want.columns)
    columns = [c for c in want.columns if c not in TIME_COLUMNS]
    pd.testing.assert_frame_equal(got[columns], want[columns], check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "clients.csv"), pd.read_csv(full / "clients.csv"),
                                  check_exact=True)
    a = torch.load(resumed / "model_state.pt", weights_only=True)
    b = torch.load(full / "model_state.pt", weights_only=True)
    assert list(a) == list(b)
    for key in b:
        assert torch.equal(a[key], b[key]), key
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (resumed, full))
    for key in ("status", "final_accuracy", "bytes_up", "bytes_down", "failed_client_rounds", "rounds"):
        assert sa[key] == sb[key], key
    assert not (resumed / ckpt.CHECKPOINT_FILE).exists()  # a completed run keeps no checkpoint


def _interrupted_then_resumed(tmp_path, monkeypatch, config, via_cli: bool = False):  # noqa: ANN001, ANN202
    run_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_scenario(config, run_dir, show_progress=False)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert list(pd.read_csv(run_dir / "metrics.csv")["round"]) == [0, 1, 2]
    assert (run_dir / ckpt.CHECKPOINT_FILE).exists()
    assert check_run_dir(run_dir, config.to_dict(), resume=True) is True  # fedsim run --resume's check: run it
    calls = []
    resume = ckpt.RoundCheckpoint.resume

    def counted(self):  # noqa: ANN001, ANN202
        out = resume(self)
        calls.append(out and out["round"])
        return out

    monkeypatch.setattr(ckpt.RoundCheckpoint, "resume", counted)
    if via_cli:
        assert _cli(tmp_path, config.strategy.name, "--out", str(run_dir), "--resume") == 0
    else:
        run_scenario(config, run_dir, show_progress=False, resume=True)
    assert calls == [2]  # it continued after round 2, it did not start again
    return run_dir


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "scaffold"])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, strategy):
    """FedAvg (Flower's loop, Flower's `random` sampling), FedAdam (the server optimizer's m_t, v_t) and SCAFFOLD
    (the model-rounds loop, the server's c and every client's c_i in the nodes' state)."""
    config = _config(tmp_path, strategy)
    full = tmp_path / "full"
    run_scenario(config, full, show_progress=False)
    # FedAvg resumes through `fedsim run --resume` itself
    _assert_same_run(_interrupted_then_resumed(tmp_path, monkeypatch, config, via_cli=strategy == "fedavg"), full)


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path, "fedavg")
    run_dir = tmp_path / "run"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(config, run_dir, show_progress=False)
    other = _config(tmp_path, "fedavg", "client.lr=0.1", "seed=6")
    assert check_run_dir(run_dir, other.to_dict(), resume=True) is True  # an interrupted run: run it, but...
    with pytest.raises(ckpt.CheckpointMismatch, match=r"different configuration \(differs in: client.lr, seed\)"):
        ckpt.check_compatible(run_dir, other.to_dict())  # ...what fedsim run --resume checks before any run
    with pytest.raises(ckpt.CheckpointMismatch, match="pass --overwrite to start this one from the beginning"):
        run_scenario(other, run_dir, show_progress=False, resume=True)
    before = (run_dir / ckpt.CHECKPOINT_FILE).read_bytes()
    assert _cli(tmp_path, "fedavg", "--out", str(run_dir), "--set", "client.lr=0.1", "--resume") == 2  # refused
    assert "is the checkpoint of a run of a different configuration (differs in: client.lr)" in capsys.readouterr().err
    assert (run_dir / ckpt.CHECKPOINT_FILE).read_bytes() == before
    assert ckpt.check_compatible(run_dir, config.to_dict()) is True


def test_a_strategy_without_checkpoints_runs_again_with_a_note(tmp_path, capsys):
    """FedBuff (an event loop, no rounds to checkpoint) says it starts from the beginning."""
    config = _config(tmp_path, "fedavg")
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "metrics.csv").write_text("round\n0\n")
    from fedsim.engine import runner

    class _Spec:
        name = "fedbuff"

        @staticmethod
        def server_class():
            return object

    assert runner._checkpoint_to_resume(config, _Spec, run_dir, None) is None
    assert "strategy 'fedbuff' does not resume mid-run; running it again from the beginning" in \
        capsys.readouterr().err


def test_checkpoint_is_refused_when_unreadable(tmp_path):
    (tmp_path / ckpt.CHECKPOINT_FILE).write_bytes(b"not a pickle")
    with pytest.raises(FedsimError, match="cannot be read"):
        ckpt.load(tmp_path, {})


@pytest.mark.slow
def test_resumed_ray_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """The same on the Ray backend: the clients' SCAFFOLD controls travel from and back to Ray actors' nodes."""
    config = _config(tmp_path, "scaffold", "simulation.backend=ray")
    full = tmp_path / "full"
    run_scenario(config, full, show_progress=False)
    _assert_same_run(_interrupted_then_resumed(tmp_path, monkeypatch, config), full)
