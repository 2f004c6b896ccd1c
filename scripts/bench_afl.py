"""Benchmark AFL through Flower + Ray against the same math in a bare loop, and FedAvg on the same partition.

For each number of clients N (10, 100, 1000; 10000 with --with-10000, 100000 with --with-100000) on real
Fashion-MNIST, Dirichlet(0.1) (IID where N exceeds the 60,000 training rows: flwr-datasets' DirichletPartitioner
refuses more partitions than samples; 40,000 of the 100,000 clients are then empty, and AFL's result does not
depend on the partition anyway):

- AFL end to end through Flower + Ray (`scenarios/afl-fmnist.toml`, in a fresh process each): wall time
  (`wall_s`: Ray start + the round + evaluation; `round_s`: the round and evaluation only; `process_s`: the
  whole child process, interpreter start, imports, data loading and Ray shutdown included), server (driver) peak
  RSS, bytes uploaded (`bytes_up_mb`, with the scenario's upload form: "auto" = the smaller exact form per client)
  against what the packed Gram of every client would be (`packed_up_mb`), test accuracy. One Flower node serves
  ceil(N / --nodes) clients (`simulation.clients_per_node`); bytes and failures are still counted per client.
- The same math in a bare Python loop (`bare_s`): for every client, its partition through the same feature map
  into the same upload (`fedsim.algorithms.afl.learner.client_upload`), folded into the same `AFLLearner`; one
  solve; the same test evaluation. Timed with 1 BLAS/torch thread and with one per core; `bare_s` is the faster
  (on a busy machine multi-threaded OpenBLAS can be much slower). `ratio = wall_s / bare_s` (and
  `round_ratio = round_s / bare_s`). Data loading and partitioning are outside both timings.
- The physical floor (`floor_s`, once): the features of every training row, one Gram of all of them (BLAS syrk)
  and one solve on the same machine, one thread: what any exact method must at least compute.
- FedAvg (Flower's, `model.name = cnn`) on the same partition and grouping for up to --fedavg-rounds rounds: the
  first round whose test accuracy reaches AFL's and its time, else its best accuracy within the budget.

    python scripts/bench_afl.py                       # N = 10, 100, 1000 (about 30 min on 2 cores)
    python scripts/bench_afl.py --with-10000          # adds N = 10000
    python scripts/bench_afl.py --clients 100 1000 10000 100000 --skip-fedavg --bare-threads 1
    python scripts/bench_afl.py --clients 100 --nodes 100 --skip-fedavg   # one client per Flower node
    python scripts/bench_afl.py --clients 10 --nodes 10 --skip-fedavg --bare-threads 1   # issue #26's 10 clients
    python scripts/bench_afl.py --clients 10 --nodes 10 --skip-fedavg --bare-threads 1 --repeats 5   # with spread

At 10 clients the issue's figure takes fedsim's default grouping, one client per node (`--nodes 10`): 4 nodes
of 3, 3, 3 and 1 Dirichlet clients give the two actors uneven shares (one idled ~3 s at the end of the round).

Targets (issue #3): ratio <= 1.5 at 1000 clients; server peak RSS at 10000 clients within 20% of that at 100.
Targets (issue #14): at 10000 clients wall time <= 60 s and bytes up >= 10x below the packed form; at 100000
clients the run completes with server peak RSS within 1.2x of the 100-client run and the same accuracy.
Targets (issue #26): at 100000 clients wall time <= 3x the physical floor (`wall_to_floor`); at 10 clients
ratio <= 1.5. `--repeats R` runs fedsim and the bare loop R times per N, alternating, and prints each ratio's
mean and standard deviation (one pair is at the mercy of the host's drift between its two halves). Each row
records the load average before and after the fedsim run and after the bare loop, and the memory available (the
machine is shared: compare ratios taken in one invocation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "afl-fmnist.toml"
TRAIN_ROWS = 60000  # Fashion-MNIST's training set


# ------------------------------------------------------------------------------------------------- child runs
def child(args: argparse.Namespace) -> None:
    """Run one scenario in this (fresh) process and print its summary with this process's peak RSS."""
    sys.path.insert(0, str(ROOT))
    from fedsim.engine.runner import run_scenario
    from fedsim.results.rundir import load_run

    import tomllib

    from fedsim.config import apply_override, config_from_dict, parse_overrides

    tree = tomllib.loads(Path(args.scenario).read_text())
    if args.strategy:  # another strategy on the same data, partition and grouping: its own default parameters
        tree["strategy"] = {"name": args.strategy}
    for key, value in parse_overrides(args.set):
        apply_override(tree, key, value)
    config = config_from_dict(tree)
    summary = run_scenario(config, args.out, show_progress=False)
    metrics = load_run(args.out)["metrics"]
    out = {
        "summary": summary,
        "rounds": metrics[["round", "accuracy", "elapsed_seconds"]].to_dict("list"),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out, default=str))


def machine_state() -> dict:
    """Load average (1 min) and available memory (GiB) now: figures taken on a shared machine need them beside."""
    avail = float("nan")
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {"load": round(os.getloadavg()[0], 2), "mem_avail_gb": round(avail, 1)}


def run_child(scenario: Path, overrides: list[str], out: Path, strategy: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--scenario", str(scenario), "--out", str(out)]
    if strategy:
        cmd += ["--strategy", strategy]
    for item in overrides:
        cmd += ["--set", item]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.time() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"run failed: {' '.join(cmd)}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = elapsed
    return result


# ------------------------------------------------------------------------------------------------- bare loop
def bare_loop(overrides: list[str], threads: int) -> dict:
    """AFL's math without Flower: per-client statistics through the same feature map, one fold, one solve."""
    sys.path.insert(0, str(ROOT))
    import torch
    from threadpoolctl import threadpool_limits

    from fedsim.config import load_scenario
    from fedsim.scenario import partition_for, scenario_feature_map, test_split, train_split
    from fedsim.algorithms.afl.learner import AFLLearner, client_upload
    from fedsim.strategies.afl import evaluate_weights

    config = load_scenario(SCENARIO, overrides)
    p = config.strategy.params
    train, test = train_split(config), test_split(config)  # loading and partitioning are outside both timings
    parts = partition_for(config)
    fmap = scenario_feature_map(config, "cpu")
    fmap(train.x[:2])  # warm up
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            t0 = time.perf_counter()
            learner = AFLLearner(gamma=p.gamma, target=p.target)
            for idx in parts:
                data = train.subset(idx)
                learner.add_reply(client_upload(data.x, data.y, fmap, train.num_classes, p.upload, p.gamma,
                                                p.batch_size))
            weights = learner.solve().coef_
            acc = evaluate_weights(weights, fmap, test, p.batch_size)["accuracy"]
            return {"bare_s": time.perf_counter() - t0, "accuracy": acc}
    finally:
        torch.set_num_threads(torch_threads)


def physical_floor(overrides: list[str]) -> dict:
    """Features of all training rows, one Gram (syrk), one solve: one thread, the least any exact method does."""
    sys.path.insert(0, str(ROOT))
    import torch
    from threadpoolctl import threadpool_limits

    from fedsim.analytic import RidgeStatistics
    from fedsim.config import load_scenario
    from fedsim.scenario import scenario_feature_map, train_split

    config = load_scenario(SCENARIO, overrides)
    p = config.strategy.params
    train = train_split(config)
    fmap = scenario_feature_map(config, "cpu")
    fmap(train.x[:2])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            t0 = time.perf_counter()
            stats = RidgeStatistics.zeros(int(fmap.dim), train.num_classes)
            for start in range(0, len(train), 4096):
                stats.update(fmap(train.x[start:start + 4096], dtype=torch.float64), train.labels[start:start + 4096],
                             train.num_classes)
            stats.solve(p.gamma)
            return {"floor_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(before)


def packed_reply_bytes(dim: int, num_classes: int) -> int:
    """What one client's packed-Gram reply weighs on the wire (what upload = "statistics" sends)."""
    import numpy as np

    from fedsim.engine.accounting import record_nbytes
    from fedsim.algorithms.afl import protocol

    arrays = {"gram": np.zeros(dim * (dim + 1) // 2), "cross": np.zeros((dim, num_classes)),
              "count": np.zeros(1, np.int64)}
    return record_nbytes(protocol.reply(arrays, 0))


# ------------------------------------------------------------------------------------------------- main
def fedavg_to_target(result: dict, target: float) -> dict:
    rounds = result["rounds"]
    rows = [(r, a, s) for r, a, s in zip(rounds["round"], rounds["accuracy"], rounds["elapsed_seconds"]) if a == a]
    for r, a, s in rows:
        if a >= target:
            return {"fedavg_reached": True, "fedavg_round": r, "fedavg_acc": a, "fedavg_round_s": s}
    r, a, s = max(rows, key=lambda t: t[1])
    return {"fedavg_reached": False, "fedavg_round": r, "fedavg_acc": a, "fedavg_round_s": s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--with-10000", action="store_true", help="also N = 10000")
    parser.add_argument("--with-100000", action="store_true", help="also N = 100000")
    parser.add_argument("--nodes", type=int, default=4, help="Flower nodes; each serves ceil(N / nodes) clients")
    parser.add_argument("--dim", type=int, default=None, help="feature dimension (default: the scenario's)")
    parser.add_argument("--fedavg-rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1,
                        help="fedsim run and bare loop this many times per N, alternating (the host's drift then "
                             "hits both sides alike); the summary gives each ratio's mean and spread")
    parser.add_argument("--skip-fedavg", action="store_true")
    parser.add_argument("--bare-threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="BLAS/torch thread counts to time the bare loop with (the fastest counts)")
    parser.add_argument("--max-train", type=int, default=None, help="slice of the training set (quick runs)")
    parser.add_argument("--bare-max-clients", type=int, default=None,
                        help="skip the bare loop above this many clients (its columns are then NaN)")
    parser.add_argument("--out", default="runs/bench-afl")
    parser.add_argument("--ray-niceness", type=int, default=0,
                        help="RAY_worker_niceness for fedsim's Ray workers (Ray's default adds 15 to the driver's "
                             "niceness, so on a busy machine the actors starve beside a bare loop run at the "
                             "driver's; 0: the same priority as the bare loop; -1: Ray's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default=str(SCENARIO), help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.ray_niceness >= 0:  # inherited by the children, read by the raylet they start (RayConfig)
        os.environ.setdefault("RAY_worker_niceness", str(args.ray_niceness))

    import pandas as pd

    sizes = list(args.clients) + ([10000] if args.with_10000 else []) + ([100000] if args.with_100000 else [])
    out = Path(args.out)
    rows = []
    floor_overrides = [f"model.feature_dim={args.dim}"] if args.dim else []
    if args.max_train:
        floor_overrides.append(f"data.max_train={args.max_train}")
    state = machine_state()
    floor = physical_floor(floor_overrides)["floor_s"]
    print(f"physical floor (features of all rows + one Gram + one solve, 1 thread): {floor:.2f} s "
          f"(load {state['load']} -> {machine_state()['load']}, {state['mem_avail_gb']} GiB available)",
          file=sys.stderr, flush=True)
    for n in sizes:
        per_node = math.ceil(n / args.nodes)
        common = [f"partition.num_clients={n}", f"simulation.clients_per_node={per_node}"]
        if n > (args.max_train or TRAIN_ROWS):  # flwr-datasets' DirichletPartitioner needs fewer clients than rows
            common.append("partition.kind='iid'")  # (at least n - 60000 clients are empty either way)
        if args.dim:
            common.append(f"model.feature_dim={args.dim}")
        if args.max_train:
            common.append(f"data.max_train={args.max_train}")
        for rep in range(1, args.repeats + 1):
            print(f"N={n}{f' (repeat {rep} of {args.repeats})' if args.repeats > 1 else ''}: AFL through Flower + "
                  f"Ray ({math.ceil(n / per_node)} nodes x {per_node} clients) ...", file=sys.stderr, flush=True)
            before = machine_state()
            afl = run_child(SCENARIO, common, out / f"afl-{n}")
            after = machine_state()
            s = afl["summary"]
            if args.bare_max_clients is None or n <= args.bare_max_clients:
                print(f"N={n}: bare loop ...", file=sys.stderr, flush=True)
                bare_runs = {t: bare_loop(common, t) for t in args.bare_threads}
            else:  # the target at this size is against the floor; the per-client bare loop would take minutes
                bare_runs = {t: {"bare_s": float("nan"), "accuracy": float("nan")} for t in args.bare_threads}
            after_bare = machine_state()
            bare = min(bare_runs.values(), key=lambda b: b["bare_s"])  # the faster threading: the conservative ratio
            row = {
                "clients": n, "repeat": rep, "nodes": math.ceil(n / per_node), "wall_s": s["wall_seconds"],
                "round_s": afl["rounds"]["elapsed_seconds"][-1], "process_s": round(afl["process_s"], 2),
                **{f"bare_{t}thr_s": round(b["bare_s"], 2) for t, b in bare_runs.items()},
                "bare_s": round(bare["bare_s"], 2),
                "ratio": round(s["wall_seconds"] / bare["bare_s"], 2),
                "round_ratio": round(afl["rounds"]["elapsed_seconds"][-1] / bare["bare_s"], 2),
                "floor_s": round(floor, 2), "wall_to_floor": round(s["wall_seconds"] / floor, 2),
                "server_rss_mb": round(afl["max_rss_mb"]), "bytes_up_mb": round(s["bytes_up"] / 2**20, 1),
                "packed_up_mb": round(s["answered_clients"] * packed_reply_bytes(s["feature_dim"], 10) / 2**20, 1),
                "accuracy": s["final_accuracy"], "bare_accuracy": bare["accuracy"],
                "dropped": s["dropped_clients"],
                "load_before": before["load"], "load_after": after["load"], "load_after_bare": after_bare["load"],
                "mem_avail_gb": min(before["mem_avail_gb"], after["mem_avail_gb"]),
            }
            if not args.skip_fedavg:
                print(f"N={n}: FedAvg, {args.fedavg_rounds} rounds ...", file=sys.stderr, flush=True)
                fed = run_child(SCENARIO, common + [f"rounds={args.fedavg_rounds}", "model.name=cnn", "model.width=16"],
                                out / f"fedavg-{n}", strategy="fedavg")
                row.update(fedavg_to_target(fed, s["final_accuracy"]))
                row["fedavg_wall_s"] = fed["summary"]["wall_seconds"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "bench_afl.csv", index=False)
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    t = table.groupby("clients").mean(numeric_only=True)  # over the repeats
    rss = t["server_rss_mb"]
    if args.repeats > 1:
        spread = table.groupby("clients")[["ratio", "round_ratio", "wall_s", "bare_s", "process_s"]].agg(
            ["mean", "std"])
        print(f"\nover {args.repeats} alternating repeats (mean +- sd):")
        for n, r in spread.iterrows():
            pm = {col: f"{r[(col, 'mean')]:.2f} +- {r[(col, 'std')]:.2f}" for col in spread.columns.levels[0]}
            print(f"  N={n}: ratio {pm['ratio']}, round_ratio {pm['round_ratio']}, wall {pm['wall_s']} s, "
                  f"bare {pm['bare_s']} s, fedsim process {pm['process_s']} s")
    if 100000 in sizes:
        r = t.loc[100000]
        print(f"100000 clients: wall {r['wall_s']:.1f} s = {r['wall_to_floor']:.2f}x the physical floor "
              f"{r['floor_s']:.2f} s (issue #26 target <= 3x)")
    if 10 in sizes:
        print(f"10 clients: {t.loc[10, 'ratio']:.2f}x the bare loop (issue #26 target <= 1.5x)")
    if 1000 in sizes:
        print(f"\nframework overhead ratio at 1000 clients: {t.loc[1000, 'ratio']:.2f} (target <= 1.5)")
    if 10000 in sizes:
        r = t.loc[10000]
        print(f"10000 clients: wall {r['wall_s']:.1f} s (target <= 60), bytes up {r['bytes_up_mb']} MiB vs packed "
              f"{r['packed_up_mb']} MiB ({r['packed_up_mb'] / max(r['bytes_up_mb'], 1e-9):.1f}x, target >= 10x)")
    if 100 in sizes and 100000 in sizes:
        print(f"server peak RSS 100000 vs 100 clients: {rss[100000]:.0f} vs {rss[100]:.0f} MB "
              f"({rss[100000] / rss[100]:.2f}x, target <= 1.2x); accuracy {t.loc[100000, 'accuracy']} vs "
              f"{t.loc[100, 'accuracy']}")
    if 100 in sizes and 10000 in sizes:
        print(f"server peak RSS 10000 vs 100 clients: {rss[10000]:.0f} MB vs {rss[100]:.0f} MB "
              f"({100 * (rss[10000] / rss[100] - 1):+.1f}%, target within 20%)")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
