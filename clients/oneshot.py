"""Client part of the one-shot baselines (one-shot FedAvg, ensemble, best local model) and of the distillation
baselines (FedDF, DENSE, Co-Boosting): train once, upload once.

Every client builds the common initial model from the scenario seed (nothing needs to be downloaded), trains it
with the local training the request carries (``client.epochs`` epochs, batch size, lr, ... as the server sent them:
``fedsim.frameworks.oneshot_protocol.training_of``) on its partition and uploads the whole model (parameters and
BatchNorm buffers). In round 2 of `ensemble-recalibrated` it receives the M local models (one fused stage of M
columns), runs its data through them once and uploads the class statistics of their summed embeddings (the
one-shot family's recalibration form, FuseFL's too). Replies are keyed by partition id, so a node serving several
clients concatenates them (`reduce`). Messages: `fedsim.frameworks.oneshot_protocol` and
`fedsim.algorithms.oneshot.protocol`.
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedsim.algorithms.oneshot import protocol
from fedsim.engine import ClientEnv
from fedsim.engine.node import concatenate_replies
from fedsim.frameworks import oneshot_protocol
from fedsim.frameworks.oneshot import build_fused, class_statistics_of, stage_modules
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
            stats = class_statistics_of(fused, net.head, data.x, data.y, env.num_classes, device=env.device)
            return oneshot_protocol.class_statistics_reply(env.partition_id, stats, len(data))
        training = oneshot_protocol.training_of(content)
        model = env.initial_model()
        loss = float("nan")
        if len(data) > 0:
            stats = train_epochs(model, data.x, data.y, **training.train_kwargs(), seed=env.seed, device=env.device)
            loss = float(stats.get("loss", float("nan")))
        return oneshot_protocol.reply(env.partition_id, state_to_arrays(model.cpu()), len(data), loss)

    reduce = staticmethod(concatenate_replies)  # one node, several clients: records side by side
