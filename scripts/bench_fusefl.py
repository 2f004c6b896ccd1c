"""Benchmark for fedsim issues #11 and #22: FuseFL against the one-shot baselines, over training budgets, K and merges.

For Fashion-MNIST, 5 clients, every partition, alpha, budget (total local epochs E) and seed asked, all methods run
through the engine on the same partition and seed, with one training budget (`client.epochs = E` local epochs in
total for every one-shot method; FuseFL gets E // K per stage, the remainder one epoch each to the earliest stages):

    per (E, K, merge):
      FuseFL (default: averaged head on the summed features, recalibrated on virtual features; K + 1 rounds) |
      strict one-shot FuseFL, head "avg" (no extra round: the same run's `accuracy_before_recalibration`) |
      strict one-shot FuseFL, head "logits" (K rounds; its own run, with --strict-heads avg,logits)
    per E (the baselines do not depend on K or the merge):
      one-shot FedAvg (uniform) | ensemble (mean logits) | ensemble + recalibration (FuseFL's head on the local
      models: FuseFL with K = 1) | best local model (oracle pick) | FedAvg after 1 / 5 / ... rounds (one run,
      read per round; `client.epochs` per round; --fedavg-rounds)

The ensemble and best-local rows come from the `ensemble-recalibrated` run, which evaluates the same local
models (tests/test_fusefl_protocol.py checks that its `ensemble_accuracy` equals the `ensemble` strategy's).
Prints every run as a JSON line, then per setting mean and std over seeds of accuracy (and the per-seed values),
bytes up and down per client, wall time and parameters, and per (E, K, merge) the gaps FuseFL - ensemble +
recalibration (what fusion adds over the same head without fusion) and strict FuseFL - ensemble. Writes
`bench_fusefl.csv` (one row per run and method) to --out.

Runs are kept under --out/<partition>/alpha<a>/epochs<E>/seed<s>/<label>; with --reuse a completed run of the same
scenario is read back instead of run again, so an interrupted sweep resumes where it stopped.

    python scripts/bench_fusefl.py --alphas 0.1 --seeds 0,1,2                   # Dirichlet (fedsim's sampler)
    python scripts/bench_fusefl.py --alphas 0.1 --seeds 0,1,2 --partitions paper  # the paper's partition
    python scripts/bench_fusefl.py --max-train 12000 --epochs 10 --stages 2,4 --merge avg,conv1x1 \\
        --strict-heads avg,logits --fedavg-rounds "" --reuse --out runs/fusefl-budget    # issue #22's sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from fedsim.config import config_from_dict
from fedsim.engine.runner import run_scenario
from fedsim.results.rundir import completed_run_of, load_run

PARTITIONS = {
    "dirichlet": {"kind": "dirichlet"},
    # FuseFL's official sampler: Dirichlet with clients capped at N / K, redrawn until each holds >= 10
    "paper": {"kind": "dirichlet", "self_balancing": True, "min_partition_size": 10},
}
STRICT_HEADS = ("avg", "logits")  # FuseFL heads that need no statistics round: K rounds, strictly one shot per stage
DEFAULT = "FuseFL (default: recalibrated head)"
ENSEMBLE = "ensemble (mean logits)"
ENSEMBLE_RECAL = "ensemble + recalibration"


def strict_name(head: str) -> str:
    return f"strict one-shot FuseFL (head {head})"


def scenario(args: argparse.Namespace, partition: str, alpha: float, epochs: int, seed: int, strategy: dict,
             rounds: int | None = None) -> dict:
    tree = {
        "seed": seed,
        "data": {"name": "fashion-mnist", "max_train": args.max_train, "max_test": args.max_test},
        "partition": {**PARTITIONS[partition], "num_clients": args.clients, "alpha": alpha},
        "model": {"name": "cnn", "width": args.width},
        "client": {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": 0.9},
        "simulation": {"backend": args.backend, "num_cpus": 1},
        "strategy": strategy,
    }
    if rounds is not None:
        tree["rounds"] = rounds
    return tree


def run_dir(args: argparse.Namespace, partition: str, alpha: float, epochs: int, seed: int, label: str) -> Path:
    return Path(args.out) / partition / f"alpha{alpha}" / f"epochs{epochs}" / f"seed{seed}" / label


def run(args: argparse.Namespace, partition: str, alpha: float, epochs: int, seed: int, label: str, strategy: dict,
        rounds: int | None = None) -> dict:
    out = run_dir(args, partition, alpha, epochs, seed, label)
    config = config_from_dict(scenario(args, partition, alpha, epochs, seed, strategy, rounds))
    if args.reuse and completed_run_of(out, config.to_dict()):  # same scenario already run: read its files
        return load_run(out)
    run_scenario(config, out, label=label, show_progress=False)
    return load_run(out)


def row(setting: dict, method: str, summary: dict, **extra) -> dict:
    return {**setting, "method": method, "stages": None, "merge": None, "accuracy": summary.get("final_accuracy"),
            "bytes_up_per_client": summary.get("bytes_up_per_client"),
            "bytes_down_per_client": summary.get("bytes_down_per_client"), "rounds": summary.get("rounds"),
            "wall_s": summary.get("wall_seconds"), "parameters": summary.get("num_parameters"), **extra}


def first_rounds(metrics: pd.DataFrame, rounds: int, clients: int) -> dict:
    """Bytes up / down per client and the elapsed time after round `rounds` of a run (its metrics.csv)."""
    m = metrics[metrics["round"] == rounds].iloc[0]
    return {"bytes_up_per_client": float(m["bytes_up"]) / clients,
            "bytes_down_per_client": float(m["bytes_down"]) / clients, "wall_s": float(m["elapsed_seconds"])}


def fusefl_rows(args: argparse.Namespace, setting: dict, partition: str, alpha: float, epochs: int, seed: int,
                stages: int, merge: str) -> list[dict]:
    setting = {**setting, "stages": stages, "merge": merge}
    label = f"fusefl-K{stages}-{merge}"
    ff = run(args, partition, alpha, epochs, seed, label, {"name": "fusefl", "stages": stages, "merge": merge})
    s = ff["summary"]
    rows = [row(setting, DEFAULT, s, stages=stages, merge=merge)]
    if "avg" in args.strict_heads:  # the first K rounds of the default run are the avg-head run (tested equal)
        rows.append(row(setting, strict_name("avg"), s, stages=stages, merge=merge,
                        accuracy=s["accuracy_before_recalibration"], rounds=stages,
                        **first_rounds(ff["metrics"], stages, args.clients)))
    if "logits" in args.strict_heads:
        lg = run(args, partition, alpha, epochs, seed, f"{label}-logits",
                 {"name": "fusefl", "stages": stages, "merge": merge, "head": "logits"})["summary"]
        rows.append(row(setting, strict_name("logits"), lg, stages=stages, merge=merge))
    return rows


def baseline_rows(args: argparse.Namespace, setting: dict, partition: str, alpha: float, epochs: int,
                  seed: int) -> list[dict]:
    rows = []
    one = run(args, partition, alpha, epochs, seed, "fedavg-oneshot", {"name": "fedavg-oneshot"})["summary"]
    rows.append(row(setting, "one-shot FedAvg (uniform)", one))
    ens = run(args, partition, alpha, epochs, seed, "ensemble-recalibrated",
              {"name": "ensemble-recalibrated"})["summary"]
    rows.append(row(setting, ENSEMBLE_RECAL, ens))
    rows.append(row(setting, ENSEMBLE, ens, accuracy=ens["ensemble_accuracy"], rounds=1,
                    bytes_up_per_client=one["bytes_up_per_client"], bytes_down_per_client=0.0, wall_s=None))
    rows.append(row(setting, "best local model (oracle)", ens, accuracy=ens["best_local_accuracy"], rounds=1,
                    bytes_up_per_client=one["bytes_up_per_client"], bytes_down_per_client=0.0,
                    parameters=ens["single_model_parameters"], wall_s=None))
    if args.fedavg_rounds:
        r = run(args, partition, alpha, epochs, seed, "fedavg", {"name": "fedavg"}, rounds=max(args.fedavg_rounds))
        metrics, fs = r["metrics"], r["summary"]
        for n in args.fedavg_rounds:
            m = metrics[metrics["round"] == n].iloc[0]
            rows.append(row(setting, f"FedAvg, {n} round{'s' if n != 1 else ''}", fs, accuracy=float(m["accuracy"]),
                            rounds=n, **first_rounds(metrics, n, args.clients)))
    return rows


def one_setting(args: argparse.Namespace, partition: str, alpha: float, epochs: int, seed: int) -> list[dict]:
    setting = {"partition": partition, "alpha": alpha, "epochs": epochs, "seed": seed}
    rows = baseline_rows(args, setting, partition, alpha, epochs, seed)
    for stages in args.stages:
        for merge in args.merge:
            rows.extend(fusefl_rows(args, setting, partition, alpha, epochs, seed, stages, merge))
    for r_ in rows:
        print(json.dumps(r_), flush=True)
    return rows


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and per-seed values over seeds, per (partition, alpha, epochs, method, K, merge)."""
    table = table.copy()
    table[["stages", "merge"]] = table[["stages", "merge"]].astype(object).where(table[["stages", "merge"]].notna(),
                                                                                 "")
    keys = ["partition", "alpha", "epochs", "method", "stages", "merge"]
    return table.groupby(keys, sort=False).agg(
        accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"), seeds=("seed", "count"),
        per_seed=("accuracy", lambda v: " / ".join(f"{x:.4f}" for x in v)),
        up_kb=("bytes_up_per_client", lambda v: v.mean() / 1e3),
        down_kb=("bytes_down_per_client", lambda v: v.mean() / 1e3), wall_s=("wall_s", "mean"),
        parameters=("parameters", "first"), rounds=("rounds", "first")).reset_index()


def gaps(table: pd.DataFrame, strict_heads: list[str]) -> list[str]:
    """Per (partition, alpha, epochs, K, merge): FuseFL - ensemble + recalibration, strict heads - ensemble,
    in points, mean ± std over seeds with the per-seed values."""
    lines = []
    for (partition, alpha, epochs), group in table.groupby(["partition", "alpha", "epochs"], sort=False):
        base = group[group["stages"].isna()].pivot(index="seed", columns="method", values="accuracy")
        for (stages, merge), ff in group[group["stages"].notna()].groupby(["stages", "merge"], sort=False):
            acc = ff.pivot(index="seed", columns="method", values="accuracy")
            pairs = [(DEFAULT, ENSEMBLE_RECAL), (DEFAULT, "one-shot FedAvg (uniform)")]
            pairs += [(strict_name(h), ENSEMBLE) for h in strict_heads]
            for a, b in pairs:
                gap = 100 * (acc[a] - base[b])
                per_seed = ", ".join(f"{v:+.1f}" for v in gap)
                lines.append(f"{partition}, alpha {alpha}, E {epochs}, K {int(stages)}, {merge}: {a} - {b} = "
                             f"{gap.mean():+.1f} ± {gap.std():.1f} points (seeds: {per_seed})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", default="dirichlet", help="comma list of: " + ", ".join(PARTITIONS))
    parser.add_argument("--alphas", default="0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--max-train", type=int, default=None, help="training slice (default: all 60k)")
    parser.add_argument("--max-test", type=int, default=None, help="test slice (default: all 10k)")
    parser.add_argument("--width", type=int, default=16, help="cnn base width")
    parser.add_argument("--epochs", default="2",
                        help="comma list of local-epoch budgets in total (FuseFL: spread over its stages; FedAvg: "
                             "per round)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--stages", default="2", help="comma list of FuseFL's K")
    parser.add_argument("--merge", default="avg", help="comma list of FuseFL merges (strategy.merge)")
    parser.add_argument("--strict-heads", default="avg",
                        help="comma list of " + ", ".join(STRICT_HEADS) + ": FuseFL without the statistics round "
                             "(avg: read from the default run; logits: one more run per K and merge); empty: none")
    parser.add_argument("--fedavg-rounds", default="1,5", help="comma list; empty: no FedAvg run")
    parser.add_argument("--backend", default="inline", choices=("ray", "inline"))
    parser.add_argument("--out", default="runs/bench-fusefl")
    parser.add_argument("--reuse", action="store_true",
                        help="read runs already in --out (same scenario, completed) instead of running them again")
    args = parser.parse_args()

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v.strip()]

    args.fedavg_rounds = sorted(ints(args.fedavg_rounds))
    args.stages, epochs_list, seeds = ints(args.stages), ints(args.epochs), ints(args.seeds)
    args.merge = [m.strip() for m in args.merge.split(",") if m.strip()]
    args.strict_heads = [h.strip() for h in args.strict_heads.split(",") if h.strip()]
    unknown = sorted(set(args.strict_heads) - set(STRICT_HEADS))
    if unknown:
        parser.error(f"--strict-heads: unknown {', '.join(unknown)} (choose from {', '.join(STRICT_HEADS)})")
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    alphas = [float(a) for a in args.alphas.split(",")]

    rows = []
    for partition in partitions:
        for alpha in alphas:
            for epochs in epochs_list:
                for seed in seeds:
                    rows.extend(one_setting(args, partition, alpha, epochs, seed))
    table = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / "bench_fusefl.csv", index=False)

    agg = summarize(table)
    print()
    print("| partition | alpha | epochs | method | K | merge | rounds | accuracy (mean ± std) | per seed | seeds | "
          "up / client | down / client | wall s | parameters |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for _, r in agg.iterrows():
        wall = "" if pd.isna(r["wall_s"]) else f"{r['wall_s']:.0f}"
        down = "" if pd.isna(r["down_kb"]) else f"{r['down_kb']:,.1f} KB"
        k = "" if r["stages"] == "" else int(r["stages"])
        print(f"| {r['partition']} | {r['alpha']} | {r['epochs']} | {r['method']} | {k} | {r['merge']} | "
              f"{int(r['rounds'])} | {r['accuracy_mean']:.4f} ± "
              f"{0.0 if pd.isna(r['accuracy_std']) else r['accuracy_std']:.4f} | {r['per_seed']} | {r['seeds']} | "
              f"{r['up_kb']:,.1f} KB | {down} | {wall} | {int(r['parameters']):,} |")
    print()
    for line in gaps(table, args.strict_heads):
        print(line)


if __name__ == "__main__":
    main()
