"""``fedsim report``: compare run directories in one table and plot accuracy against rounds and bytes."""

from __future__ import annotations

import contextlib
import math
import re
import statistics
import sys
from pathlib import Path

import pandas as pd

from fedsim.errors import FedsimError
from fedsim.results.rundir import UnreadableRun, load_run, record_written

TABLE_COLUMNS = [
    ("label", "run"), ("strategy", "strategy"), ("dataset", "dataset"), ("num_clients", "clients"),
    ("partition", "partition"), ("rounds", "rounds/steps"), ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"), ("worst_client_accuracy", "worst client"), ("mean_class_accuracy", "mean class acc"),
    ("average_incremental_accuracy", "avg inc acc"), ("forgetting", "forgetting"),
    ("bytes_up_per_client", "up/client"), ("bytes_up", "bytes up"), ("bytes_down", "bytes down"),
    ("wall_seconds", "wall s"), ("status", "status"),
]


SEED_DIR = re.compile(r"^seed-(\d+)$")
MAX_DEPTH = 4  # DIR/<label>/<sweep point>/seed-<s>: three levels below a folder given to report


def _walk_runs(folder: Path, depth: int) -> list[Path]:
    """Run directories under ``folder`` (sorted, depth-first); a run directory is not searched further."""
    found: list[Path] = []
    try:
        children = sorted(d for d in folder.iterdir() if d.is_dir())
    except OSError:
        return found
    for d in children:
        if (d / "summary.json").exists():
            found.append(d)
        elif depth > 1:
            found.extend(_walk_runs(d, depth - 1))
    return found


def find_runs_with_roots(paths: list[str | Path]) -> list[tuple[Path, Path]]:
    """(the path given, run directory) for each run directory among ``paths``: each path is a run dir or a
    folder holding run dirs (up to ``MAX_DEPTH`` levels: labels, sweep points, seeds)."""
    found: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            found.append((p, p))
        elif p.is_dir():
            found.extend((p, d) for d in _walk_runs(p, MAX_DEPTH))
        else:
            raise FileNotFoundError(f"{p}: not a run directory (no summary.json) and not a folder of runs")
    if not found:
        raise FileNotFoundError(f"no run directories (with summary.json) under {', '.join(map(str, paths))}")
    return found


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths`` (see ``find_runs_with_roots``)."""
    return [d for _, d in find_runs_with_roots(paths)]


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


def load_grouped(paths: list[str | Path], warn: bool = True) -> list[dict]:
    """``load_runs`` of every run under ``paths``, each with ``group`` (its label, and sweep point: the path below
    the folder given, without a trailing ``seed-<s>``; the summary's label for a run given directly) and
    ``seed_dir`` (the s of ``seed-<s>``, None outside a seeds run)."""
    runs = []
    pairs = find_runs_with_roots(paths)
    by_dir = {r["dir"]: r for r in load_runs([d for _, d in pairs], warn=warn)}
    for root, d in pairs:
        run = by_dir.get(d)
        if run is None:
            continue
        parts = d.relative_to(root).parts
        seed = None
        if parts and SEED_DIR.match(parts[-1]):
            seed = int(SEED_DIR.match(parts[-1]).group(1))
            parts = parts[:-1]
        run["group"] = "/".join(parts) or run["summary"].get("label") or d.name
        run["seed_dir"] = seed
        run["root"] = root
        runs.append(run)
    return runs


# metric -> how it is read from a summary; "last_accuracy" is a continual run's final accuracy (after the last task
# or at the stream's end)
STAT_METRICS = ("final_accuracy", "best_accuracy", "worst_client_accuracy", "bytes_up", "bytes_down",
                "wall_seconds", "last_accuracy", "average_incremental_accuracy", "forgetting")
STAT_TITLES = {"final_accuracy": "final acc", "best_accuracy": "best acc", "worst_client_accuracy": "worst client",
               "bytes_up": "bytes up", "bytes_down": "bytes down", "wall_seconds": "wall s",
               "last_accuracy": "last acc", "average_incremental_accuracy": "avg inc acc", "forgetting": "forgetting"}


def _metric(summary: dict, key: str) -> float | None:
    if key == "last_accuracy":
        return summary.get("final_accuracy") if summary.get("kind") == "continual" else None
    value = summary.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


PLAN_FILE = "plan.json"  # what `fedsim run --seeds/--sweep` meant to run: [{"group", "seed"}], for missing seeds


def write_plan(out: Path, items: list[dict]) -> None:
    """Record the runs of a seeds/sweep plan under ``out`` (the report names the seeds that never completed)."""
    from fedsim.results.rundir import write_json

    out.mkdir(parents=True, exist_ok=True)
    record_written(out, [PLAN_FILE])
    write_json(out / PLAN_FILE, {"runs": items})


def read_plan(root: Path) -> list[dict] | None:
    """The plan ``write_plan`` left in ``root``, None where there is none (or it is unreadable)."""
    import json

    try:
        runs = json.loads((Path(root) / PLAN_FILE).read_text(encoding="utf-8"))["runs"]
        return [{"group": str(r["group"]), "seed": int(r["seed"])} for r in runs if r.get("seed") is not None]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mean_std_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (n - 1) and the half-width of the 95% Student-t interval of the mean.

    ``statistics`` computes both exactly rounded, so n equal values give a std of exactly 0; std and interval
    are NaN for n = 1."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n == 1:
        return mean, math.nan, math.nan
    std = statistics.stdev(values)
    from scipy.stats import t

    return mean, std, float(t.ppf(0.975, n - 1) * std / math.sqrt(n))


def statistics_table(runs: list[dict]) -> pd.DataFrame:
    """One row per group (label and sweep point) of ``load_grouped`` runs: ``label, n, <metric>_mean, _std,
    _ci95`` over its completed runs, then ``kind``, ``seeds`` (those that completed) and ``missing_seeds`` (seeds
    that another group under the same folder completed or tried and this one did not complete)."""
    expected: dict[Path, set[int]] = {}
    planned: dict[tuple[Path, str], set[int]] = {}
    groups: dict[tuple[Path, str], list[dict]] = {}
    for run in runs:
        if run.get("seed_dir") is not None:
            expected.setdefault(run["root"], set()).add(run["seed_dir"])
        root = run["root"]
        if root not in {r for r, _ in planned} and (plan := read_plan(root)):
            for item in plan:
                planned.setdefault((root, item["group"]), set()).add(item["seed"])
                groups.setdefault((root, item["group"]), [])
        groups.setdefault((run["root"], run["group"]), []).append(run)
    rows = []
    for (root, label), members in groups.items():
        done = [r for r in members if r["summary"].get("status", "completed") == "completed"]
        row: dict = {"label": label, "n": len(done)}
        for key in STAT_METRICS:
            values = [v for r in done if (v := _metric(r["summary"], key)) is not None]
            if not values:
                continue
            mean, std, ci = mean_std_ci(values)
            row.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_ci95": ci})
        row["kind"] = members[0]["summary"].get("kind") if members else None
        seeds = sorted(r["seed_dir"] for r in done if r.get("seed_dir") is not None)
        row["seeds"] = " ".join(map(str, seeds))
        wanted = planned.get((root, label), expected.get(root, set()))
        row["missing_seeds"] = " ".join(map(str, sorted(wanted - set(seeds))))
        rows.append(row)
    table = pd.DataFrame(rows)
    metric_cols = [f"{k}_{s}" for k in STAT_METRICS for s in ("mean", "std", "ci95") if f"{k}_{s}" in table]
    return table[["label", "n", *metric_cols, "kind", "seeds", "missing_seeds"]]


def print_statistics(table: pd.DataFrame) -> None:
    """One table per kind (federated, continual, ...): mean +- std [95% CI half-width] of each metric."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    for kind, part in table.groupby("kind", sort=False, dropna=False):
        out = Table(title=f"{kind} runs: mean +- std (95% CI half-width, Student t) over n seeds")
        out.add_column("run")
        out.add_column("n", justify="right")
        keys = [k for k in STAT_METRICS if f"{k}_mean" in part and part[f"{k}_mean"].notna().any()]
        for key in keys:
            out.add_column(STAT_TITLES[key], justify="right")
        for _, row in part.iterrows():
            cells = [str(row["label"]), str(row["n"])]
            for key in keys:
                mean, std, ci = row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_ci95"]
                if mean != mean:
                    cells.append("-")
                    continue
                fmt = _human_bytes if key.startswith("bytes") else (lambda v: f"{v:.4f}" if abs(v) < 10
                                                                     else f"{v:,.1f}")
                cells.append(fmt(mean) if std != std else f"{fmt(mean)} +- {fmt(std)} ({fmt(ci)})")
            out.add_row(*cells)
        console.print(out)
    missing = table[table["missing_seeds"].astype(bool)]
    for _, row in missing.iterrows():
        print(f"missing seeds: {row['label']}: {row['missing_seeds']} (failed, interrupted or not run)")


def default_report_dir(paths: list[str | Path]) -> Path:
    """Where ``report`` writes without ``out_dir``: into the one directory given (a run or a folder of runs),
    never beside it; for several, their common parent folder."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return paths[0]
    parents = {p.resolve().parent for p in paths}
    return parents.pop() if len(parents) == 1 else Path(".")


def comparison_table(runs: list[dict], kind: bool = False) -> pd.DataFrame:
    """One row per run (the columns of ``TABLE_COLUMNS`` its summaries have); ``kind`` adds the strategy kind
    (what ``print_table`` splits the parts by)."""
    rows = []
    for run in runs:
        s = run["summary"]
        row = {title: s.get(key) for key, title in TABLE_COLUMNS}
        if run.get("seed_dir") is not None or (run.get("group") and run["group"] != s.get("label")):
            row["run"] = run["group"] + (f"/seed-{run['seed_dir']}" if run.get("seed_dir") is not None else "")
        if kind:
            row["kind"] = s.get("kind")
        rows.append(row)
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


def print_table(table: pd.DataFrame, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if "kind" in table.columns and table["kind"].nunique() > 1:  # one table per part (federated, continual)
        for kind in sorted(table["kind"].dropna().unique(), key=lambda k: (k != "federated", str(k))):
            part = table[table["kind"] == kind]
            print_table(part.drop(columns="kind").dropna(axis=1, how="all"), title=f"{kind} runs")
        return
    table = table.drop(columns="kind", errors="ignore")
    out = Table(show_lines=False, title=title)
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


def _group_curves(runs: list[dict], x_key: str) -> list[tuple[str, pd.DataFrame]]:
    """Per group of runs (label and sweep point), the accuracy curve over ``round``: columns x (mean of ``x_key``
    over the runs at that round), mean, std (NaN for one run) and n."""
    groups: dict[str, list[pd.DataFrame]] = {}
    for run in runs:
        m = run["metrics"]
        if m.empty or x_key not in m or "accuracy" not in m or "round" not in m:
            continue
        m = m.dropna(subset=["accuracy"])
        if m.empty:
            continue
        label = run.get("group") or run["summary"].get("label") or run["dir"].name
        m = m.assign(x=m[x_key])[["round", "x", "accuracy"]].drop_duplicates("round", keep="last")
        groups.setdefault(label, []).append(m)
    curves = []
    for label, frames in groups.items():
        both = pd.concat(frames)
        agg = both.groupby("round").agg(x=("x", "mean"), mean=("accuracy", "mean"), std=("accuracy", "std"),
                                        n=("accuracy", "size")).reset_index()
        curves.append((label, agg))
    return curves


def _plot_curve(ax, label: str, c: pd.DataFrame, style: str) -> None:  # noqa: ANN001
    n = int(c["n"].max())
    line, = ax.plot(c["x"], c["mean"], style, label=label if n == 1 else f"{label} (mean of {n})", markersize=4)
    if n > 1:  # band: mean +- one standard deviation over the runs
        ax.fill_between(c["x"], c["mean"] - c["std"].fillna(0), c["mean"] + c["std"].fillna(0),
                        color=line.get_color(), alpha=0.2, linewidth=0)


def plot_runs(runs: list[dict], out_dir: Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_bytes.png (cumulative bytes uploaded, log scale); runs of one label
    (seeds) are drawn as their mean with a +- std band."""
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
        for label, c in _group_curves(runs, x_key):
            if log:
                c = c[c["x"] > 0]
            if c.empty:
                continue
            _plot_curve(ax, label, c, "o-" if len(c) < 30 else "-")
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
    accuracy on all classes seen so far after each task (mean with a +- std band over seeds). Nothing is written
    when no run is class-incremental."""
    tasked = [r for r in runs if r["summary"].get("num_tasks") and not r["metrics"].empty
              and "accuracy" in r["metrics"]]
    if not tasked:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, c in _group_curves(tasked, "round"):
        _plot_curve(ax, label, c, "o-")
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


def report(paths: list[str | Path], out_dir: str | Path | None = None, show: bool = True,
           csv: str | Path | None = None) -> pd.DataFrame:
    """Print the comparison of the runs under ``paths`` (one table per kind; over seeds, the statistics of each
    label and sweep point); write report.csv (one row per run), statistics.csv (seeded runs) and the plots into
    ``out_dir`` (default: ``default_report_dir``), and the statistics table to ``csv`` when given. Returns the
    per-run table."""
    runs = load_grouped(paths, warn=True)
    table = comparison_table(runs)
    seeded = any(r.get("seed_dir") is not None for r in runs)
    stats = statistics_table(runs) if (seeded or csv) else None
    target = Path(out_dir) if out_dir else default_report_dir(paths)
    if show:
        if seeded:
            print_statistics(stats)
        else:
            print_table(comparison_table(runs, kind=True))
    try:
        target.mkdir(parents=True, exist_ok=True)
        plots = plot_runs(runs, target) + plot_tasks(runs, target)
        table.to_csv(target / "report.csv", index=False)
        written = [p.name for p in plots] + ["report.csv"]
        if seeded:
            stats.to_csv(target / "statistics.csv", index=False)
            written.append("statistics.csv")
    except OSError as exc:
        raise FedsimError(f"report: cannot write into {target}: {exc.strerror or exc}") from None
    if csv is not None:
        try:
            stats.to_csv(csv, index=False)
        except OSError as exc:
            raise FedsimError(f"report --csv: cannot write {csv}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):
        record_written(target, written)
    if show:
        print(f"plots: {', '.join(str(p) for p in plots)}; table: {target / 'report.csv'}"
              + (f"; statistics: {target / 'statistics.csv'}" if seeded else "")
              + (f"; --csv: {csv}" if csv is not None else ""))
    return table
