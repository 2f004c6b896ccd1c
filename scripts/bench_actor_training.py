"""Does local training cost more CPU inside a Ray actor? The same client trainings timed in this process, in one
Ray actor of fedsim's private Ray, and in two actors at once (issue #26, docs/performance.md).

Each side trains clients 1..N-1 of the FedAvg benchmark's scenario (``scripts/bench_fedavg.py``: full
Fashion-MNIST, 1,000 Dirichlet(0.3) clients, cnn width 16, 1 epoch) from the initial model with that benchmark's
bare-loop step (``bench_fedavg.train_client``), one torch thread, after one warm-up client; the figure is the CPU
time of the training thread.

    python scripts/bench_actor_training.py --clients 150 --repeats 4   # plain and one actor interleaved
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def _scenario():  # noqa: ANN202
    """The FedAvg benchmark's scenario at 1,000 clients (imports ``bench_fedavg`` from this folder, also in an
    actor, which runs this function pickled by value)."""
    import tomllib

    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import bench_fedavg

    from fedsim.config import config_from_dict

    args = argparse.Namespace(seed=0, rounds=1, clients=1000, alpha=0.3, width=16, epochs=1, backend="inline",
                              client_cpus=1.0, max_train=None, per_round=None, clients_per_node=1)
    return bench_fedavg, config_from_dict(tomllib.loads(bench_fedavg.scenario_text(args)))


def train_clients(clients: int) -> float:
    """CPU seconds of this thread for training clients 1..clients-1 (client 0 warms up)."""
    import torch

    from fedsim.nn.training import state_to_arrays
    from fedsim.scenario import ScenarioView, partition_for, train_split

    bench, cfg = _scenario()
    torch.set_num_threads(1)
    train, parts, view = train_split(cfg), partition_for(cfg), ScenarioView(cfg)
    start = state_to_arrays(view.initial_model())
    bench.train_client(cfg, view, train, parts[0], 0, 1, start)
    t0 = time.thread_time()
    for pid in range(1, clients):
        bench.train_client(cfg, view, train, parts[pid], pid, 1, start)
    return round(time.thread_time() - t0, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2, help="plain / one-actor pairs, interleaved")
    args = parser.parse_args()
    from fedsim.engine.ray_session import ensure_ray, ray_session

    out: dict = {"clients": args.clients - 1, "plain_cpu_s": [], "one_actor_cpu_s": []}
    with ray_session():
        ensure_ray(_scenario()[1])
        import ray

        trainer = ray.remote(num_cpus=1)(_Trainer)
        one = trainer.remote()
        ray.get(one.run.remote(2))  # started and warm
        for _ in range(args.repeats):  # interleaved, so that a drift of the host's speed hits both sides alike
            out["plain_cpu_s"].append(train_clients(args.clients))
            out["one_actor_cpu_s"].append(ray.get(one.run.remote(args.clients)))
        ray.kill(one)
        pair = [trainer.remote(), trainer.remote()]
        ray.get([a.run.remote(2) for a in pair])  # both started and warm
        out["two_actors_at_once_cpu_s"] = ray.get([a.run.remote(args.clients) for a in pair])
    out["one_actor_over_plain"] = round(sum(out["one_actor_cpu_s"]) / sum(out["plain_cpu_s"]), 3)
    print(json.dumps(out))


class _Trainer:
    def run(self, clients: int) -> float:
        return train_clients(clients)


if __name__ == "__main__":
    main()
