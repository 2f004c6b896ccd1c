"""Mid-run resume (issue #24): a run interrupted after round 2 of 4 and resumed with ``resume=True`` ends with
exactly the metrics, clients.csv and model of the uninterrupted run (fedsim.engine.checkpoint), on the simulated
clock of a [system] section too."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fedsim.cli import main
from fedsim.engine.runner import run_scenario
from fedsim.errors import FedsimError
from fedsim.engine import checkpoint as ckpt
from fedsim.results.rundir import check_run_dir
from tests.conftest import DIGITS, scenario_config

TIME_COLUMNS = {"seconds", "elapsed_seconds"}

# 4 rounds on the digits set's 6 Dirichlet(0.5) clients (tests/conftest.py's DIGITS), half of them sampled per
# round (so the sampling RNG matters), one local epoch of a small CNN (BatchNorm buffers included)
SETTINGS = ("rounds=4", "seed=5", "model.width=8", "client.epochs=1")


def _sets(strategy: str, *overrides: str) -> list[str]:
    return [*SETTINGS, f"strategy.name={strategy}", "strategy.fraction_train=0.5", *overrides]


# a [system] section whose clock matters in every round: clients go offline and come back (Markov availability),
# miss the deadline (every round ends at it) and are over-selected (5 drawn among the online, the first 3 kept);
# summary.json's time_to_accuracy is reached at 0.2 in round 2
SYSTEM = """
[system]
availability = "markov"
online_mean_s = 8.0
offline_mean_s = 4.0
deadline_s = 4.0
over_selection = 1.5
targets = [0.2, 0.99]
"""


def _config(tmp_path, strategy: str, *overrides: str, system: str = ""):
    return scenario_config(DIGITS + system, tmp_path, *_sets(strategy, *overrides))


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
    for key in ("sim_seconds", "dropped_clients", "time_to_accuracy"):  # [system] runs: the simulated clock's
        assert sa.get(key) == sb.get(key), key
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


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_resumed_system_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, strategy):
    """A run on the simulated clock ([system]): FedAvg (Flower's loop, the clock's over-selected node sampling)
    and SCAFFOLD (the model-rounds loop) continue at the simulated time, dropped count and availability where the
    interrupted run left them: sim_seconds, dropped_clients, clients.csv's failed marks and the model equal."""
    config = _config(tmp_path, strategy, system=SYSTEM)
    full = tmp_path / "full"
    run_scenario(config, full, show_progress=False)
    metrics = pd.read_csv(full / "metrics.csv")
    summary = json.loads((full / "summary.json").read_text())
    # the clock shapes this run: it moves every round, drops and discards clients, reaches a target mid-run
    assert metrics["sim_seconds"].iloc[0] == 0 and (metrics["sim_seconds"].diff().iloc[1:] > 0).all()
    assert summary["dropped_clients"] > summary["failed_client_rounds"] > 0  # over-selection discarded some
    assert summary["time_to_accuracy"]["0.2"] is not None and summary["time_to_accuracy"]["0.99"] is None
    _assert_same_run(_interrupted_then_resumed(tmp_path, monkeypatch, config), full)


def test_resumed_fedbuff_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """FedBuff's event loop on the simulated clock, interrupted after its second server update: the clients in
    flight (their replies held in the checkpoint's events), the buffer, the staleness so far and the draw counter
    carry over, so the updates, their times and the model equal the uninterrupted run's."""
    system = SYSTEM.replace("over_selection = 1.5\n", "")  # FedBuff keeps every arrival
    config = scenario_config(DIGITS + system, tmp_path, *SETTINGS, "strategy.name=fedbuff", "strategy.buffer_size=2",
                             "strategy.concurrency=3")
    full = tmp_path / "full"
    run_scenario(config, full, show_progress=False)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["server_updates"] == 4 and summary["max_staleness"] > 0 and summary["dropped_clients"] > 0
    resumed = _interrupted_then_resumed(tmp_path, monkeypatch, config)
    _assert_same_run(resumed, full)
    again = json.loads((resumed / "summary.json").read_text())
    assert (again["mean_staleness"], again["max_staleness"]) == (summary["mean_staleness"], summary["max_staleness"])


def test_clock_state_survives_a_checkpoint(tmp_path):
    """SimClock.checkpoint_state / restore_state (pickled, as checkpoint.pkl holds it): a fresh clock of the same
    configuration continues with the interrupted one's time, drops, timings and generated availability periods."""
    import pickle

    from fedsim.engine.clock import SimClock

    config = _config(tmp_path, "fedavg", system=SYSTEM)
    clock = SimClock.for_config(config)
    clock.now, clock.dropped = 37.5, 4
    clock.observe(0.5)
    online = [clock.available(t) for t in (0.0, 20.0, 37.5)]  # generates periods up to 37.5 s
    clock.last = {1: clock.timing(1, 37.5, 1000, 50.0, 1000)}
    state = pickle.loads(pickle.dumps(clock.checkpoint_state()))
    fresh = SimClock.for_config(config)
    fresh.restore_state(state)
    assert (fresh.now, fresh.dropped, fresh.last, fresh.summary()) == \
        (clock.now, clock.dropped, clock.last, clock.summary())
    assert fresh.summary()["time_to_accuracy"] == {"0.2": 37.5, "0.99": None}
    assert fresh.fleet.availability.intervals == clock.fleet.availability.intervals
    assert [fresh.available(t) for t in (0.0, 20.0, 37.5)] == online
    assert [fresh.available(t) for t in (50.0, 90.0, 300.0)] == [clock.available(t) for t in (50.0, 90.0, 300.0)]
    assert fresh.fleet.availability.intervals == clock.fleet.availability.intervals  # both drew the same later ones


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
    """A strategy whose server part does not set ``resumes_mid_run`` (AFL, one-shot, ...) says it starts from the
    beginning."""
    config = _config(tmp_path, "fedavg")
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "metrics.csv").write_text("round\n0\n")
    from fedsim.engine import runner

    class _Spec:
        name = "afl"

        @staticmethod
        def server_class():
            return object

    assert runner._checkpoint_to_resume(config, _Spec, run_dir, None) is None
    assert "strategy 'afl' does not resume mid-run; running it again from the beginning" in \
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


@pytest.mark.parametrize("strategy,stateful", [("fedavg", False), ("scaffold", True)])
def test_a_round_checkpoint_asks_only_the_nodes_whose_client_state_may_have_changed(tmp_path, monkeypatch,
                                                                                      strategy, stateful):
    """FedAvg's clients keep no state: no node is asked for one (at 1,000 clients the checkpoint's 1,000
    queries a round cost 16% of the run's CPU). SCAFFOLD's keep their c_i: each checkpoint asks exactly the nodes
    trained in that round (half of them), and still holds the state of every client trained so far."""
    from fedsim.engine.accounting import CLIENT_SEPARATOR

    asked: list[set[int]] = []
    trained: list[set[int]] = []
    query, collect = ckpt.RoundCheckpoint._query, ckpt.RoundCheckpoint._collect_client_states

    def counted(self, nodes, op, contents=None):  # noqa: ANN001, ANN202
        if op == "get":
            asked.append(set(nodes))
        return query(self, nodes, op, contents)

    def noted(self):  # noqa: ANN001, ANN202
        frame = self.ctx.grid.ledger.frame()
        selected = frame[frame["selected"]]
        latest = set(selected[selected["round"] == selected["round"].max()]["client"])
        trained.append({n for n, clients in self.ctx.grid.node_clients.items() if latest & set(clients)})
        blob = collect(self)
        proto = ckpt.ProtoRecordDict()
        proto.ParseFromString(blob)
        held = {int(k.split(CLIENT_SEPARATOR)[0]) for k in ckpt.recorddict_from_proto(proto).keys()}
        assert held == (set(selected["client"]) if stateful else set())
        return blob

    monkeypatch.setattr(ckpt.RoundCheckpoint, "_query", counted)
    monkeypatch.setattr(ckpt.RoundCheckpoint, "_collect_client_states", noted)
    run_scenario(_config(tmp_path, strategy), tmp_path / "run", show_progress=False)
    assert len(trained) == 4  # one checkpoint per round
    if stateful:
        assert asked == trained and all(0 < len(t) < 6 for t in trained)
    else:
        assert asked == []
