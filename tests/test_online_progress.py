"""The progress line of an online-stream run counts stream steps against the stream's length (it read
"round 97/10" before: the step over the number of evaluation rows)."""

from __future__ import annotations

import re

import pytest

from conftest import aef_ocl_one_client, scenario_config

from fedsim.engine.runner import run_scenario


@pytest.mark.parametrize("strategy", ["aef-ocl", "online-sgd", "joint-ridge"])
def test_online_progress_counts_steps_of_the_stream(strategy, tmp_path, capsys):
    text = aef_ocl_one_client(max_train=300, max_test=200, imbalance_ratio=10, buffer_width=64, eval_every=5)
    config = scenario_config(text, tmp_path, f"strategy.name={strategy!r}".replace("'", '"'))
    summary = run_scenario(config, tmp_path / "run", label=strategy, show_progress=True)
    lines = re.findall(r"\[" + re.escape(strategy) + r"\] round (\d+)/(\d+)", capsys.readouterr().err)
    assert lines, "no progress line"
    steps, totals = zip(*((int(a), int(b)) for a, b in lines))
    assert len(set(totals)) == 1 and steps[-1] == totals[0]  # the last row is the stream's last step
    assert all(s <= totals[0] for s in steps) and summary["status"] == "completed"
