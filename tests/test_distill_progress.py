"""Long server-side loops show progress (issue #22): FedDF's distillation steps and DENSE's / Co-Boosting's
synthesis epochs report steps done / total, the current loss and the time left through the run's ``RunProgress``."""

from __future__ import annotations

import re

import pytest

from fedsim.config import config_from_dict
from fedsim.engine import progress as progress_module
from fedsim.engine.progress import RunProgress
from fedsim.engine.runner import run_scenario


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_work_lines_show_steps_loss_and_time_left(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    bar = RunProgress("feddf", total=1, work_interval=10.0)
    assert bar.work("step", 1, 100, loss=0.5) == "step 1/100  loss 0.5000  0s elapsed, ~0s left"
    clock.now += 5.0
    assert bar.work("step", 50, 100, loss=0.25) is None  # 5 s after the last line: not shown
    clock.now += 15.0  # 20 s in, a fifth of the cost done -> 80 s left
    assert bar.work("step", 60, 100, loss=0.125, fraction=0.2, lr=0.001) == \
        "step 60/100  loss 0.1250  lr 0.001  20s elapsed, ~1m20s left"
    clock.now += 1.0
    assert bar.work("step", 100, 100, loss=0.1) == "step 100/100  loss 0.1000  done in 21s"  # the last, always
    err = capsys.readouterr().err
    assert err.count("[feddf] step ") == 3 and "[feddf] step 60/100" in err
    assert RunProgress("quiet", total=1, enabled=False).work("step", 1, 2, loss=1.0) is None


def _digits(strategy: dict) -> dict:
    return {"seed": 4, "data": {"name": "digits", "max_train": 400, "max_test": 200},
            "partition": {"kind": "dirichlet", "num_clients": 3, "alpha": 1.0}, "model": {"name": "cnn", "width": 8},
            "client": {"epochs": 1, "batch_size": 32, "lr": 0.05}, "simulation": {"backend": "inline"},
            "strategy": strategy}


def test_feddf_prints_its_distillation_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(RunProgress, "WORK_INTERVAL", 0.0)  # every step gets a line
    run_scenario(config_from_dict(_digits({"name": "feddf", "steps": 12, "batch_size": 16})), tmp_path,
                 label="feddf", show_progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "distillation step" in ln]
    assert [int(re.search(r"step (\d+)/12", ln).group(1)) for ln in lines] == list(range(1, 13))
    assert all(re.search(r"loss \d+\.\d{4}", ln) for ln in lines)
    assert "left" in lines[0] and "done in" in lines[-1]


@pytest.mark.parametrize("name", ["dense", "co-boosting"])
def test_data_free_methods_print_their_epochs(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(RunProgress, "WORK_INTERVAL", 0.0)
    run_scenario(config_from_dict(_digits({"name": name, "epochs": 3, "g_steps": 2, "synthesis_batch_size": 8,
                                           "nz": 8, "ngf": 4, "batch_size": 8})),
                 tmp_path, label=name, show_progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "generator steps)" in ln]
    assert [re.search(r"\(x2 generator steps\) (\d/3)", ln).group(1) for ln in lines] == ["1/3", "2/3", "3/3"]
    assert all(re.search(r"loss \d+\.\d{4}  g_loss \S+  pool (8|16|24)\b", ln) for ln in lines)
    assert "left" in lines[0] and "done in" in lines[-1]
