"""``fedsim report``: compare run directories in one table and plot accuracy against rounds and bytes."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import pandas as pd

from fedsim.errors import FedsimError
from fedsim.results import UnreadableRun, load_run, record_written

TABLE_COLUMNS = [
    ("label", "run"), ("strategy", "strategy"), ("dataset", "dataset"), ("num_clients", "clients"),
    ("partition", "partition"), ("rounds", "rounds/steps"), ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"), ("worst_client_accuracy", "worst client"), ("mean_class_accuracy", "mean class acc"),
    ("average_incremental_accuracy", "avg inc acc"), ("forgetting", "forgetting"),
    ("bytes_up_per_client", "up/client"), ("bytes_up", "bytes up"), ("bytes_down", "bytes down"),
    ("wall_seconds", "wall s"), ("status", "status"),
]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path is a run dir or a folder holding run dirs (one level)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(d for d in p.iterdir() if (d / "summary.json").exists()))
        else:
            raise FileNotFoundError(f"{p}: not a run directory (no summary.json) and not a folder of runs")
    if not found:
        raise FileNotFoundError(f"no run directories (with summary.json) under {', '.join(map(str, paths))}")
    return found


def load_runs(dirs: list[Path], warn: bool = True) -> list[dict]:
    """``load_run`` of each directory; one that cannot be read (truncated summary.json, binary metrics.csv) is
    skipped with a warning naming the file, so one broken run does not hide the others."""
    runs = []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except UnreadableRun as exc:
            if warn:
                print(f"warning: skipped {d}: {exc}", file=sys.stderr)
    if not runs:
        raise UnreadableRun(f"report: none of the {len(dirs)} run directories could be read (see the warnings)")
    return runs


def default_report_dir(paths: list[str | Path]) -> Path:
    """Where ``report`` writes without ``out_dir``: into the one directory given (a run or a folder of runs),
    never beside it; for several, their common parent folder."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return paths[0]
    parents = {p.resolve().parent for p in paths}
    return parents.pop() if len(parents) == 1 else Path(".")


def comparison_table(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        s = run["summary"]
        rows.append({title: s.get(key) for key, title in TABLE_COLUMNS})
    table = pd.DataFrame(rows)
    return table.dropna(axis=1, how="all")


def _fmt(value) -> str:  # noqa: ANN001
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and value > 10_000:
        return _human_bytes(value)
    return str(value)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def print_table(table: pd.DataFrame) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(show_lines=False)
    for col in table.columns:
        out.add_column(col, justify="left" if col in ("run", "strategy", "dataset", "partition", "status") else "right")
    for _, row in table.iterrows():
        cells = []
        for col in table.columns:
            v = row[col]
            if col in ("up/client", "bytes up", "bytes down") and v is not None and v == v:
                cells.append(_human_bytes(float(v)))
            else:
                cells.append(_fmt(v.item() if hasattr(v, "item") else v))
        out.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=220)
    console.print(out)


def plot_runs(runs: list[dict], out_dir: Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_bytes.png (cumulative bytes uploaded, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for x_key, x_label, name, log in (("round", "round / step", "accuracy_vs_round.png", False),
                                      ("bytes_up", "bytes uploaded (all clients, cumulative)",
                                       "accuracy_vs_bytes.png", True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plotted = 0
        for run in runs:
            m = run["metrics"]
            if m.empty or x_key not in m or "accuracy" not in m:
                continue
            m = m.dropna(subset=["accuracy"])
            if log:
                m = m[m[x_key] > 0]
            if m.empty:
                continue
            label = run["summary"].get("label") or run["dir"].name
            style = "o-" if len(m) < 30 else "-"
            ax.plot(m[x_key], m["accuracy"], style, label=label, markersize=4)
            plotted += 1
        if log and plotted:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_tasks(runs: list[dict], out_dir: Path) -> list[Path]:
    """accuracy_per_task.png for class-incremental runs (summary has ``num_tasks``; metrics row ``round`` = task + 1):
    accuracy on all classes seen so far after each task. Nothing is written when no run is class-incremental."""
    tasked = [r for r in runs if r["summary"].get("num_tasks") and not r["metrics"].empty
              and "accuracy" in r["metrics"]]
    if not tasked:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in tasked:
        m = run["metrics"].dropna(subset=["accuracy"])
        ax.plot(m["round"], m["accuracy"], "o-", markersize=4, label=run["summary"].get("label") or run["dir"].name)
    ax.set_xlabel("after task")
    ax.set_ylabel("test accuracy on all classes seen")
    ax.set_xticks(sorted({int(x) for r in tasked for x in r["metrics"]["round"]}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "accuracy_per_task.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def report(paths: list[str | Path], out_dir: str | Path | None = None, show: bool = True) -> pd.DataFrame:
    """Print the comparison table of the runs under ``paths``; write report.csv and the plots into ``out_dir``
    (default: ``default_report_dir``)."""
    runs = load_runs(find_runs(paths), warn=True)
    table = comparison_table(runs)
    target = Path(out_dir) if out_dir else default_report_dir(paths)
    if show:
        print_table(table)
    try:
        target.mkdir(parents=True, exist_ok=True)
        plots = plot_runs(runs, target) + plot_tasks(runs, target)
        table.to_csv(target / "report.csv", index=False)
    except OSError as exc:
        raise FedsimError(f"report: cannot write into {target}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):
        record_written(target, [p.name for p in plots] + ["report.csv"])
    if show:
        print(f"plots: {', '.join(str(p) for p in plots)}; table: {target / 'report.csv'}")
    return table
