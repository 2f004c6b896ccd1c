"""Client part of the one-shot baselines (one-shot FedAvg, ensemble, best local model): train once, upload once.

Every client builds the common initial model from the scenario seed (nothing needs to be downloaded), trains it
for `client.epochs` epochs on its partition and uploads the whole model (parameters and BatchNorm buffers).
In round 2 of `ensemble-recalibrated` it receives the M local models (one fused stage of M columns), runs its data
through them once and uploads the class statistics of their summed embeddings (FuseFL's recalibration form).
Replies are keyed by partition id, so a node serving several clients concatenates them (`reduce`).
Messages: `fedsim.algorithms.oneshot.protocol`.
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedsim.engine import ClientEnv
from fedsim.engine.node import concatenate_replies
from fedsim.algorithms.fusefl.learner import build_fused, class_moments_of, stage_modules
from fedsim.algorithms.fusefl import protocol as fusefl_protocol
from fedsim.algorithms.oneshot import protocol
from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs


class LocalModelClient:
    """Trains the common initial model on its own data only and returns it."""

    def __init__(self, params) -> None:  # noqa: ANN001 - any of the one-shot params
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        data = env.train_data()
        members = protocol.members_of(content)
        if members is not None:  # ensemble-recalibrated, round 2: class statistics of the summed embeddings
            arrays, m = members
            net = env.initial_model()
            fused = build_fused(stage_modules(net, 1), [m], "avg", env.input_shape)
            arrays_to_state(fused, arrays)
            moments = class_moments_of(fused, net.head, data.x, data.y, env.num_classes, device=env.device)
            return fusefl_protocol.class_statistics_reply(env.partition_id, moments.to_arrays(), len(data))
        model = env.initial_model()
        c = env.config.client
        loss = float("nan")
        if len(data) > 0:
            stats = train_epochs(model, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                                 momentum=c.momentum, weight_decay=c.weight_decay, optimizer=c.optimizer,
                                 seed=env.seed, device=env.device)
            loss = float(stats.get("loss", float("nan")))
        return protocol.reply(env.partition_id, state_to_arrays(model.cpu()), len(data), loss)

    reduce = staticmethod(concatenate_replies)  # one node, several clients: records side by side
