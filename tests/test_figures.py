"""fedsim report's figures (issue #24), on run directories written by hand: one figure per kind of run with its
own x-axis, one style per method in every figure, distinct colour/marker/line style for 12 methods, PNG at
>= 200 dpi beside PDF and SVG, labelled bands, integer round ticks, byte ticks in kB/MB, short legends, the sweep
plot's means and 95% intervals, the task heat map's cells, stale figures removed."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import t

from fedsim.results import figures
from fedsim.results.report import load_grouped, report


def _run(d, label, *, kind="federated", seed=0, acc=0.5, rounds=(0, 1, 2), stream=None, tasks=None, matrix=None,
         bytes_per_round=1_000_000):
    d.mkdir(parents=True)
    summary = {"label": label, "kind": kind, "seed": seed, "status": "completed", "final_accuracy": acc,
               "best_accuracy": acc, "bytes_up": bytes_per_round * len(rounds), "bytes_down": 10, "wall_seconds": 1.0}
    if tasks:
        summary["num_tasks"] = tasks
    (d / "summary.json").write_text(json.dumps(summary))
    config = {"config": {"stream": {"kind": stream or "none", "batch_size": 10}}}
    (d / "config.json").write_text(json.dumps(config))
    accs = np.linspace(0.1, acc, len(rounds))
    pd.DataFrame({"round": list(rounds), "accuracy": accs,
                  "bytes_up": [bytes_per_round * (i + 1) for i in range(len(rounds))]}).to_csv(d / "metrics.csv",
                                                                                              index=False)
    if matrix is not None:
        frame = pd.DataFrame(matrix, index=[f"after_task_{i}" for i in range(len(matrix))],
                             columns=[f"task_{j}" for j in range(len(matrix))])
        frame["seen"] = np.nanmean(matrix, axis=1)
        frame.index.name = "row"
        frame.to_csv(d / "accuracy_matrix.csv")


MATRICES = [np.array([[0.9, np.nan], [0.3, 0.8]]), np.array([[0.7, np.nan], [0.5, 0.6]]),
            np.array([[0.8, np.nan], [0.1, 1.0]])]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "runs"
    for s in range(3):
        _run(root / "fedavg" / f"seed-{s}", "fedavg", seed=s, acc=0.5 + 0.1 * s, rounds=(0, 1, 2, 3))
        _run(root / "fedprox" / f"seed-{s}", "fedprox", seed=s, acc=0.55 + 0.1 * s, rounds=(0, 1, 2, 3))
        # online: the evaluated steps differ by seed, as AEF-OCL's phases do
        _run(root / "aef-ocl" / f"seed-{s}", "aef-ocl", kind="continual", seed=s, acc=0.4,
             rounds=(10 + s, 40, 90 - s), stream="online", bytes_per_round=0)
        _run(root / "dpcr" / f"seed-{s}", "dpcr", kind="continual", seed=s, acc=0.3, rounds=(1, 2),
             stream="class-incremental", tasks=2, matrix=MATRICES[s])
    return root


class Captured(dict):
    """name -> the matplotlib figure as drawn; files are written only with ``write = True`` (they cost time)."""

    write = False


@pytest.fixture
def captured(monkeypatch):
    figs = Captured()
    real = figures.save

    def keep(fig, out_dir, name):
        fig.canvas.draw()  # tick labels are final only once drawn
        figs[name] = fig
        if figs.write:
            return real(fig, out_dir, name)
        paths = [out_dir / f"{name}.{ext}" for ext in figures.FORMATS]
        for path in paths:  # empty stand-ins: what the report records and replaces
            path.write_bytes(b"")
        return paths

    monkeypatch.setattr(figures, "save", keep)
    yield figs
    import matplotlib.pyplot as plt

    for fig in figs.values():
        plt.close(fig)


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for lg in [ax.get_legend()] if lg for t in lg.get_texts()]


def test_style_map_gives_twelve_methods_distinct_colour_marker_and_line_style_and_keeps_order():
    runs = [{"group": f"m{i:02d}", "summary": {"label": f"m{i:02d}"}} for i in range(14)]
    styles = figures.style_map(runs, order=["m13", "m05"])
    assert list(styles)[:2] == ["m13", "m05"]  # the plan's order first, then sorted
    first = list(styles.values())[:12]
    for attr in ("color", "marker", "linestyle"):
        assert len({repr(getattr(s, attr)) for s in first}) == 12, attr
    assert len({(s.color, s.marker, repr(s.linestyle)) for s in styles.values()}) == 14
    assert figures.style_map(list(reversed(runs)), order=["m13", "m05"]) == styles  # input order does not matter


def test_short_labels_keep_only_the_swept_values_that_differ():
    groups = {g: figures.split_group(g) for g in (
        "afl/partition.alpha=0.1,strategy.gamma=0.1", "afl/partition.alpha=0.5,strategy.gamma=0.1",
        "fedavg/partition.alpha=0.1", "centralized")}
    assert figures.short_labels(groups) == {
        "afl/partition.alpha=0.1,strategy.gamma=0.1": "afl (alpha=0.1)",
        "afl/partition.alpha=0.5,strategy.gamma=0.1": "afl (alpha=0.5)",
        "fedavg/partition.alpha=0.1": "fedavg", "centralized": "centralized"}
    assert figures.split_group("partition.alpha=0.1", "fedavg") == ("fedavg", {"partition.alpha": "0.1"})


def test_byte_units():
    assert figures.human_bytes(2_008_165) == "2.0 MB" and figures.human_bytes(999) == "999 B"
    assert figures.human_bytes(1.5e9) == "1.5 GB" and figures.human_bytes(20_500) == "20.5 kB"
    assert figures._bytes_tick(1e6) == "1 MB" and figures._bytes_tick(5e5) == "500 kB"


def test_one_figure_per_kind_with_its_own_axis_and_the_same_style_everywhere(tree, tmp_path, captured):
    out = tmp_path / "rep"
    captured.write = True
    report([tree], out_dir=out, show=False)
    names = {"accuracy_vs_round", "accuracy_vs_bytes", "accuracy_vs_step", "accuracy_per_task", "task_accuracy"}
    assert set(captured) == names  # no sweep here
    for name in names:
        for ext in figures.FORMATS:
            assert (out / f"{name}.{ext}").stat().st_size > 0
        dpi = Image.open(out / f"{name}.png").info["dpi"]
        assert min(dpi) >= 199.5
    band = "shaded: mean $\\pm$ 1 std over 3 seeds"
    assert _legend(captured["accuracy_vs_round"]) == ["fedavg", "fedprox", band]
    assert _legend(captured["accuracy_vs_bytes"]) == ["fedavg", "fedprox", band]  # federated runs only
    assert _legend(captured["accuracy_vs_step"]) == ["aef-ocl", band]
    assert _legend(captured["accuracy_per_task"]) == ["dpcr", band]
    ax = captured["accuracy_vs_round"].axes[0]
    assert ax.get_xlabel() == "round"
    ticks = [x for x in ax.get_xticks() if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]]
    assert ticks and all(float(x).is_integer() for x in ticks)
    assert captured["accuracy_vs_step"].axes[0].get_xlabel() == "stream step (mini-batches of 10)"
    assert captured["accuracy_per_task"].axes[0].get_xlabel() == "tasks learned"
    labels = [t.get_text() for t in captured["accuracy_vs_bytes"].axes[0].get_xticklabels() if t.get_text()]
    assert "1 MB" in labels and all(lbl.endswith(("kB", "MB", "GB")) for lbl in labels)
    # one style per method in every figure; fedavg and fedprox differ in colour, marker and line style
    seen: dict[str, tuple] = {}
    for name in ("accuracy_vs_round", "accuracy_vs_bytes", "accuracy_vs_step", "accuracy_per_task"):
        for line in captured[name].axes[0].get_lines():
            if not line.get_label().startswith("_"):
                style = (line.get_color(), line.get_marker(), line.get_linestyle())
                assert seen.setdefault(line.get_label(), style) == style
    assert all(a != b for a, b in zip(seen["fedavg"], seen["fedprox"]))


def test_band_is_the_std_or_the_95_interval_over_seeds(tree, tmp_path, captured):
    report([tree], out_dir=tmp_path / "a", show=False)
    ax = captured["accuracy_vs_round"].axes[0]
    fedavg = [ln for ln in ax.get_lines() if ln.get_label() == "fedavg"][0]
    finals = [0.5, 0.6, 0.7]
    assert fedavg.get_ydata()[-1] == pytest.approx(np.mean(finals))
    top = ax.collections[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(np.mean(finals) + np.std(finals, ddof=1))
    captured.clear()
    report([tree], out_dir=tmp_path / "b", show=False, band="ci95")
    ax = captured["accuracy_vs_round"].axes[0]
    top = ax.collections[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(np.mean(finals) + t.ppf(0.975, 2) * np.std(finals, ddof=1) / math.sqrt(3))
    assert _legend(captured["accuracy_vs_round"])[-1] == "shaded: 95% CI of the mean over 3 seeds"


def test_runs_evaluated_at_different_steps_are_averaged_on_common_steps(tree):
    runs = [r for r in load_grouped([tree], warn=False) if r["group"] == "aef-ocl"]
    curve = figures.curves(runs)["aef-ocl"]
    assert list(curve["round"]) == [12, 40, 88]  # inside the range every seed covers
    assert set(curve["n"]) == {3}


def test_task_heat_map_holds_the_mean_accuracy_matrix(tree, tmp_path, captured):
    report([tree], out_dir=tmp_path / "rep", show=False)
    image = captured["task_accuracy"].axes[0].images[0].get_array()
    expected = 100 * np.stack(MATRICES).mean(axis=0)
    assert np.ma.getmaskarray(image)[0, 1]  # unseen: blank
    assert image[0, 0] == pytest.approx(80.0) and image[1, 0] == pytest.approx(30.0)
    assert np.allclose(image.filled(np.nan)[[0, 1, 1], [0, 0, 1]], expected[[0, 1, 1], [0, 0, 1]])
    assert captured["task_accuracy"].axes[0].get_title() == "dpcr (mean of 3)"


def test_sweep_plot_final_accuracy_against_the_swept_value_with_95_intervals(tmp_path, captured):
    root = tmp_path / "sweep"
    finals = {"0.1": [0.5, 0.6, 0.7], "1.0": [0.8, 0.8, 0.8]}
    for alpha, accs in finals.items():
        for s, acc in enumerate(accs):
            for label in ("fedavg", "fedprox"):
                _run(root / label / f"partition.alpha={alpha}" / f"seed-{s}", label, seed=s, acc=acc)
    report([root], out_dir=tmp_path / "rep", show=False)
    ax = captured["sweep"].axes[0]
    assert ax.get_xlabel() == "partition.alpha" and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "1.0"]
    bars = ax.containers[0]
    assert list(bars.lines[0].get_ydata()) == pytest.approx([0.6, 0.8])
    segments = bars.lines[2][0].get_segments()
    half = t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert segments[0][1][1] - segments[0][0][1] == pytest.approx(2 * half)
    assert segments[1][1][1] - segments[1][0][1] == pytest.approx(0.0)  # equal seeds: no spread
    assert [lbl for lbl in _legend(captured["sweep"])] == ["fedavg", "fedprox"]
    assert _legend(captured["accuracy_vs_round"])[:2] == ["fedavg (alpha=0.1)", "fedavg (alpha=1.0)"]


def test_a_figure_the_runs_no_longer_call_for_is_removed(tree, tmp_path, captured):
    out = tmp_path / "rep"
    report([tree], out_dir=out, show=False)
    assert (out / "accuracy_vs_step.svg").exists()
    (out / "notes.txt").write_text("mine")
    report([tree / "fedavg"], out_dir=out, show=False)
    assert not (out / "accuracy_vs_step.svg").exists() and not (out / "task_accuracy.png").exists()
    assert (out / "accuracy_vs_round.pdf").exists() and (out / "notes.txt").read_text() == "mine"


def test_runs_on_the_simulated_clock_get_accuracy_against_simulated_time(tmp_path, captured):
    """Only runs with a [system] section (a filled sim_seconds column) are drawn, at the seeds' mean time."""
    root = tmp_path / "runs"
    for s in range(2):
        _run(root / "fedbuff" / f"seed-{s}", "fedbuff", seed=s, acc=0.6)
        metrics = pd.read_csv(root / "fedbuff" / f"seed-{s}" / "metrics.csv")
        metrics["sim_seconds"] = [0.0, 10.0 + s, 20.0 + 3 * s]
        metrics.to_csv(root / "fedbuff" / f"seed-{s}" / "metrics.csv", index=False)
    _run(root / "fedavg" / "seed-0", "fedavg", acc=0.5)  # no clock: not in the simulated-time figure
    report([root], out_dir=tmp_path / "rep", show=False)
    assert "accuracy_vs_sim_time" in captured
    ax = captured["accuracy_vs_sim_time"].axes[0]
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert [ln.get_label() for ln in lines] == ["fedbuff"]
    assert list(lines[0].get_xdata()) == [0.0, 10.5, 21.5]
    assert ax.get_xlabel().startswith("simulated time (s")
