"""``fedsim report``: compare run directories in one table and plot accuracy against rounds and bytes."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from pathlib import Path

import pandas as pd

from fedsim.errors import FedsimError
from fedsim.results import figures
from fedsim.results.figures import human_bytes, mean_std_ci
from fedsim.results.rundir import UnreadableRun, load_run, record_written, written_files

__all__ = ["report", "statistics_table", "comparison_table", "load_grouped", "mean_std_ci", "latex_table",
           "markdown_table", "human_bytes"]

TABLE_COLUMNS = [
    ("label", "run"), ("strategy", "strategy"), ("dataset", "dataset"), ("num_clients", "clients"),
    ("partition", "partition"), ("rounds", "rounds/steps"), ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"), ("worst_client_accuracy", "worst client"), ("local_accuracy", "local acc"),
    ("worst_local_accuracy", "worst local"), ("mean_class_accuracy", "mean class acc"),
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
STAT_METRICS = ("final_accuracy", "best_accuracy", "worst_client_accuracy", "local_accuracy", "worst_local_accuracy",
                "bytes_up", "bytes_down",
                "wall_seconds", "last_accuracy", "average_incremental_accuracy", "forgetting")
STAT_TITLES = {"final_accuracy": "final acc", "best_accuracy": "best acc", "worst_client_accuracy": "worst client",
               "local_accuracy": "local acc", "worst_local_accuracy": "worst local",
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


def _console():  # noqa: ANN202
    """Rich's console; piped or captured output gets 220 columns (not 80) unless COLUMNS says otherwise."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(width=220)
    return console


LABEL_MIN_WIDTH = 16  # the run column folds onto several lines down to this width; numbers never fold


def _needed_width(headers: list[str], rows: list[list[str]], cols: list[int]) -> int:
    """Columns rich needs for ``cols`` of the table (no number cut): each column's widest line, 3 characters of
    padding and rule per column and one for the last rule; the first (run) column may fold."""
    total = 1
    for c in cols:
        widest = max([len(headers[c])] + [len(line) for r in rows for line in str(r[c]).split("\n")])
        total += (min(widest, max(LABEL_MIN_WIDTH, len(headers[c]))) if c == 0 else widest) + 3
    return total


def print_fitted(title: str | None, headers: list[str], variants: list[list[list[str]]], drop_order: list[str],
                 left: tuple[str, ...] = ("run",), console=None) -> list[str]:  # noqa: ANN001
    """Print a rich table that fits the console without cutting a number: the first of ``variants`` (rows) that
    fits (e.g. one-line, then two-line cells), else the last one with columns left out in ``drop_order`` (and
    then from the right; the first two stay) until it fits, with a note naming them. Returns the left-out
    headers."""
    from rich.table import Table

    console = console or _console()
    width = console.width
    cols = list(range(len(headers)))
    rows = variants[-1]
    for candidate in variants:
        if _needed_width(headers, candidate, cols) <= width:
            rows = candidate
            break
    order = [headers.index(h) for h in drop_order if h in headers] + cols[::-1]
    dropped: list[int] = []
    for c in order:
        if _needed_width(headers, rows, cols) <= width or len(cols) <= 2:
            break
        if c in cols and c > 1:
            cols.remove(c)
            dropped.append(c)
    out = Table(title=title)
    for c in cols:
        widest = max([len(headers[c])] + [len(line) for r in rows for line in str(r[c]).split("\n")])
        if c == 0:
            out.add_column(headers[c], overflow="fold", min_width=min(widest, LABEL_MIN_WIDTH))
        else:
            out.add_column(headers[c], justify="left" if headers[c] in left else "right", no_wrap=True,
                           min_width=widest)
    for r in rows:
        out.add_row(*[str(r[c]) for c in cols])
    console.print(out)
    names = [headers[c] for c in dropped]
    if names:
        console.print(f"note: at {width} columns the table leaves out {', '.join(names)}; they are in "
                      "report.csv / statistics.csv (or widen the terminal: COLUMNS=200)", highlight=False)
    return names


def _by_kind(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The statistics table's parts per kind, federated first (as the per-run table orders them)."""
    parts = list(table.groupby("kind", sort=False, dropna=False))
    return sorted(parts, key=lambda kv: kv[0] != "federated")


def _number(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"


STATS_DROP_ORDER = ["bytes down", "wall s", "best acc", "bytes up", "worst client", "forgetting"]


def print_statistics(table: pd.DataFrame, console=None) -> None:  # noqa: ANN001
    """One table per kind (federated, continual, ...): mean +- std (95% CI half-width) of each metric; cells go
    onto two lines, then columns are left out (with a note), where the console is too narrow."""
    for kind, part in _by_kind(table):
        keys = [k for k in STAT_METRICS if f"{k}_mean" in part and part[f"{k}_mean"].notna().any()]
        headers = ["run", "n", *[STAT_TITLES.get(k, k) for k in keys]]
        one, two = [], []
        for _, row in part.iterrows():
            a, b = [str(row["label"]), str(row["n"])], [str(row["label"]), str(row["n"])]
            for key in keys:
                mean, std, ci = row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_ci95"]
                fmt = human_bytes if key.startswith("bytes") else _number
                if mean != mean:
                    a.append("-"), b.append("-")
                elif std != std:
                    a.append(fmt(mean)), b.append(fmt(mean))
                else:
                    a.append(f"{fmt(mean)} +- {fmt(std)} ({fmt(ci)})")
                    b.append(f"{fmt(mean)} +- {fmt(std)}\n({fmt(ci)})")
            one.append(a)
            two.append(b)
        print_fitted(f"{kind} runs: mean +- std (95% CI half-width, Student t) over n seeds", headers, [one, two],
                     STATS_DROP_ORDER, console=console)
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
        return _number(value)
    if isinstance(value, int) and value > 10_000:
        return human_bytes(value)
    return str(value)


TABLE_DROP_ORDER = ["bytes down", "wall s", "dataset", "partition", "mean class acc", "up/client", "clients",
                    "strategy", "bytes up", "best acc", "rounds/steps"]


def print_table(table: pd.DataFrame, title: str | None = None, console=None) -> None:  # noqa: ANN001
    """The per-run table, one per kind; fitted to the console like ``print_fitted``."""
    if "kind" in table.columns and table["kind"].nunique() > 1:  # one table per part (federated, continual)
        for kind in sorted(table["kind"].dropna().unique(), key=lambda k: (k != "federated", str(k))):
            part = table[table["kind"] == kind]
            print_table(part.drop(columns="kind").dropna(axis=1, how="all"), title=f"{kind} runs", console=console)
        return
    table = table.drop(columns="kind", errors="ignore")
    rows = []
    for _, row in table.iterrows():
        cells = []
        for col in table.columns:
            v = row[col]
            if col in ("up/client", "bytes up", "bytes down") and v is not None and v == v:
                cells.append(human_bytes(float(v)))
            else:
                cells.append(_fmt(v.item() if hasattr(v, "item") else v))
        rows.append(cells)
    print_fitted(title, list(table.columns), [rows], TABLE_DROP_ORDER,
                 left=("run", "strategy", "dataset", "partition", "status"), console=console)


# -- tables for a paper: LaTeX (booktabs) and Markdown ---------------------------------------------------------
LOWER_IS_BETTER = {"forgetting", "bytes_up", "bytes_down", "wall_seconds"}


def _is_accuracy(key: str) -> bool:
    return "accuracy" in key or key == "forgetting"


def paper_tables(stats: pd.DataFrame, labels: dict[str, str] | None = None) -> list[tuple[str, pd.DataFrame,
                                                                                        pd.DataFrame]]:
    """Per kind: (kind, cells, best) for a paper: rows = groups (their short legend label), columns = ``n`` and
    each metric that has values (accuracies in %, bytes in an SI unit per cell, seconds), cells "mean +- std"
    (the mean alone for one run; ``{pm}`` stands for the plus-minus sign), ``best`` marks the best mean of each
    column (highest, or lowest for forgetting, bytes and seconds; ties all marked)."""
    labels = labels or {}
    out = []
    for kind, part in _by_kind(stats):
        keys = [k for k in STAT_METRICS if f"{k}_mean" in part and part[f"{k}_mean"].notna().any()
                and k != "last_accuracy"  # a continual run's final accuracy, already in its own column
                and not (k.startswith("bytes") and not part[f"{k}_mean"].fillna(0).any())
                and not (kind != "federated" and k == "best_accuracy")]
        index = [labels.get(g, g) for g in part["label"]]
        cells = pd.DataFrame({"n": [str(int(n)) for n in part["n"]]}, index=index)
        best = pd.DataFrame({"n": [False] * len(part)}, index=index)
        for key in keys:
            means, stds = part[f"{key}_mean"].to_numpy(float), part[f"{key}_std"].to_numpy(float)
            if key.startswith("bytes"):  # each cell in its own SI unit: a column may span 490 B to 34 MB
                cells[STAT_TITLES.get(key, key)] = [_bytes_cell(m, sd) for m, sd in zip(means, stds)]
                sent = [m for m in means if m == m and m > 0]  # a run that sends nothing is not the best here
                best[STAT_TITLES.get(key, key)] = [len(sent) > 1 and m == min(sent) for m in means]
                continue
            if _is_accuracy(key):
                scale, title, digits = 0.01, f"{STAT_TITLES.get(key, key)} (%)", 2
            else:
                scale, title, digits = 1.0, STAT_TITLES.get(key, key), 1
            shown = [None if m != m else f"{m / scale:.{digits}f}" for m in means]
            cells[title] = [("-" if v is None else v if s != s else f"{v} {{pm}} {s / scale:.{digits}f}")
                            for v, s in zip(shown, stds)]
            values = [float(v) for v in shown if v is not None]
            if len(values) > 1:
                target = min(values) if key in LOWER_IS_BETTER else max(values)
                best[title] = [v is not None and float(v) == target for v in shown]
            else:
                best[title] = [False] * len(shown)
        out.append((str(kind), cells, best))
    return out


def _bytes_cell(mean: float, std: float) -> str:
    if mean != mean:
        return "-"
    unit = 0 if mean < 1000 else min(int(math.log10(mean) // 3), len(figures.SI_UNITS) - 1)
    scale, name = 1000.0 ** unit, figures.SI_UNITS[unit]
    digits = 0 if unit == 0 else 2
    return (f"{mean / scale:.{digits}f} {name}" if std != std
            else f"{mean / scale:.{digits}f} {{pm}} {std / scale:.{digits}f} {name}")


def _caption(kind: str, stats: pd.DataFrame, pm: str) -> str:
    ns = sorted({int(n) for n in stats.loc[stats["kind"] == kind, "n"]} if kind in set(stats["kind"]) else set())
    over = "" if ns == [1] else f" over {ns[0]} seeds" if len(ns) == 1 else f" over {ns[0]}-{ns[-1]} seeds"
    return f"{kind} runs: mean {pm} std{over}; best per column in bold"


def latex_table(stats: pd.DataFrame, labels: dict[str, str] | None = None) -> str:
    """``paper_tables`` as LaTeX (one booktabs ``table`` per kind, pandas' Styler; labels and headers
    escaped)."""
    parts = ["% fedsim report --latex: needs \\usepackage{booktabs}"]
    for kind, cells, best in paper_tables(stats, labels):
        cells = cells.map(lambda c: c.replace("{pm}", "$\\pm$"))
        styler = cells.style.apply(lambda _: best.replace({True: "textbf:--rwrap;", False: ""}), axis=None)
        styler = styler.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
        parts.append(styler.to_latex(hrules=True, position_float="centering",
                                     caption=_caption(kind, stats, "$\\pm$"),
                                     label=f"tab:{re.sub('[^A-Za-z0-9]+', '-', kind)}", column_format="l" +
                                     "r" * cells.shape[1]))
    return "\n".join(parts)


def markdown_table(stats: pd.DataFrame, labels: dict[str, str] | None = None) -> str:
    """``paper_tables`` as GitHub-flavoured Markdown (one table per kind, best cells in bold)."""
    parts = []
    for kind, cells, best in paper_tables(stats, labels):
        head = ["method", *cells.columns]
        lines = [f"**{_caption(kind, stats, '±')}**", "", "| " + " | ".join(head) + " |",
                 "|:--|" + "--:|" * cells.shape[1]]
        for label, row in cells.iterrows():
            shown = [f"**{v.replace('{pm}', '±')}**" if best.loc[label, col] else v.replace("{pm}", "±")
                     for col, v in row.items()]
            lines.append("| " + " | ".join([str(label).replace("|", "\\|"), *shown]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _plan_order(runs: list[dict]) -> list[str]:
    """The groups in the order their seeds/sweep plan lists them (the scenario's variant order), where one is."""
    order: list[str] = []
    for root in dict.fromkeys(r["root"] for r in runs):
        order += [item["group"] for item in read_plan(root) or []]
    return list(dict.fromkeys(order))


def _write_text(path: str | Path, text: str, flag: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise FedsimError(f"report {flag}: cannot write {path}: {exc.strerror or exc}") from None


def report(paths: list[str | Path], out_dir: str | Path | None = None, show: bool = True,
           csv: str | Path | None = None, latex: str | Path | None = None, markdown: str | Path | None = None,
           band: str = "std") -> pd.DataFrame:
    """Print the comparison of the runs under ``paths`` (one table per kind; over seeds, the statistics of each
    label and sweep point); write report.csv (one row per run), statistics.csv (seeded runs) and the figures
    (``fedsim.results.figures``; ``band``: "std" or "ci95") into ``out_dir`` (default: ``default_report_dir``),
    the statistics table to ``csv``, the paper tables to ``latex`` / ``markdown`` when given ("-": printed
    instead of the terminal table). Returns the per-run table."""
    if band not in ("std", "ci95"):
        raise FedsimError(f"report --band: {band!r}; it must be one of 'std', 'ci95'")
    runs = load_grouped(paths, warn=True)
    table = comparison_table(runs)
    seeded = any(r.get("seed_dir") is not None for r in runs)
    stats = statistics_table(runs) if (seeded or csv or latex or markdown) else None
    styles = figures.style_map(runs, _plan_order(runs))
    labels = {g: s.label for g, s in styles.items()}
    to_stdout = "-" in (str(latex), str(markdown))
    target = Path(out_dir) if out_dir else default_report_dir(paths)
    if show and not to_stdout:
        if seeded:
            print_statistics(stats)
        else:
            print_table(comparison_table(runs, kind=True))
    if latex == "-":
        print(latex_table(stats, labels))
    if markdown == "-":
        print(markdown_table(stats, labels))
    try:
        target.mkdir(parents=True, exist_ok=True)
        plots = figures.plot_report(runs, target, styles, band=band)
        table.to_csv(target / "report.csv", index=False)
        written = [p.name for p in plots] + ["report.csv"]
        if seeded:
            stats.to_csv(target / "statistics.csv", index=False)
            written.append("statistics.csv")
        ours = written_files(target)  # figures an earlier report wrote here that this one does not: stale
        for name in sorted(set(figures.FIGURE_FILES) & ours - set(written)):
            with contextlib.suppress(FileNotFoundError):
                (target / name).unlink()
    except OSError as exc:
        raise FedsimError(f"report: cannot write into {target}: {exc.strerror or exc}") from None
    if csv is not None:
        try:
            stats.to_csv(csv, index=False)
        except OSError as exc:
            raise FedsimError(f"report --csv: cannot write {csv}: {exc.strerror or exc}") from None
    if latex not in (None, "-"):
        _write_text(latex, latex_table(stats, labels), "--latex")
    if markdown not in (None, "-"):
        _write_text(markdown, markdown_table(stats, labels), "--markdown")
    with contextlib.suppress(OSError):
        record_written(target, written)
    if show and not to_stdout:
        names = ", ".join(dict.fromkeys(p.stem for p in plots))
        print(f"figures ({'/'.join(figures.FORMATS)}) in {target}: {names or 'none'}; table: {target / 'report.csv'}"
              + (f"; statistics: {target / 'statistics.csv'}" if seeded else "")
              + (f"; --csv: {csv}" if csv is not None else "")
              + (f"; --latex: {latex}" if latex not in (None, "-") else "")
              + (f"; --markdown: {markdown}" if markdown not in (None, "-") else ""))
    return table
