"""The one-shot aggregation benchmark (fedsim issue #16): the whole one-shot menu in one command, one table.

Runs every variant of scenarios/oneshot-fmnist.toml (FuseFL, one-shot FedAvg, ensemble, best local model, AFL,
FedDF, DENSE, Co-Boosting) through the engine for each alpha and seed asked, all on the same partition per (alpha,
seed), and prints one table in the layout of the FuseFL paper's main table: one row per method, the test accuracy
per alpha (mean +- std over the seeds that ran), then bytes uploaded per client, server seconds (the server-side
compute a strategy reports as `server_seconds`: the distillation methods' synthesis and distillation; AFL's
aggregation and solve), wall seconds per run and the size of the saved model.

    python scripts/bench_oneshot.py                        # the scenario as written (official server budgets: hours)
    python scripts/bench_oneshot.py --quick                # sized for a small CPU machine (QUICK, QUICK_STRATEGY)
    python scripts/bench_oneshot.py --quick --seeds 0 --alphas 0.5 --only feddf,dense
    python scripts/bench_oneshot.py --quick --reuse        # skip runs completed earlier with the same configuration

Runs go seed by seed (every alpha and method of a seed before the next seed), so `--budget-minutes` stops with
whole seeds done; the table says how many seeds each cell holds. Writes runs under --out, every run's row to
bench_oneshot.csv and the table to bench_oneshot.md there.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim.config import load_scenarios
from fedsim.engine.runner import run_scenario
from fedsim.results.rundir import completed_run_of

# --quick: a 4000-image slice (10% of it the server's), 2000 test images, and per-strategy server budgets that a
# shared 2-core machine runs in about a minute per method; the official budgets (the scenario's defaults) are
# FedDF 10^4 distillation steps and DENSE / Co-Boosting 200 epochs of 30 generator steps on batches of 256 / 128
QUICK = ["data.max_train=4000", "data.max_test=2000"]
QUICK_STRATEGY = {
    "feddf": ["strategy.steps=100"],  # 100 batches of 128 (32 passes over the 400 held-out images)
    # 6 synthesized batches of 32, 10 generator steps each, a narrower generator; distillation batches of 32 so that
    # the small pool still gives the student steps (21 in all)
    "dense": ["strategy.epochs=6", "strategy.g_steps=10", "strategy.synthesis_batch_size=32",
              "strategy.batch_size=32", "strategy.ngf=16", "strategy.nz=64"],
}
QUICK_STRATEGY["co-boosting"] = QUICK_STRATEGY["dense"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="scenarios/oneshot-fmnist.toml")
    ap.add_argument("--alphas", default="0.1,0.3,0.5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="", help="comma-separated variant labels (default: all)")
    ap.add_argument("--quick", action="store_true", help="apply QUICK (a data slice and small server budgets)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more scenario overrides")
    ap.add_argument("--out", default="runs/bench-oneshot")
    ap.add_argument("--reuse", action="store_true", help="keep runs completed earlier with the same configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (1: a shared machine)")
    ap.add_argument("--budget-minutes", type=float, default=None, help="start no new seed after this long")
    return ap.parse_args()


def model_megabytes(run_dir: Path) -> float | None:
    """Size of the saved model's tensors (parameters and buffers, as stored), in MB."""
    import torch

    path = run_dir / "model.pt"
    if not path.exists():
        return None
    model = torch.load(path, weights_only=False)
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    return sum(t.numel() * t.element_size() for t in state.values()) / 1e6


def server_seconds(summary: dict) -> float | None:
    if summary.get("server_seconds") is not None:
        return float(summary["server_seconds"])
    if summary.get("aggregate_seconds") is not None:  # AFL: the server's aggregation and ridge solve
        return float(summary["aggregate_seconds"]) + float(summary.get("solve_seconds") or 0.0)
    return None


def run_one(args: argparse.Namespace, label: str, config, alpha: float, seed: int) -> dict:  # noqa: ANN001
    run_dir = Path(args.out) / f"alpha{alpha}" / f"seed{seed}" / label
    start = time.time()
    reused = bool(args.reuse and completed_run_of(run_dir, config.to_dict()))
    if reused:
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        summary = run_scenario(config, run_dir, label=label, show_progress=False)
    row = {"method": label, "strategy": config.strategy.name, "alpha": alpha, "seed": seed,
           "accuracy": summary["final_accuracy"], "bytes_up_per_client": summary.get("bytes_up_per_client"),
           "server_seconds": server_seconds(summary), "wall_seconds": summary.get("wall_seconds"),
           "num_parameters": summary.get("num_parameters"), "model_mb": model_megabytes(run_dir),
           "ensemble_accuracy": summary.get("ensemble_accuracy"), "reused": reused,
           "elapsed": round(time.time() - start, 1)}
    print(json.dumps(row), flush=True)
    return row


def fmt_acc(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float) * 100
    if len(v) == 0:
        return "-"
    std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
    return f"{v.mean():.2f} ± {std:.2f} ({len(v)})" if len(v) > 1 else f"{v.mean():.2f} (1)"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: pd.DataFrame, order: list[str], alphas: list[float]) -> str:
    head = ["method", *[f"alpha={a}" for a in alphas], "MB up / client", "server s", "wall s / run", "model MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in order:
        r = rows[rows["method"] == label]
        if r.empty:
            continue
        cells = [label, *[fmt_acc(r[r["alpha"] == a]["accuracy"]) for a in alphas],
                 fmt(r["bytes_up_per_client"].mean() / 1e6, ".3f"),
                 fmt(r["server_seconds"].astype(float).mean() if r["server_seconds"].notna().any() else None, ".1f"),
                 fmt(r["wall_seconds"].astype(float).mean(), ".1f"),
                 fmt(r["model_mb"].astype(float).mean() if r["model_mb"].notna().any() else None, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(max(1, args.threads))
    alphas = [float(a) for a in args.alphas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    only = [s for s in args.only.split(",") if s]
    base = QUICK if args.quick else []
    variants = load_scenarios(args.scenario, [*base, *args.set], only)
    order = [label for label, _ in variants]
    extra = {label: (QUICK_STRATEGY.get(config.strategy.name, []) if args.quick else []) for label, config in variants}
    print(f"scenario {args.scenario}; overrides {base}, per method {extra}, then {args.set}; alphas {alphas}; "
          f"seeds {seeds}",
          flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for seed in seeds:
        if args.budget_minutes is not None and time.time() - start > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes} min spent: seeds from {seed} on not run", flush=True)
            break
        for alpha in alphas:
            for label in order:
                sets = [*base, *extra[label], *args.set, f"partition.alpha={alpha}", f"seed={seed}"]
                ((_, config),) = load_scenarios(args.scenario, sets, [label])
                rows.append(run_one(args, label, config, alpha, seed))
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "bench_oneshot.csv", index=False)
    text = table(frame, order, alphas)
    minutes = (time.time() - start) / 60
    note = (f"Fashion-MNIST, 5 clients, Dirichlet alpha; test accuracy in % (mean ± std over seeds, run count in "
            f"parentheses); overrides {base}, per method {extra}, then {args.set}; {minutes:.1f} min in all.")
    (out / "bench_oneshot.md").write_text(note + "\n\n" + text + "\n")
    print(note)
    print(text)


if __name__ == "__main__":
    main()
