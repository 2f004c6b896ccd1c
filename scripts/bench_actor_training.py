"""Does local training cost more CPU inside a Ray actor? The same client trainings timed in this process, in one
Ray actor of fedsim's private Ray, and in two actors at once (issue #26, docs/performance.md).

Each side trains clients 1..N-1 of a 1,000-client Dirichlet(0.3) Fashion-MNIST partition from the scenario's
initial model with fedsim's own functions (``ScenarioView.initial_model``, ``arrays_to_state``,
``train_epochs``), one torch thread, after one warm-up client; the figure is the CPU time of the training thread.

    python scripts/bench_actor_training.py --clients 150
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = """
seed = 0
[data]
name = "fashion-mnist"
[partition]
kind = "dirichlet"
num_clients = 1000
alpha = 0.3
[model]
name = "cnn"
width = 16
[client]
epochs = 1
batch_size = 32
lr = 0.01
momentum = 0.9
[strategy]
name = "fedavg"
"""


def train_clients(scenario: str, clients: int) -> float:
    """CPU seconds of this thread for training clients 1..clients-1 (client 0 warms up)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from fedsim.config import config_from_dict
    from fedsim.engine.node import ClientEnv
    from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs
    from fedsim.scenario import ScenarioView, partition_for, train_split

    import tomllib

    torch.set_num_threads(1)
    cfg = config_from_dict(tomllib.loads(scenario))
    train, parts, view = train_split(cfg), partition_for(cfg), ScenarioView(cfg)
    start, c = state_to_arrays(view.initial_model()), cfg.client

    def one(pid: int) -> None:
        local = view.initial_model()
        arrays_to_state(local, start)
        data = train.subset(parts[pid])
        train_epochs(local, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                     weight_decay=c.weight_decay, optimizer=c.optimizer, seed=ClientEnv(cfg, pid, 1, parts[pid]).seed)

    one(0)
    t0 = time.thread_time()
    for pid in range(1, clients):
        one(pid)
    return round(time.thread_time() - t0, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=150)
    args = parser.parse_args()
    from fedsim.config import config_from_dict
    from fedsim.engine.ray_session import ensure_ray, ray_session

    import tomllib

    out = {"clients": args.clients - 1, "plain_cpu_s": [train_clients(SCENARIO, args.clients) for _ in range(2)]}
    with ray_session():
        ensure_ray(config_from_dict(tomllib.loads(SCENARIO)))
        import ray

        trainer = ray.remote(num_cpus=1)(_Trainer)
        one = trainer.remote()
        out["one_actor_cpu_s"] = [ray.get(one.run.remote(SCENARIO, args.clients)) for _ in range(2)]
        ray.kill(one)
        pair = [trainer.remote(), trainer.remote()]
        ray.get([a.run.remote(SCENARIO, 2) for a in pair])  # both started and warm
        out["two_actors_at_once_cpu_s"] = ray.get([a.run.remote(SCENARIO, args.clients) for a in pair])
    print(json.dumps(out))


class _Trainer:
    def run(self, scenario: str, clients: int) -> float:
        return train_clients(scenario, clients)


if __name__ == "__main__":
    main()
