"""fedsim report's tables for a paper (issue #24): --latex and --markdown (mean +- std over seeds, best per column
in bold: highest accuracy, lowest forgetting / bytes / seconds), and the terminal table at 100 columns (no number
cut: two-line cells, then columns left out with a note)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.results.report import latex_table, load_grouped, markdown_table, statistics_table


def _run(d, label, kind, seed, acc, **extra):
    d.mkdir(parents=True)
    summary = {"label": label, "kind": kind, "seed": seed, "status": "completed", "final_accuracy": acc,
               "best_accuracy": acc, "bytes_up": 2_000_000 * (1 + (label == "fed_prox")), "bytes_down": 10,
               "wall_seconds": 2.0 + seed, **extra}
    (d / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame({"round": [0, 1], "accuracy": [0.1, acc]}).to_csv(d / "metrics.csv", index=False)


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """These tests read tables; the figures (tests/test_figures.py) would only cost time here."""
    from fedsim.results import figures

    monkeypatch.setattr(figures, "plot_report", lambda *a, **k: [])


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "runs"
    for s, (a, b) in enumerate([(0.5, 0.7), (0.6, 0.7), (0.7, 0.7)]):
        _run(root / "fed_avg" / f"seed-{s}", "fed_avg", "federated", s, a)
        _run(root / "fed_prox" / f"seed-{s}", "fed_prox", "federated", s, b)
        _run(root / "dpcr" / f"seed-{s}", "dpcr", "continual", s, 0.4, forgetting=0.2,
             average_incremental_accuracy=0.6, num_tasks=2)
        _run(root / "finetune" / f"seed-{s}", "finetune", "continual", s, 0.2, forgetting=0.8,
             average_incremental_accuracy=0.4, num_tasks=2)
    return root


def test_latex_mean_std_best_in_bold_and_escaped(tree):
    text = latex_table(statistics_table(load_grouped([tree], warn=False)))
    assert text.startswith("% fedsim report --latex: needs \\usepackage{booktabs}")
    assert text.count("\\begin{table}") == 2 and "\\toprule" in text and "\\bottomrule" in text
    lines = {ln.split("&")[0].strip(): ln for ln in text.splitlines() if "&" in ln}
    fed_avg, fed_prox = lines["fed\\_avg"], lines["fed\\_prox"]  # labels escaped
    # final acc (%): fed_prox's 70.00 +- 0.00 beats fed_avg's 60.00 +- 10.00; bytes up: fed_avg's 2 MB is lower
    assert "60.00 $\\pm$ 10.00" in fed_avg and "\\textbf{60.00 $\\pm$ 10.00}" not in fed_avg
    assert "\\textbf{70.00 $\\pm$ 0.00}" in fed_prox
    assert "\\textbf{2.00 $\\pm$ 0.00 MB}" in fed_avg and "4.00 $\\pm$ 0.00 MB" in fed_prox
    assert "\\textbf{4.00" not in fed_prox
    assert "\\textbf{10 $\\pm$ 0 B}" in fed_avg and "\\textbf{10 $\\pm$ 0 B}" in fed_prox  # a tie: both
    header = [ln for ln in text.splitlines() if ln.startswith(" & n &") or ln.startswith("method") or "final acc" in ln]
    assert any("final acc (\\%)" in ln and "bytes up" in ln for ln in header)
    # continual: forgetting is better lower, average incremental accuracy higher; no duplicated "last acc" column
    assert "\\textbf{20.00 $\\pm$ 0.00}" in lines["dpcr"] and "\\textbf{60.00 $\\pm$ 0.00}" in lines["dpcr"]
    assert "last acc" not in text
    assert "federated runs: mean $\\pm$ std over 3 seeds; best per column in bold" in text


def test_markdown_table(tree):
    text = markdown_table(statistics_table(load_grouped([tree], warn=False)))
    assert "**federated runs: mean ± std over 3 seeds; best per column in bold**" in text
    rows = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert rows["method"].startswith("| method | n | final acc (%) |")
    assert "| fed_prox | 3 | **70.00 ± 0.00** |" in rows["fed_prox"]
    assert "| fed_avg | 3 | 60.00 ± 10.00 |" in rows["fed_avg"]
    assert "**80.00 ± 0.00**" not in rows["finetune"] and "80.00 ± 0.00" in rows["finetune"]  # its forgetting


def test_cli_latex_alone_on_stdout_and_markdown_into_a_file(tree, tmp_path, capsys):
    assert main(["report", str(tree), "--latex", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("% fedsim report --latex") and "┃" not in out and "figures" not in out
    md = tmp_path / "t.md"
    assert main(["report", str(tree), "--markdown", str(md), "--out", str(tmp_path / "rep")]) == 0
    assert md.read_text().startswith("**federated runs") and "--markdown: " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", str(tree), "--band", "iqr"])


def test_terminal_table_at_100_columns_cuts_no_number(tree, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["report", str(tree), "--out", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and max(len(ln) for ln in out.splitlines() if "│" in ln or "┃" in ln) <= 100
    # every statistic shown is whole: 0.6000 +- 0.1000 and its 95% half-width 0.2484 (t(0.975, 2) * 0.1 / sqrt 3)
    assert "0.6000 +- 0.1000" in out and "(0.2484)" in out
    assert "note: at 100 columns the table leaves out" in out


def test_per_run_table_fits_100_columns(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    for label in ("a-rather-long-variant-label-for-the-table", "b"):
        _run(root / label, label, "federated", 0, 0.123456789, worst_client_accuracy=0.05, strategy="fedavg",
             dataset="fashion-mnist", num_clients=100, partition="dirichlet", rounds=50, bytes_up_per_client=12345.0)
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "0.1235" in out
    assert max(len(ln) for ln in out.splitlines() if "│" in ln or "┃" in ln) <= 100
