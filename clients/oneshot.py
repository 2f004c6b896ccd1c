"""Client part of the one-shot baselines (one-shot FedAvg, ensemble, best local model): train once, upload once.

Every client builds the common initial model from the scenario seed (nothing needs to be downloaded), trains it
for `client.epochs` epochs on its partition and uploads the whole model (parameters and BatchNorm buffers).
Replies are keyed by partition id, so a node serving several clients concatenates them (`reduce`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord, RecordDict

from clients.sgd import scenario_model, to_arrayrecord
from fedsim.engine.client import ClientEnv, concatenate_replies, train_split
from fedsim.training import state_to_arrays, train_epochs

MODEL_PREFIX = "model."  # ArrayRecord per client: "model.<pid>"
META_PREFIX = "meta."  # MetricRecord per client: num-examples, train_loss
WEIGHT_KEY = "num-examples"


class LocalModelClient:
    """Trains the common initial model on its own data only and returns it."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        data = env.train_data()
        full = train_split(env.config)
        model = scenario_model(env.config, full.num_classes, full.input_shape)
        c = env.config.client
        loss = float("nan")
        if len(data) > 0:
            stats = train_epochs(model, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                                 momentum=c.momentum, weight_decay=c.weight_decay, optimizer=c.optimizer,
                                 seed=env.seed, device=env.device)
            loss = float(stats.get("loss", float("nan")))
        model.cpu()
        pid = env.partition_id
        return RecordDict({
            f"{MODEL_PREFIX}{pid}": to_arrayrecord(state_to_arrays(model)),
            f"{META_PREFIX}{pid}": MetricRecord({WEIGHT_KEY: int(len(data)),
                                                 "train_loss": loss if np.isfinite(loss) else 0.0}),
        })

    reduce = staticmethod(concatenate_replies)  # one node, several clients: records side by side
