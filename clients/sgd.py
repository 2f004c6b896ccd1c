"""Client part of the gradient baselines (FedAvg, FedProx, centralized): local SGD epochs on the partition."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.engine.client import ClientEnv, derive_seed
from fedsim.models import build_model
from fedsim.training import arrays_to_state, state_to_arrays, train_epochs

ARRAYS_KEY = "arrays"  # the keys Flower's FedAvg uses
METRICS_KEY = "metrics"
WEIGHT_KEY = "num-examples"


def scenario_model(config, num_classes: int, input_shape: tuple):  # noqa: ANN001, ANN201
    """The scenario's trainable network, initialized identically on the server and every client."""
    m = config.model
    return build_model(m.name, input_shape=tuple(input_shape), num_classes=num_classes, width=m.width,
                       seed=derive_seed(config.seed, "model"))


def to_arrayrecord(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class SGDClient:
    """Receives the global model, trains ``client.epochs`` epochs of SGD on its partition, returns the model."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        data = env.train_data()
        model = scenario_model(env.config, data.num_classes if len(data) else _num_classes(env), data.input_shape)
        global_arrays = from_arrayrecord(content[ARRAYS_KEY])
        arrays_to_state(model, global_arrays)
        c = env.config.client
        mu = float(getattr(self.params, "proximal_mu", 0.0))
        stats = train_epochs(
            model, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
            weight_decay=c.weight_decay, optimizer=c.optimizer, seed=env.seed, device=env.device,
            proximal_mu=mu, global_params=[p.detach().clone() for p in model.parameters()] if mu > 0 else None,
        )
        n = int(len(data))
        loss = float(stats.get("loss", float("nan")))
        return RecordDict({
            ARRAYS_KEY: to_arrayrecord(state_to_arrays(model)),
            METRICS_KEY: MetricRecord({WEIGHT_KEY: n, "train_loss": loss if np.isfinite(loss) else 0.0}),
        })

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """Example-weighted average of a group's models: FedAvg over the group gives the same global result."""
        weights = np.array([float(r[METRICS_KEY][WEIGHT_KEY]) for r in replies])
        total = weights.sum()
        factors = weights / total if total > 0 else np.full(len(replies), 1.0 / len(replies))
        keys = list(replies[0][ARRAYS_KEY].keys())
        out = {}
        for key in keys:  # integer buffers (BatchNorm's num_batches_tracked) are averaged as floats, as Flower does
            stacked = [r[ARRAYS_KEY][key].numpy() for r in replies]
            dtype = stacked[0].dtype if np.issubdtype(stacked[0].dtype, np.floating) else np.float64
            out[key] = sum(f * a.astype(np.float64) for f, a in zip(factors, stacked)).astype(dtype)
        loss = float(sum(f * float(r[METRICS_KEY]["train_loss"]) for f, r in zip(factors, replies)))
        return RecordDict({ARRAYS_KEY: to_arrayrecord(out),
                           METRICS_KEY: MetricRecord({WEIGHT_KEY: int(total), "train_loss": loss})})


def _num_classes(env: ClientEnv) -> int:
    from fedsim.engine.client import train_split

    return train_split(env.config).num_classes
