"""What fedsim + Flower + Ray add to gradient FL: FedAvg through fedsim against the same training in a bare loop.

Both sides run the same thing: full Fashion-MNIST, Dirichlet(alpha) over N clients (the scenario's partition),
the scenario's CNN from the same initial weights, `client.epochs` local epochs of SGD per round with the same
batch size, learning rate, momentum and per-client seeds (`fedsim.engine.node.ClientEnv.seed`), example-weighted
averaging, test evaluation of the initial model and after every round. The bare loop is plain PyTorch in one process (`fedsim.nn.training`
loops, no Flower, no Ray, no serialization); fedsim runs in a fresh process through Flower's Ray backend (Ray
start-up included in `fedsim_s`; `fedsim_rounds_s` is the rounds alone).

    python scripts/bench_fedavg.py                       # 20 clients, 5 rounds, alpha 0.1
    python scripts/bench_fedavg.py --clients 20 --rounds 5 --max-train 12000 --backend inline
    python scripts/bench_fedavg.py --clients 20 --rounds 5 --system     # also fedsim with a default [system]

Every client trains in every round on both sides (full participation; there is no per-round sampling here).
`--system` runs fedsim a second time with a `[system]` section of defaults (the simulated clock,
fedsim.engine.clock) and reports `clock_overhead` = its wall time / the run without it - 1 (issue #26: < 5%);
the clock's availability process may leave clients out, so compare the wall times, not the accuracies.

Prints accuracy of both and the wall-time ratio fedsim / bare (goal, issue #14: <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = """
seed = {seed}
rounds = {rounds}
[data]
name = "fashion-mnist"
{max_train}
[partition]
kind = "dirichlet"
num_clients = {clients}
alpha = {alpha}
[model]
name = "cnn"
width = {width}
[client]
epochs = {epochs}
batch_size = 32
lr = 0.01
momentum = 0.9
[simulation]
backend = "{backend}"
num_cpus = 1
[strategy]
name = "fedavg"
"""


def scenario_text(args: argparse.Namespace) -> str:
    return SCENARIO.format(seed=args.seed, rounds=args.rounds, clients=args.clients, alpha=args.alpha,
                           width=args.width, epochs=args.epochs, backend=args.backend,
                           max_train=f"max_train = {args.max_train}" if args.max_train else "")


def bare_loop(config) -> dict:  # noqa: ANN001
    """FedAvg in plain PyTorch: the same model, partition, seeds, epochs, averaging and evaluation."""
    import torch

    from fedsim.averaging import weighted_average
    from fedsim.engine.node import ClientEnv
    from fedsim.scenario import ScenarioView, partition_for, test_split, train_split
    from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays, train_epochs

    torch.set_num_threads(1)
    train, test = train_split(config), test_split(config)
    parts = partition_for(config)
    view = ScenarioView(config)
    model = view.initial_model()
    c = config.client
    t0 = time.perf_counter()
    bs = config.evaluation.batch_size
    evaluate(model, test.x, test.y, batch_size=bs)  # fedsim logs the initial model too (metrics row 0)
    accuracies = []
    for r in range(1, config.rounds + 1):
        global_state = state_to_arrays(model)
        states, weights = [], []
        for pid, idx in enumerate(parts):
            env = ClientEnv(config, pid, r, idx)
            local = view.initial_model()
            arrays_to_state(local, global_state)
            data = train.subset(idx)
            train_epochs(local, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                         momentum=c.momentum, weight_decay=c.weight_decay, optimizer=c.optimizer, seed=env.seed)
            states.append(state_to_arrays(local))
            weights.append(len(idx))
        arrays_to_state(model, weighted_average(states, weights))
        accuracies.append(evaluate(model, test.x, test.y, batch_size=bs)["accuracy"])
    return {"bare_s": time.perf_counter() - t0, "accuracy": accuracies[-1], "accuracies": accuracies}


def run_fedsim(path: Path, out: Path) -> tuple[dict, float]:
    """fedsim on the scenario at ``path`` in a fresh process: its RESULT line and the process's wall time."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit("fedsim run failed")
    return json.loads(lines[-1][7:]), time.time() - t0


def child(path: str, out: str) -> None:
    from fedsim.config import load_scenario
    from fedsim.engine.runner import run_scenario
    from fedsim.results.rundir import load_run

    summary = run_scenario(load_scenario(path), out, show_progress=False)
    metrics = load_run(out)["metrics"]
    print("RESULT " + json.dumps({"summary": summary, "accuracies": list(metrics["accuracy"])[1:],
                                  "rounds_s": float(metrics["elapsed_seconds"].iloc[-1])}, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--backend", default="ray", choices=["ray", "inline"])
    parser.add_argument("--system", action="store_true", help="also run fedsim with a default [system] section")
    parser.add_argument("--out", default="runs/bench-fedavg")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from fedsim.config import load_scenario

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.toml"
    path.write_text(scenario_text(args))
    config = load_scenario(path)
    print(f"bare PyTorch loop: {args.clients} clients, {args.rounds} rounds ...", file=sys.stderr, flush=True)
    bare = bare_loop(config)
    print(f"fedsim ({args.backend}) ...", file=sys.stderr, flush=True)
    fed, process_s = run_fedsim(path, out / "fedsim")
    wall = fed["summary"]["wall_seconds"]
    row = {"clients": args.clients, "rounds": args.rounds, "backend": args.backend,
           "bare_s": round(bare["bare_s"], 2), "fedsim_s": round(wall, 2), "fedsim_rounds_s": round(fed["rounds_s"], 2),
           "fedsim_process_s": round(process_s, 2), "ratio": round(wall / bare["bare_s"], 3),
           "rounds_ratio": round(fed["rounds_s"] / bare["bare_s"], 3),
           "bare_accuracy": round(bare["accuracy"], 4), "fedsim_accuracy": round(fed["summary"]["final_accuracy"], 4),
           "max_accuracy_gap": round(max(abs(a - b) for a, b in zip(bare["accuracies"], fed["accuracies"])), 4)}
    if args.system:
        print("fedsim with a default [system] section ...", file=sys.stderr, flush=True)
        sys_path = out / "scenario-system.toml"
        sys_path.write_text(scenario_text(args) + "[system]\n")
        clocked, _ = run_fedsim(sys_path, out / "fedsim-system")
        row["system_fedsim_s"] = round(clocked["summary"]["wall_seconds"], 2)
        row["clock_overhead"] = round(clocked["summary"]["wall_seconds"] / wall - 1, 4)
    print(json.dumps(row))
    print(f"\nwall-time ratio fedsim / bare loop: {row['ratio']} (rounds only: {row['rounds_ratio']}; goal <= 1.2)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
