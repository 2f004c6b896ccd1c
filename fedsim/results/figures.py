"""Figures for a paper from run directories (``fedsim report``; docs/outputs.md).

One figure per kind of run, each on its own x-axis: federated runs against rounds (``accuracy_vs_round``) and
against the bytes the clients uploaded (``accuracy_vs_bytes``, federated runs only: a single learner's "upload"
means nothing) and, for runs with a ``[system]`` section, against simulated time (``accuracy_vs_sim_time``; the
x of a round is its mean ``sim_seconds`` over seeds), online-stream runs against stream steps (``accuracy_vs_step``), class-incremental runs against
tasks (``accuracy_per_task``) with their per-task accuracy matrices as heat maps (``task_accuracy``), and, for a
sweep, the final accuracy against each swept value with 95% intervals (``sweep``). Each is written as PNG
(``PNG_DPI``), PDF and SVG.

Every group of runs (a label and sweep point; its seeds are averaged) gets one ``Style`` (colour, marker, line
style) from ``style_map``, built once per report, so a method looks the same in every figure; the first
``len(COLORS)`` groups differ in all three. Legends are short: the label, plus the swept values that differ
between that label's groups.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FEDERATED, ONLINE, TASKS = "federated", "online", "class-incremental"
FORMATS = ("png", "pdf", "svg")
PNG_DPI = 200
FIGURES = ("accuracy_vs_round", "accuracy_vs_bytes", "accuracy_vs_sim_time", "accuracy_vs_step", "accuracy_per_task",
           "task_accuracy", "sweep")
FIGURE_FILES = tuple(f"{name}.{ext}" for name in FIGURES for ext in FORMATS)

# 12 colours that stay apart in print (Okabe-Ito's, which the common colour-vision deficiencies keep apart, less its
# pale yellow; then tab10's remaining hues and Tol's wine), 12 markers and 12 line styles: group i < 12 differs from every other group in
# all three; beyond, the (colour, marker, line style) triple still differs.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#8c564b",
          "#9467bd", "#7f7f7f", "#bcbd22", "#882255")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (5, 5)),
              (0, (3, 5, 1, 5)), (0, (8, 2, 2, 2)), (0, (5, 2, 1, 2, 1, 2)), (0, (2, 3)))
POINT = re.compile(r"^[A-Za-z0-9._+-]+=[^,=/]+(,[A-Za-z0-9._+-]+=[^,=/]+)*$")  # a sweep point's directory name


@dataclass(frozen=True)
class Style:
    """How one group of runs is drawn in every figure of a report."""

    color: str
    marker: str
    linestyle: str | tuple
    label: str  # the short legend entry

    def kwargs(self) -> dict:
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle, "label": self.label}


def split_group(group: str, fallback_label: str | None = None) -> tuple[str, dict[str, str]]:
    """``"afl/partition.alpha=0.1,strategy.gamma=1"`` -> ``("afl", {"partition.alpha": "0.1", ...})``: the label
    and the sweep point of a group name (``fallback_label``, the summary's, where the path holds no label)."""
    label_parts, point = [], {}
    for part in str(group).split("/"):
        if POINT.match(part):
            point.update(dict(item.split("=", 1) for item in part.split(",")))
        else:
            label_parts.append(part)
    return "/".join(label_parts) or fallback_label or str(group), point


def _short_key(key: str, keys: Iterable[str]) -> str:
    """``partition.alpha`` -> ``alpha`` unless another key ends the same way."""
    tail = key.rsplit(".", 1)[-1]
    return tail if sum(k.rsplit(".", 1)[-1] == tail for k in keys) == 1 else key


def short_labels(groups: dict[str, tuple[str, dict[str, str]]]) -> dict[str, str]:
    """Group name -> legend text: its label, plus the swept values that differ among the groups of that label."""
    by_label: dict[str, list[dict[str, str]]] = {}
    for label, point in groups.values():
        by_label.setdefault(label, []).append(point)
    out = {}
    for group, (label, point) in groups.items():
        points = by_label[label]
        keys = sorted({k for p in points for k in p})
        differ = [k for k in keys if len({p.get(k) for p in points}) > 1]
        shown = ", ".join(f"{_short_key(k, differ)}={point[k]}" for k in differ if k in point)
        out[group] = f"{label} ({shown})" if shown else label
    # two groups the rule would name alike (the same label given twice): fall back to the full group name
    seen: dict[str, int] = {}
    for text in out.values():
        seen[text] = seen.get(text, 0) + 1
    return {g: (t if seen[t] == 1 else g) for g, t in out.items()}


def style_map(runs: list[dict], order: Iterable[str] = ()) -> dict[str, Style]:
    """One ``Style`` per group of ``runs`` (``fedsim.results.report.load_grouped``), in ``order`` (e.g. the plan
    of a seeds/sweep run, the scenario's variant order) and then sorted: the same group gets the same style in
    every figure of a report, and the same scenario gets the same styles in every report."""
    groups = {}
    for run in runs:
        groups.setdefault(run["group"], split_group(run["group"], run["summary"].get("label")))
    ranked = [g for g in dict.fromkeys(order) if g in groups] + sorted(g for g in groups if g not in set(order))
    labels = short_labels(groups)
    n = len(COLORS)
    return {g: Style(COLORS[i % n], MARKERS[(i + i // n) % n], LINESTYLES[(i + 2 * (i // n)) % n], labels[g])
            for i, g in enumerate(ranked)}


def run_kind(run: dict) -> str:
    """``FEDERATED``, ``ONLINE`` (one pass over a stream) or ``TASKS`` (class-incremental), from the summary's
    kind and the saved scenario's ``stream.kind``."""
    stream = (((run.get("config") or {}).get("config") or {}).get("stream") or {}).get("kind")
    summary = run["summary"]
    if summary.get("num_tasks") or stream == "class-incremental":
        return TASKS
    if stream == "online" or summary.get("kind") == "continual":
        return ONLINE
    return FEDERATED


SI_UNITS = ("B", "kB", "MB", "GB", "TB")


def human_bytes(n: float, digits: int = 1) -> str:
    """``2008165`` -> ``"2.0 MB"``: SI units (1 MB = 10^6 bytes), as on the figures' byte axes, in every table."""
    n = float(n)
    for unit in SI_UNITS:
        if abs(n) < 1000 or unit == SI_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _bytes_tick(value: float, _pos: int = 0) -> str:
    if value <= 0:
        return "0"
    text = human_bytes(value, digits=1)
    return text.replace(".0 ", " ")


def mean_std_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (n - 1) and the half-width of the 95% Student-t interval of the mean.

    ``statistics`` computes both exactly rounded, so n equal values give a std of exactly 0; std and interval
    are NaN for n = 1."""
    import statistics

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n == 1:
        return mean, math.nan, math.nan
    std = statistics.stdev(values)
    from scipy.stats import t

    return mean, std, float(t.ppf(0.975, n - 1) * std / math.sqrt(n))


def _on_common_steps(parts: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """Runs of one group evaluated at different rounds (an online stream's phases differ by seed): each run's
    accuracy and x interpolated linearly onto the union of their rounds inside the range all of them cover, so
    every point averages all the runs."""
    rounds = [set(p["round"]) for p in parts]
    if all(r == rounds[0] for r in rounds):
        return parts
    lo, hi = max(min(r) for r in rounds), min(max(r) for r in rounds)
    grid = np.array(sorted(x for x in set().union(*rounds) if lo <= x <= hi), dtype=float)
    if grid.size == 0:
        return parts
    out = []
    for p in parts:
        p = p.sort_values("round")
        r = p["round"].to_numpy(float)
        out.append(pd.DataFrame({"round": grid, "x": np.interp(grid, r, p["x"].to_numpy(float)),
                                 "accuracy": np.interp(grid, r, p["accuracy"].to_numpy(float))}))
    return out


def curves(runs: list[dict], x_key: str = "round") -> dict[str, pd.DataFrame]:
    """Per group, the accuracy over ``round``: x (mean of ``x_key`` over the group's runs at that round), mean,
    std (NaN for one run), ci95 (Student t half-width; NaN for one run) and n. Runs evaluated at different rounds
    are put on common rounds first (``_on_common_steps``)."""
    from scipy.stats import t

    frames: dict[str, list[pd.DataFrame]] = {}
    for run in runs:
        m = run["metrics"]
        if m.empty or x_key not in m or "accuracy" not in m or "round" not in m:
            continue
        m = m.dropna(subset=["accuracy"])
        if m.empty:
            continue
        m = m.assign(x=m[x_key])[["round", "x", "accuracy"]].drop_duplicates("round", keep="last")
        frames.setdefault(run["group"], []).append(m)
    out = {}
    for group, parts in frames.items():
        parts = _on_common_steps(parts)
        agg = pd.concat(parts).groupby("round").agg(x=("x", "mean"), mean=("accuracy", "mean"),
                                                     std=("accuracy", "std"), n=("accuracy", "size")).reset_index()
        half = [t.ppf(0.975, n - 1) * s / math.sqrt(n) if n > 1 else math.nan for n, s in zip(agg["n"], agg["std"])]
        out[group] = agg.assign(ci95=half)
    return out


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42, "font.size": 9, "axes.titlesize": 9,
      "legend.fontsize": 8, "axes.spines.top": False, "axes.spines.right": False}


def save(fig, out_dir: Path, name: str) -> list[Path]:  # noqa: ANN001
    """``name``.png (``PNG_DPI``), .pdf and .svg; the figure is closed."""
    plt = _pyplot()
    paths = []
    try:
        for ext in FORMATS:
            path = out_dir / f"{name}.{ext}"
            fig.savefig(path, dpi=PNG_DPI if ext == "png" else None, bbox_inches="tight")
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def _band_text(band: str, ns: list[int]) -> str:
    lo, hi = min(ns), max(ns)
    seeds = f"{lo} seeds" if lo == hi else f"{lo}-{hi} seeds"
    return f"shaded: mean $\\pm$ 1 std over {seeds}" if band == "std" else f"shaded: 95% CI of the mean over {seeds}"


def _legend(ax, band: str, ns: list[int], many: bool) -> None:  # noqa: ANN001
    """The methods' legend, with an entry for the shaded band when any group averages several runs."""
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if any(n > 1 for n in ns):
        handles.append(Patch(facecolor="0.6", alpha=0.3, linewidth=0))
        labels.append(_band_text(band, [n for n in ns if n > 1]))
    if many:  # beside the axes, where it hides no curve
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    else:
        ax.legend(handles, labels, frameon=False)


def plot_curves(runs: list[dict], styles: dict[str, Style], out_dir: Path, name: str, *, x_key: str, x_label: str,
                y_label: str = "test accuracy", band: str = "std", log_x: bool = False, integer_x: bool = False,
                bytes_x: bool = False) -> list[Path]:
    """One figure: each group's mean accuracy against ``x_key`` with a shaded band (``band``: "std" or "ci95")
    where it averages several runs; [] when no run has the curve."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plt = _pyplot()
    found = curves(runs, x_key)
    if log_x:
        found = {g: c[c["x"] > 0] for g, c in found.items()}
    found = {g: c for g, c in found.items() if not c.empty}
    if not found:
        return []
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        ns = []
        for group in [g for g in styles if g in found]:
            c, style = found[group], styles[group]
            every = max(1, len(c) // 12)  # markers stay readable on a 250-step stream
            ax.plot(c["x"], c["mean"], markersize=4, linewidth=1.4, markevery=every, **style.kwargs())
            n = int(c["n"].max())
            ns.append(n)
            if n > 1:
                half = (c["std"] if band == "std" else c["ci95"]).fillna(0)
                if len(c) == 1:  # one point (a one-shot method): the band as an interval bar
                    ax.errorbar(c["x"], c["mean"], yerr=half, color=style.color, capsize=3, linewidth=1)
                else:
                    ax.fill_between(c["x"], c["mean"] - half, c["mean"] + half, color=style.color, alpha=0.15,
                                    linewidth=0)
        if log_x:
            ax.set_xscale("log")
        if bytes_x:
            if log_x:
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FuncFormatter(_bytes_tick))
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        _legend(ax, band, ns, many=len(found) > 5)
        return save(fig, out_dir, name)


def _stream_label(runs: list[dict]) -> str:
    sizes = {(((r.get("config") or {}).get("config") or {}).get("stream") or {}).get("batch_size") for r in runs}
    return f"stream step (mini-batches of {sizes.pop()})" if len(sizes) == 1 and None not in sizes else "stream step"


def accuracy_matrix(run_dir: Path) -> np.ndarray | None:
    """The run's accuracy_matrix.csv as a (T, T) array (NaN above the diagonal), None where there is none."""
    path = Path(run_dir) / "accuracy_matrix.csv"
    try:
        frame = pd.read_csv(path, index_col=0)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    cols = [c for c in frame.columns if str(c).startswith("task_")]
    return frame[cols].to_numpy(dtype=np.float64) if cols and len(frame) == len(cols) else None


def plot_task_heatmaps(runs: list[dict], styles: dict[str, Style], out_dir: Path) -> list[Path]:
    """task_accuracy: per class-incremental group, a[i][j] (accuracy after task i on task j's classes; mean over
    the group's runs), one panel per group; [] when no run saved an accuracy matrix."""
    plt = _pyplot()
    mats: dict[str, list[np.ndarray]] = {}
    for run in runs:
        m = accuracy_matrix(run["dir"])
        if m is not None:
            mats.setdefault(run["group"], []).append(m)
    groups = [g for g in styles if g in mats]
    if not groups:
        return []
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    with plt.rc_context(RC):
        fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.8, 2.7 * rows), squeeze=False)
        image = None
        for ax, group in zip(axes.flat, groups):
            stack = [m for m in mats[group] if m.shape == mats[group][0].shape]
            with warnings.catch_warnings():  # the unseen (upper) cells are NaN in every run
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(np.stack(stack), axis=0) if len(stack) > 1 else stack[0]
            t = mean.shape[0]
            image = ax.imshow(np.ma.masked_invalid(100 * mean), vmin=0.0, vmax=100.0, cmap="viridis", aspect="equal")
            for i in range(t):
                for j in range(t):
                    if mean[i, j] == mean[i, j]:
                        ax.text(j, i, f"{100 * mean[i, j]:.0f}", ha="center", va="center", fontsize=7,
                                color="black" if mean[i, j] > 0.6 else "white")
            ax.set_xticks(range(t), [str(j + 1) for j in range(t)])
            ax.set_yticks(range(t), [str(i + 1) for i in range(t)])
            ax.set_xlabel("accuracy on the classes of task")
            if ax in axes[:, 0]:
                ax.set_ylabel("after training task")
            n = len(stack)
            ax.set_title(styles[group].label + (f" (mean of {n})" if n > 1 else ""))
            for side in ("top", "right"):
                ax.spines[side].set_visible(True)
        for ax in list(axes.flat)[len(groups):]:
            ax.set_visible(False)
        bar = fig.colorbar(image, ax=axes, shrink=0.8)
        bar.set_label("test accuracy (%)")
        return save(fig, out_dir, "task_accuracy")


def _as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def plot_sweep(runs: list[dict], styles: dict[str, Style], out_dir: Path,
               metric: Callable[[dict], float | None]) -> list[Path]:
    """sweep: for each swept key, the final accuracy (mean over seeds, 95% Student-t interval bars) against its
    value; one line per label (and per value of the other swept keys); [] outside a sweep."""
    plt = _pyplot()
    points: dict[str, tuple[str, dict[str, str]]] = {}
    values: dict[str, list[float]] = {}
    for run in runs:
        label, point = split_group(run["group"], run["summary"].get("label"))
        if not point or run["summary"].get("status", "completed") != "completed":
            continue
        v = metric(run["summary"])
        if v is None:
            continue
        points[run["group"]] = (label, point)
        values.setdefault(run["group"], []).append(v)
    keys = sorted({k for _, p in points.values() for k in p})
    if not keys:
        return []
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys) + 1.6, 3.4), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            xs = sorted({p[key] for _, p in points.values() if key in p}, key=lambda s: (_as_number(s) is None,
                                                                                          _as_number(s) or 0, s))
            numeric = all(_as_number(x) is not None for x in xs)
            lines: dict[tuple, list[tuple[str, str]]] = {}
            for group, (label, point) in points.items():
                if key in point:
                    rest = tuple(sorted((k, v) for k, v in point.items() if k != key))
                    lines.setdefault((label, rest), []).append((point[key], group))
            ns = []
            nums = [_as_number(v) for v in xs] if numeric else []
            log = numeric and min(nums) > 0 and max(nums) / min(nums) >= 10
            span = (max(nums) - min(nums) if numeric else len(xs)) or 1.0
            for k, ((label, rest), members) in enumerate(sorted(lines.items(), key=lambda kv: min(
                    list(styles).index(g) for _, g in kv[1]))):
                members.sort(key=lambda m: xs.index(m[0]))
                first = min((g for _, g in members), key=list(styles).index)
                stats = [mean_std_ci(values[g]) for _, g in members]
                x = [_as_number(v) if numeric else xs.index(v) for v, _ in members]
                shift = (k - (len(lines) - 1) / 2) * 0.015  # lines side by side, so no bar hides another
                x = [v * 10 ** shift if log else v + shift * span for v in x]
                y = [s[0] for s in stats]
                err = [0.0 if s[2] != s[2] else s[2] for s in stats]
                ns += [len(values[g]) for _, g in members]
                others = ", ".join(f"{_short_key(k, [k2 for k2, _ in rest])}={v}" for k, v in rest)
                style = styles[first]
                ax.errorbar(x, y, yerr=err, capsize=3, markersize=4, linewidth=1.2, color=style.color,
                            marker=style.marker, linestyle=style.linestyle,
                            label=f"{label} ({others})" if others else label)
            if numeric:
                if log:
                    ax.set_xscale("log")
                ax.set_xticks(nums, xs)
                ax.minorticks_off()
            else:
                ax.set_xticks(range(len(xs)), xs)
            ax.set_xlabel(key)
            lo, hi = min(ns), max(ns)
            seeds = f"{lo}" if lo == hi else f"{lo}-{hi}"
            ax.set_ylabel(f"final accuracy\n(mean, bars: 95% CI, {seeds} seeds)")
            ax.grid(alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        axes.flat[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        return save(fig, out_dir, "sweep")


def plot_report(runs: list[dict], out_dir: Path, styles: dict[str, Style] | None = None, band: str = "std",
                metric: Callable[[dict], float | None] | None = None) -> list[Path]:
    """Every figure the runs call for (see the module docstring), each in ``FORMATS``; the paths written."""
    styles = style_map(runs) if styles is None else styles
    metric = metric or (lambda s: s.get("final_accuracy") if isinstance(s.get("final_accuracy"), (int, float))
                        else None)
    by_kind: dict[str, list[dict]] = {FEDERATED: [], ONLINE: [], TASKS: []}
    for run in runs:
        by_kind[run_kind(run)].append(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    fed, online, tasks = by_kind[FEDERATED], by_kind[ONLINE], by_kind[TASKS]
    written += plot_curves(fed, styles, out_dir, "accuracy_vs_round", x_key="round", x_label="round",
                           band=band, integer_x=True)
    written += plot_curves(fed, styles, out_dir, "accuracy_vs_bytes", x_key="bytes_up",
                           x_label="uploaded by all clients, cumulative (log scale)", band=band, log_x=True,
                           bytes_x=True)
    timed = [r for r in fed if "sim_seconds" in r["metrics"] and r["metrics"]["sim_seconds"].notna().any()]
    written += plot_curves(timed, styles, out_dir, "accuracy_vs_sim_time", x_key="sim_seconds",  # [system] runs
                           x_label="simulated time (s; mean over seeds at each round)", band=band)
    written += plot_curves(online, styles, out_dir, "accuracy_vs_step", x_key="round", x_label=_stream_label(online),
                           band=band, integer_x=True)
    written += plot_curves(tasks, styles, out_dir, "accuracy_per_task", x_key="round", x_label="tasks learned",
                           y_label="test accuracy on all classes seen", band=band, integer_x=True)
    written += plot_task_heatmaps(tasks, styles, out_dir)
    written += plot_sweep(runs, styles, out_dir, metric)
    return written
