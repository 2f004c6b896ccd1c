"""What fedsim + Flower + Ray add to gradient FL: FedAvg through fedsim against the same training in a bare loop.

Both sides run the same thing: full Fashion-MNIST, Dirichlet(alpha) over N clients (the scenario's partition),
the scenario's CNN from the same initial weights, `client.epochs` local epochs of SGD per round with the same
batch size, learning rate, momentum and per-client seeds (`fedsim.engine.node.ClientEnv.seed`), example-weighted
averaging, test evaluation of the initial model and after every round. The bare loop is plain PyTorch in one
process (`fedsim.nn.training` loops, no Flower, no Ray, no serialization); fedsim runs in a fresh process through
Flower's Ray backend (Ray start-up included in `fedsim_s`; `fedsim_rounds_s` is the rounds alone).

    python scripts/bench_fedavg.py                       # 20 clients, 5 rounds, alpha 0.1
    python scripts/bench_fedavg.py --clients 20 --rounds 5 --max-train 12000 --backend inline
    python scripts/bench_fedavg.py --clients 20 --rounds 5 --system     # also fedsim with a default [system]
    python scripts/bench_fedavg.py --clients 1000 --per-round 100 --alpha 0.3 --rounds 20   # issue #26

Without `--per-round` every client trains in every round on both sides. `--per-round K` sets the strategy's
`fraction_train` so that Flower's FedAvg samples K nodes per round (`int(N * fraction_train)` = K); the bare loop
trains exactly the clients Flower samples: Flower's `sample_nodes` calls `random.sample(grid.get_node_ids(), K)` on
the global `random` module, which `fedsim.engine.server.ServerContext` seeds with the scenario seed, over the node
ids sorted by partition id (`AccountingGrid.get_node_ids`); `random.sample` picks positions whatever the values,
so `random.Random(seed).sample(range(N), K)`, round after round, is the same draw over partition ids. The bench
checks it: the clients fedsim sent each round (its clients.csv) must equal the bare loop's, or it exits non-zero.

Both sides run as fresh processes, so the figures compare like with like:
- `bare_cpu_s`: the bare process's CPU time (user + system, imports and data loading included), `bare_loop_s` /
  `bare_loop_cpu_s` its rounds alone;
- `fedsim_cpu_s`: the CPU time of fedsim's whole process tree (the driver, Ray's GCS and raylet, the Ray worker
  actors), sampled from /proc every 0.2 s per process (the last sample of each process; a process that ends loses
  at most 0.2 s), cross-checked by `getrusage(RUSAGE_CHILDREN)` (`fedsim_rusage_cpu_s`: counts only the processes
  that were reaped by their parents);
- `bare_eval_cpu_s` / `fedsim_driver_eval_cpu_s`: the CPU of the test evaluations on each side (the same work),
  `bare_train_cpu_s` the bare loop's client trainings (thread CPU inside the functions), to tell what is left;
- `cpu_ratio` = fedsim_cpu_s / bare_cpu_s (issue #26: <= 1.2), `ratio` = wall / bare loop wall (issue #14);
- `eval_cpu_drift` = fedsim_driver_eval_cpu_s / bare_eval_cpu_s: the same evaluations, so 1.0 where the host ran
  both phases at one speed (this 2-core host drifted by up to 20% between them), and `cpu_ratio_drift_corrected`
  = cpu_ratio / eval_cpu_drift, which assumes the drift slowed all work alike (a cross-check, not the target);
  the evaluations run in different processes on the two sides (after 100 trainings in the bare process, alone in
  fedsim's driver), so the process, not only the host, can make them differ;
- `calibration_cpu_s`: three calibrations of the host's speed, each the same fixed work (40 of the bare loop's
  client trainings and one evaluation) in a fresh process of its own, before the bare loop, between the two
  sides and after fedsim; `host_drift` = (between + after) / (before + between) and `cpu_ratio_calibrated` =
  cpu_ratio / host_drift (`--no-calibration` skips them: about 30 s of wall time);
- `server_peak_rss_mb`: the driver's peak resident memory (VmHWM; Ray's processes excluded).
`--system` runs fedsim a second time with a `[system]` section of defaults (the simulated clock,
fedsim.engine.clock) and reports `clock_overhead` = its wall time / the run without it - 1 (issue #26: < 5%);
the clock's availability process may leave clients out, so compare the wall times, not the accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
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
num_cpus = {client_cpus}
clients_per_node = {clients_per_node}
[strategy]
name = "fedavg"
{fraction}
"""


def scenario_text(args: argparse.Namespace) -> str:
    return SCENARIO.format(seed=args.seed, rounds=args.rounds, clients=args.clients, alpha=args.alpha,
                           width=args.width, epochs=args.epochs, backend=args.backend,
                           client_cpus=args.client_cpus, clients_per_node=args.clients_per_node,
                           max_train=f"max_train = {args.max_train}" if args.max_train else "",
                           fraction=f"fraction_train = {fraction_for(args.clients, args.per_round)!r}"
                           if args.per_round else "")


def fraction_for(clients: int, per_round: int | None) -> float:
    """``fraction_train`` for which Flower's FedAvg samples ``per_round`` of ``clients`` nodes:
    ``int(clients * fraction)`` must be ``per_round`` (half a client of margin against float rounding)."""
    if not per_round or per_round >= clients:
        return 1.0
    fraction = (per_round + 0.5) / clients
    assert int(clients * fraction) == per_round, (clients, per_round, fraction)
    return fraction


def sampled_clients(config, per_round: int | None) -> list[list[int]]:  # noqa: ANN001
    """The clients Flower's FedAvg trains in each round: ``random.sample`` over the node ids sorted by partition
    id, from the global ``random`` seeded with the scenario seed (see the module docstring)."""
    n = config.num_clients
    if not per_round or per_round >= n:
        return [list(range(n)) for _ in range(config.rounds)]
    rng = random.Random(config.seed)
    return [sorted(rng.sample(range(n), per_round)) for _ in range(config.rounds)]


def train_client(config, view, train, indices, pid: int, round_: int, global_state):  # noqa: ANN001, ANN201
    """One client's local training as the bare loop does it (the work of fedsim's SGD client): a fresh initial
    model loaded with ``global_state``, ``client.epochs`` of SGD on the client's rows with its per-round seed."""
    from fedsim.engine.node import ClientEnv
    from fedsim.nn.training import arrays_to_state, train_epochs

    c = config.client
    local = view.initial_model()
    arrays_to_state(local, global_state)
    data = train.subset(indices)
    train_epochs(local, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                 weight_decay=c.weight_decay, optimizer=c.optimizer,
                 seed=ClientEnv(config, pid, round_, indices).seed)
    return local


def bare_loop(config, per_round: int | None = None) -> dict:  # noqa: ANN001
    """FedAvg in plain PyTorch: the same model, partition, sampled clients, seeds, epochs, averaging and
    evaluation."""
    import torch

    from fedsim.averaging import weighted_average
    from fedsim.scenario import ScenarioView, partition_for, test_split, train_split
    from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays

    evaluate = counted("evaluate", evaluate)
    train_one = counted("train", train_client)
    torch.set_num_threads(1)
    train, test = train_split(config), test_split(config)
    parts = partition_for(config)
    view = ScenarioView(config)
    model = view.initial_model()
    chosen = sampled_clients(config, per_round)
    t0, c0 = time.perf_counter(), time.process_time()
    bs = config.evaluation.batch_size
    evaluate(model, test.x, test.y, batch_size=bs)  # fedsim logs the initial model too (metrics row 0)
    accuracies = []
    for r in range(1, config.rounds + 1):
        global_state = state_to_arrays(model)
        states, weights = [], []
        for pid in chosen[r - 1]:
            states.append(state_to_arrays(train_one(config, view, train, parts[pid], pid, r, global_state)))
            weights.append(len(parts[pid]))
        arrays_to_state(model, weighted_average(states, weights))
        accuracies.append(evaluate(model, test.x, test.y, batch_size=bs)["accuracy"])
    return {"bare_s": time.perf_counter() - t0, "bare_loop_cpu_s": time.process_time() - c0,
            "accuracy": accuracies[-1], "accuracies": accuracies, "sampled": chosen}



_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, start time, user + system CPU seconds) of every process readable in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (field 3); ppid 4, utime 14, stime 15, starttime 22
        out[int(name)] = (int(fields[1]), fields[19], (int(fields[11]) + int(fields[12])) / _TICK)
    return out


class TreeCPU:
    """Samples the CPU time of a process and all its descendants (Ray's processes included) every ``every`` s;
    ``total`` sums the last sample of each process seen (keyed by pid and start time)."""

    def __init__(self, root: int, every: float = 0.2) -> None:
        self.root, self.every = root, every
        self.seen: dict[tuple[int, str], float] = {}
        self.names: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        table = _proc_table()
        tree, frontier = set(), {self.root}
        while frontier:  # the descendants of root, by parent pid
            tree |= frontier
            frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier and pid not in tree}
        for pid in tree:
            if pid in table:
                key = (pid, table[pid][1])
                self.seen[key] = max(self.seen.get(key, 0.0), table[pid][2])
                if pid == self.root:
                    self.names[key] = "driver"
                else:  # read at every sample: a child is "python" between fork and exec (the raylet)
                    try:
                        with open(f"/proc/{pid}/comm") as f:
                            self.names[key] = f.read().strip()
                    except OSError:
                        self.names.setdefault(key, "?")

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total(self) -> float:
        return sum(self.seen.values())

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, cpu in self.seen.items():
            out[self.names.get(key, "?")] = round(out.get(self.names.get(key, "?"), 0.0) + cpu, 2)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_child(argv: list[str], what: str) -> tuple[dict, dict]:
    """``argv`` (this script in a child mode) in a fresh process: its RESULT line, and what it cost (wall, CPU of
    the process tree sampled and by rusage)."""
    t0, c0 = time.time(), _children_cpu()
    proc = subprocess.Popen([sys.executable, __file__, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    tree = TreeCPU(proc.pid)
    stdout, stderr = proc.communicate()
    tree.stop()
    cost = {"process_s": time.time() - t0, "rusage_cpu_s": _children_cpu() - c0, "tree_cpu_s": tree.total,
            "tree_by_name": tree.by_name()}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout[-3000:] + stderr[-3000:])
        raise SystemExit(f"{what} failed")
    return json.loads(lines[-1][7:]), cost


def run_fedsim(path: Path, out: Path, profile: str | None = None) -> tuple[dict, dict]:
    """fedsim on the scenario at ``path`` in a fresh process: its RESULT line and its cost; ``profile``: a file
    for a sampling profile of the driver (``StackSampler``)."""
    if profile:
        os.environ["BENCH_FEDAVG_PROFILE"] = str(Path(profile).resolve())
    try:
        return run_child(["--child", str(path), str(out)], "fedsim run")
    finally:
        os.environ.pop("BENCH_FEDAVG_PROFILE", None)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


CPU_OF: dict[str, float] = {}  # name -> CPU s of the calling thread inside the counted function (``counted``)


def counted(name: str, fn):  # noqa: ANN001, ANN201
    """``fn`` adding its calling thread's CPU time to ``CPU_OF[name]``: the evaluation's share of each side's
    CPU (both evaluate the same model on the same 10,000 images), so that what is left can be compared."""

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            CPU_OF[name] = CPU_OF.get(name, 0.0) + time.thread_time() - start

    return wrapper


def bare_child(path: str, per_round: str) -> None:
    from fedsim.config import load_scenario

    result = bare_loop(load_scenario(path), int(per_round) or None)
    result["peak_rss_mb"] = peak_rss_mb()
    result["cpu_of"] = CPU_OF
    print("RESULT " + json.dumps(result))


CALIBRATION_CLIENTS = 40  # client trainings of a calibration, then one evaluation: ~7 CPU-s here


def calibration_child(path: str) -> None:
    """The host's speed now: the thread CPU of a fixed piece of both sides' work (the bare loop's training of
    clients 0..CALIBRATION_CLIENTS-1 from the initial model, then one test evaluation) in a fresh process, the
    same in every calibration, imports and data loading outside the figure."""
    import torch

    from fedsim.config import load_scenario
    from fedsim.nn.training import evaluate, state_to_arrays
    from fedsim.scenario import ScenarioView, partition_for, test_split, train_split

    config = load_scenario(path)
    torch.set_num_threads(1)
    train, test, parts, view = train_split(config), test_split(config), partition_for(config), ScenarioView(config)
    model = view.initial_model()
    start = state_to_arrays(model)
    train_client(config, view, train, parts[0], 0, 1, start)  # warm-up: torch's first optimizer, the allocator
    t0 = time.thread_time()
    for pid in range(CALIBRATION_CLIENTS):
        train_client(config, view, train, parts[pid % len(parts)], pid, 1, start)
    evaluate(model, test.x, test.y, batch_size=config.evaluation.batch_size)
    print("RESULT " + json.dumps({"cpu_s": time.thread_time() - t0}))


def calibrate(path: Path) -> float:
    """CPU seconds of one ``calibration_child`` (a fresh process)."""
    return run_child(["--calibration-child", str(path)], "calibration")[0]["cpu_s"]


def _calibrated(cpu_ratio: float, calibrations: list[float]) -> dict:
    """The calibrations (before the bare loop, between the sides, after fedsim), ``host_drift`` = the host's
    speed around fedsim's phase over that around the bare loop's ((between + after) / (before + between): > 1
    where the same work cost more CPU during fedsim's phase) and ``cpu_ratio_calibrated`` = cpu_ratio / drift."""
    if len(calibrations) != 3:
        return {}
    before, between, after = calibrations
    drift = (between + after) / (before + between)
    return {"calibration_cpu_s": [round(c, 3) for c in calibrations], "host_drift": round(drift, 3),
            "cpu_ratio_calibrated": round(cpu_ratio / drift, 3)}


def fedsim_sampled(out: Path, rounds: int) -> list[list[int]]:
    """The clients fedsim sent a train message to in each round (its clients.csv)."""
    import pandas as pd

    table = pd.read_csv(out / "clients.csv")
    table = table[table["selected"].astype(bool)]
    return [sorted(int(c) for c in table.loc[table["round"] == r, "client"]) for r in range(1, rounds + 1)]


class StackSampler:
    """A sampling profiler of every thread of this process (cProfile sees one thread; Flower's simulation runs
    the server part, its poller and its workers in others): every ``every`` s, each thread's stack is read
    (``sys._current_frames``); ``stop`` reports per thread its CPU seconds (/proc/self/task) and samples, and the
    functions on top of the stack (self) and anywhere on it (inclusive) by sample count, threads blocked in a
    wait (``wait``, ``sleep``, ``get``, ``select``, ...) counted apart."""

    IDLE = {"wait", "sleep", "get", "select", "poll", "_wait_for_tstate_lock", "join", "acquire", "recv",
            "recv_into", "accept", "epoll", "_worker", "result"}

    def __init__(self, every: float = 0.005) -> None:
        import collections

        self.every = every
        self.self_counts: collections.Counter = collections.Counter()
        self.incl_counts: collections.Counter = collections.Counter()
        self.thread_samples: collections.Counter = collections.Counter()
        self.tasks: dict[str, tuple[str, float]] = {}  # thread id -> (OS name, CPU s at its last sample)
        self._stop = threading.Event()
        self._me = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stack-sampler")
        self._thread.start()

    def _loop(self) -> None:
        self._me = threading.get_ident()
        ticks = 0
        while not self._stop.wait(self.every):
            ticks += 1
            if ticks % 200 == 0:
                self._sample_tasks()
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == self._me:
                    continue
                top = frame.f_code.co_name
                thread = names.get(ident, str(ident)).split("_")[0]
                if top in self.IDLE:
                    self.thread_samples[(thread, "idle")] += 1
                    continue
                self.thread_samples[(thread, "busy")] += 1
                seen = set()
                self.self_counts[_where(frame)] += 1
                while frame is not None:
                    key = _where(frame)
                    if key not in seen:
                        seen.add(key)
                        self.incl_counts[key] += 1
                    frame = frame.f_back

    def _sample_tasks(self) -> None:
        python_names = {str(t.native_id): t.name for t in threading.enumerate()}  # Python threads by their tid
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name, fields = stat.split("(", 1)[1].rsplit(")", 1)[0], stat.rsplit(")", 1)[1].split()
            name = python_names.get(task, name) if task not in self.tasks else self.tasks[task][0]
            self.tasks[task] = (name, (int(fields[11]) + int(fields[12])) / _TICK)

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        lines = ["threads (samples busy / idle; CPU s from /proc/self/task):"]
        cpu = {}
        for t in threading.enumerate():
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu[t.name] = (int(fields[11]) + int(fields[12])) / _TICK
            except (OSError, TypeError):
                pass
        threads = sorted({t for t, _ in self.thread_samples})
        for t in threads:
            lines.append(f"  {t}: busy {self.thread_samples[(t, 'busy')]}, idle {self.thread_samples[(t, 'idle')]}")
        lines.append("live Python threads' CPU s: " + json.dumps({k: round(v, 2) for k, v in cpu.items()}))
        native: dict[str, float] = {}  # every thread of the process (Ray's C++ threads too), by its OS name
        for name, cpu_s in self.tasks.values():
            native[name] = native.get(name, 0.0) + cpu_s
        lines.append("every thread's CPU s by Python name or else OS name (last sample, 1 s apart): " + json.dumps(
            {k: round(v, 2) for k, v in sorted(native.items(), key=lambda kv: -kv[1])}))
        total = sum(self.self_counts.values()) or 1
        lines.append(f"\nself (top of a busy stack), {total} samples:")
        lines += [f"  {n:7d} {100 * n / total:5.1f}%  {k}" for k, n in self.self_counts.most_common(40)]
        lines.append("\ninclusive:")
        lines += [f"  {n:7d} {100 * n / total:5.1f}%  {k}" for k, n in self.incl_counts.most_common(80)]
        return "\n".join(lines) + "\n"


def _where(frame) -> str:  # noqa: ANN001
    code = frame.f_code
    parts = code.co_filename.split("site-packages/")[-1].split("/work/main/")[-1]
    return f"{parts}:{code.co_firstlineno}:{code.co_name}"


def _skip_client_state_query() -> None:
    """What-if (diagnostic): the round checkpoint (``RoundCheckpoint``, for --resume) stores no client states
    instead of querying every node for them after every round. FedAvg's clients hold none, so the checkpoint's
    content is the same; only the N query messages per round go."""
    import importlib

    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    for name in ("fedsim.engine.checkpoint", "fedsim.results.checkpoint"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.RoundCheckpoint._collect_client_states = lambda self: recorddict_to_proto(
            RecordDict()).SerializeToString()
        return
    raise SystemExit("no RoundCheckpoint to patch")


def child(path: str, out: str) -> None:
    from fedsim.config import load_scenario
    from fedsim.engine.runner import run_scenario
    from fedsim.results.rundir import load_run

    if os.environ.get("BENCH_FEDAVG_NO_STATE_QUERY"):  # --what-if-no-state-query: a diagnostic, not fedsim
        _skip_client_state_query()
    import fedsim.strategies.fedavg as fedavg_server

    fedavg_server.evaluate = counted("evaluate", fedavg_server.evaluate)  # the central evaluation
    profile = os.environ.get("BENCH_FEDAVG_PROFILE")  # --profile: a sampling profile of the driver's threads
    sampler = StackSampler() if profile else None
    summary = run_scenario(load_scenario(path), out, show_progress=False)
    if sampler is not None:
        Path(profile).write_text(sampler.stop())
    metrics = load_run(out)["metrics"]
    print("RESULT " + json.dumps({"summary": summary, "accuracies": list(metrics["accuracy"])[1:],
                                  "rounds_s": float(metrics["elapsed_seconds"].iloc[-1]),
                                  "peak_rss_mb": peak_rss_mb(), "driver_cpu_s": time.process_time(),
                                  "cpu_of": CPU_OF},
                                 default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=None,
                        help="clients sampled per round (Flower's FedAvg fraction_train); default: all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--backend", default="ray", choices=["ray", "inline"])
    parser.add_argument("--client-cpus", type=float, default=1.0,
                        help="simulation.num_cpus: CPUs Ray reserves per client (1.5 on 2 cores: one actor, one "
                             "torch thread, no two trainings at once)")
    parser.add_argument("--clients-per-node", type=int, default=1,
                        help="fedsim's simulation.clients_per_node (>1: one message per node, clients still sampled)")
    parser.add_argument("--system", action="store_true", help="also run fedsim with a default [system] section")
    parser.add_argument("--skip-bare", action="store_true", help="fedsim only (e.g. for its memory at a size)")
    parser.add_argument("--profile", default=None,
                        help="write a sampling profile of fedsim's driver (all its threads) to this text file")
    parser.add_argument("--what-if-no-state-query", action="store_true",
                        help="diagnostic: fedsim's round checkpoint skips querying every node for client states")
    parser.add_argument("--out", default="runs/bench-fedavg")
    parser.add_argument("--no-calibration", action="store_true",
                        help="skip the three calibrations of the host's speed (before, between and after the sides)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--calibration-child", help=argparse.SUPPRESS)
    parser.add_argument("--bare-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.bare_child:
        bare_child(*args.bare_child)
        return
    if args.calibration_child:
        calibration_child(args.calibration_child)
        return
    if args.what_if_no_state_query:
        os.environ["BENCH_FEDAVG_NO_STATE_QUERY"] = "1"
    if args.per_round is not None and not 0 < args.per_round <= args.clients:
        raise SystemExit(f"--per-round {args.per_round}: it must lie in 1..--clients ({args.clients})")
    from fedsim.config import load_scenario

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.toml"
    path.write_text(scenario_text(args))
    config = load_scenario(path)
    load = os.getloadavg()
    row: dict = {"clients": args.clients, "per_round": args.per_round or args.clients, "rounds": args.rounds,
                 "backend": args.backend}
    bare = None
    calibrating = not args.skip_bare and not args.no_calibration
    calibrations = [calibrate(path)] if calibrating else []
    if not args.skip_bare:
        print(f"bare PyTorch loop: {args.clients} clients, {args.per_round or args.clients} per round, "
              f"{args.rounds} rounds ...", file=sys.stderr, flush=True)
        bare, bare_cost = run_child(["--bare-child", str(path), str(args.per_round or 0)], "bare loop")
        row.update({"bare_loop_s": round(bare["bare_s"], 2), "bare_loop_cpu_s": round(bare["bare_loop_cpu_s"], 2),
                    "bare_process_s": round(bare_cost["process_s"], 2),
                    "bare_cpu_s": round(bare_cost["rusage_cpu_s"], 2),
                    "bare_eval_cpu_s": round(bare["cpu_of"].get("evaluate", 0.0), 2),
                    "bare_train_cpu_s": round(bare["cpu_of"].get("train", 0.0), 2)})
    if calibrating:
        calibrations.append(calibrate(path))
    print(f"fedsim ({args.backend}) ...", file=sys.stderr, flush=True)
    fed, cost = run_fedsim(path, out / "fedsim", args.profile)
    if calibrating:
        calibrations.append(calibrate(path))
    wall = fed["summary"]["wall_seconds"]
    row.update({"fedsim_s": round(wall, 2), "fedsim_rounds_s": round(fed["rounds_s"], 2),
                "fedsim_process_s": round(cost["process_s"], 2), "fedsim_cpu_s": round(cost["tree_cpu_s"], 2),
                "fedsim_rusage_cpu_s": round(cost["rusage_cpu_s"], 2),
                "fedsim_driver_cpu_s": round(fed["driver_cpu_s"], 2),
                "fedsim_driver_eval_cpu_s": round(fed["cpu_of"].get("evaluate", 0.0), 2),
                "fedsim_ray_workers_cpu_s": round(sum(v for k, v in cost["tree_by_name"].items()
                                                      if k not in ("driver", "raylet", "gcs_server")), 2),
                "fedsim_cpu_by_process": dict(list(cost["tree_by_name"].items())[:10]),
                "server_peak_rss_mb": round(fed["peak_rss_mb"], 1),
                "fedsim_accuracy": round(fed["summary"]["final_accuracy"], 4)})
    if bare is not None:
        same = fedsim_sampled(out / "fedsim", args.rounds) == bare["sampled"]
        # the evaluations are the same work on both sides: their CPU says how fast the host ran each phase
        drift = fed["cpu_of"].get("evaluate", 0.0) / max(bare["cpu_of"].get("evaluate", 0.0), 1e-9)
        cpu_ratio = cost["tree_cpu_s"] / bare_cost["rusage_cpu_s"]
        row.update({"cpu_ratio": round(cpu_ratio, 3), "eval_cpu_drift": round(drift, 3),
                    "cpu_ratio_drift_corrected": round(cpu_ratio / drift, 3),
                    **_calibrated(cpu_ratio, calibrations),
                    "ratio": round(wall / bare["bare_s"], 3),
                    "rounds_ratio": round(fed["rounds_s"] / bare["bare_s"], 3),
                    "bare_accuracy": round(bare["accuracy"], 4),
                    "max_accuracy_gap": round(max(abs(a - b) for a, b in zip(bare["accuracies"],
                                                                              fed["accuracies"])), 4),
                    "same_clients": same})
    if args.system:
        print("fedsim with a default [system] section ...", file=sys.stderr, flush=True)
        sys_path = out / "scenario-system.toml"
        sys_path.write_text(scenario_text(args) + "[system]\n")
        clocked, clocked_cost = run_fedsim(sys_path, out / "fedsim-system")
        row["system_fedsim_s"] = round(clocked["summary"]["wall_seconds"], 2)
        row["system_fedsim_rounds_s"] = round(clocked["rounds_s"], 2)
        row["system_fedsim_cpu_s"] = round(clocked_cost["tree_cpu_s"], 2)
        row["clock_overhead"] = round(clocked["summary"]["wall_seconds"] / wall - 1, 4)
        row["clock_overhead_rounds"] = round(clocked["rounds_s"] / fed["rounds_s"] - 1, 4)
    row["loadavg"] = [round(v, 2) for v in (*load, *os.getloadavg())]  # 1/5/15 min at the start, then at the end
    print(json.dumps(row))
    if bare is not None:
        print(f"\ncore-seconds fedsim / bare: {row['cpu_ratio']} (goal <= 1.2); wall ratio {row['ratio']} "
              f"(rounds only {row['rounds_ratio']}); same clients each round: {row['same_clients']}")
        if not row["same_clients"]:
            raise SystemExit("the bare loop did not train the clients fedsim's strategy sampled")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
