"""Benchmark for fedsim issue #22: FedAvg beside the server optimizers, at their defaults and with the server rate
tuned on the FedOpt paper's log grid (Reddi et al. 2021 tune eta on {10^-3, 10^-2.5, ..., 10^1}).

Scenario: scenarios/fedopt-fmnist.toml (Fashion-MNIST, 20 clients Dirichlet(0.1), 10 rounds of 1 local epoch,
CNN width 16, 4,000 training / 2,000 test images). Every run is one ``fedsim run`` of that file (``--only LABEL
--set seed=S --set LABEL:RATE=V``) in its own process, so the command line is the reproduction of each cell.

1. The grid, on seed --grid-seed (0): each optimizer's server rate (FedAvgM ``server_learning_rate`` at its
   momentum 0.9; FedAdam / FedYogi / FedAdagrad ``eta``) at every log10 value of GRID.
2. FedAvg, each optimizer at its registered default and at its grid's best rate, on every seed of --seeds.
   The best rate is picked on the grid seed's final test accuracy (as the paper picks on its held-out results);
   that seed is also one of the three, so the tuned row carries this selection.

Runs land in --out/<label>/log10=<r>/seed-<s>/ and are skipped when already complete (``fedsim run --resume``),
so an interrupted benchmark picks up where it stopped. Writes --out/bench_fedopt.csv (a row per run) and
--out/bench_fedopt.md (the grid table and the summary table, mean +- std over seeds) and prints the tables.

    python scripts/bench_fedopt.py                       # the table of docs/results-fedopt.md
    python scripts/bench_fedopt.py --jobs 1 --out runs/fedopt-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "fedopt-fmnist.toml"
FEDSIM = [sys.executable, "-m", "fedsim.cli"]
RATE = {"fedavgm": "server_learning_rate", "fedadam": "eta", "fedyogi": "eta", "fedadagrad": "eta"}
GRID = {  # log10 of the server rate: a 0.5-step stretch of the paper's grid around each default (2 shared cores)
    "fedavgm": [-1.0, -0.5, 0.0],
    "fedadam": [-2.5, -2.0, -1.5, -1.0, -0.5],
    "fedyogi": [-2.5, -2.0, -1.5],
    "fedadagrad": [-1.5, -1.0, -0.5],
}


def defaults() -> dict[str, float]:
    """log10 of Flower's default server rates, the "default" rows (fedsim's FedAdam default is now 10^-1.5, a grid
    point: docs/results-fedopt.md)."""
    return {"fedavgm": 0.0, "fedadam": -1.0, "fedyogi": -2.0, "fedadagrad": -1.0}


def run_dir(out: Path, label: str, log_rate: float | None, seed: int) -> Path:
    rate = "default" if log_rate is None else f"log10={log_rate:g}"
    return out / label / rate / f"seed-{seed}"


def run_one(out: Path, label: str, log_rate: float | None, seed: int) -> dict:
    """One ``fedsim run`` of the scenario's ``label`` variant (skipped when complete); its summary as a row."""
    where = run_dir(out, label, log_rate, seed)
    cmd = [*FEDSIM, "run", str(SCENARIO), "--only", label, "--set", f"seed={seed}", "--out", str(where),
           "--quiet", "--resume"]
    if log_rate is not None:
        cmd += ["--set", f"{label}:strategy.{RATE[label]}={10 ** log_rate!r}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary_path = where / label / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    s = json.loads(summary_path.read_text())
    row = {"method": label, "log10_rate": log_rate, "seed": seed, "final_accuracy": s["final_accuracy"],
           "best_accuracy": s["best_accuracy"], "wall_seconds": s["wall_seconds"]}
    print(json.dumps(row), flush=True)
    return row


def collect(out: Path) -> pd.DataFrame:
    """Every completed run under ``out`` as a row (``--report-only``: the tables of what has run so far)."""
    rows = []
    for path in sorted(out.glob("*/*/seed-*/*/summary.json")):
        s = json.loads(path.read_text())
        if s.get("status") != "completed":
            continue
        rate = path.parts[-4]
        rows.append({"method": path.parts[-5], "log10_rate": None if rate == "default" else float(rate[6:]),
                     "seed": int(path.parts[-3][5:]), "final_accuracy": s["final_accuracy"],
                     "best_accuracy": s["best_accuracy"], "wall_seconds": s["wall_seconds"]})
    return pd.DataFrame(rows)


def run_all(out: Path, jobs: list[tuple[str, float | None, int]], workers: int) -> list[dict]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: run_one(out, *j), jobs))


def mean_std(values: pd.Series) -> str:
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values.mean():.4f}"


def _per_seed(sel: pd.DataFrame) -> str:
    return ", ".join(f"{int(seed)}: {a:.4f}" for seed, a in zip(sel.seed, sel.final_accuracy))


def tables(rows: pd.DataFrame, default: dict[str, float], best: dict[str, float], grid_seed: int) -> str:
    """The grid table (grid seed) and the summary table (mean ± std over seeds), as markdown."""
    grid = rows[(rows.seed == grid_seed) & rows.log10_rate.notna()]
    cols = sorted({r for rs in GRID.values() for r in rs})
    lines = [f"Grid (seed {grid_seed}), final test accuracy by log10 of the server rate:", "",
             "| method | " + " | ".join(f"{c:g}" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name in GRID:
        cells = []
        for c in cols:
            hit = grid[(grid.method == name) & (grid.log10_rate == c)]
            cell = f"{hit.final_accuracy.iloc[0]:.4f}" if len(hit) else ""
            cells.append(f"**{cell}**" if cell and c == best.get(name) else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Summary over seeds (final test accuracy, mean ± std over the seeds run; seed: accuracy):", "",
              "| method | server rate | accuracy | per seed |", "|---|---|---|---|"]
    fedavg = rows[rows.method == "fedavg"].drop_duplicates("seed").sort_values("seed")
    lines.append(f"| fedavg | - | {mean_std(fedavg.final_accuracy)} | "
                 f"{_per_seed(fedavg)} |")
    for name in GRID:
        tuned = best.get(name, default[name])
        for what, r in ((("default = tuned" if tuned == default[name] else "default"), default[name]),
                        *((("tuned", tuned),) if tuned != default[name] else ())):
            sel = rows[(rows.method == name) & (rows.log10_rate == r)].drop_duplicates("seed").sort_values("seed")
            lines.append(f"| {name} ({what}) | {10 ** r:.4g} (10^{r:g}) | {mean_std(sel.final_accuracy)} | "
                         f"{_per_seed(sel)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-fedopt")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--grid-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=3, help="runs at a time (each one process, one torch thread)")
    ap.add_argument("--report-only", action="store_true", help="print the tables of the runs under --out, run none")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    default = defaults()
    for name, r in default.items():  # the default is a grid point, so its grid-seed run is shared
        if r not in GRID[name]:
            GRID[name] = sorted([*GRID[name], r])
    if args.report_only:
        frame = collect(args.out)
        grid = frame[frame.seed == args.grid_seed].dropna(subset=["log10_rate"])
        best = {n: float(g.sort_values(["final_accuracy", "log10_rate"], ascending=[False, True]).log10_rate.iloc[0])
                for n, g in grid.groupby("method")}
        print(tables(frame, default, best, args.grid_seed))
        return 0
    others = [s for s in seeds if s != args.grid_seed]
    grid_jobs = [("fedavg", None, args.grid_seed)] + [(n, r, args.grid_seed) for n in GRID for r in GRID[n]]
    # FedAvg and the defaults on the other seeds need no grid result: they run beside it
    grid_jobs += [("fedavg", None, s) for s in others] + [(n, default[n], s) for n in GRID for s in others]
    rows = run_all(args.out, grid_jobs, args.jobs)
    frame = pd.DataFrame(rows)
    best = {}
    for name in GRID:
        g = frame[(frame.method == name) & (frame.seed == args.grid_seed)]
        g = g.sort_values(["final_accuracy", "log10_rate"], ascending=[False, True])
        best[name] = float(g.log10_rate.iloc[0])
    print("best log10 rates on seed", args.grid_seed, json.dumps(best), flush=True)
    more = [(name, best[name], s) for name in GRID if best[name] != default[name] for s in others]
    rows += run_all(args.out, more, args.jobs)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "bench_fedopt.csv", index=False)
    text = tables(frame, default, best, args.grid_seed)
    (args.out / "bench_fedopt.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
