"""Client part of the gradient baselines (FedAvg, FedProx, centralized): local SGD epochs on the partition.

The client loads the global model it received, trains ``client.epochs`` epochs on its own partition and answers
with the model and its example count. FedProx's proximal weight mu is read from the message (Flower's FedProx
puts it into the train config), never from the scenario, so the client does what the server asked.
Messages: ``fedsim.protocol.sgd``.
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedsim.averaging import average_factors, weighted_average
from fedsim.engine import ClientEnv
from fedsim.protocol import sgd as protocol
from fedsim.training import arrays_to_state, state_to_arrays, train_epochs


class SGDClient:
    """Receives the global model, trains ``client.epochs`` epochs of SGD on its partition, returns the model."""

    def __init__(self, params: protocol.FedAvgParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        global_arrays, mu = protocol.parse_train(content)
        data = env.train_data()
        model = arrays_to_state(env.initial_model(), global_arrays)
        c = env.config.client
        stats = train_epochs(
            model, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
            weight_decay=c.weight_decay, optimizer=c.optimizer, seed=env.seed, device=env.device,
            proximal_mu=mu, global_params=[p.detach().clone() for p in model.parameters()] if mu > 0 else None,
        )
        return protocol.reply(state_to_arrays(model), len(data), float(stats.get("loss", float("nan"))))

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """Example-weighted average of a group's models: FedAvg over the group gives the same global result."""
        parsed = [protocol.parse_reply(r) for r in replies]  # read-only views, no copies
        weights = [float(n) for _, n, _ in parsed]
        factors = average_factors(len(parsed), weights)
        loss = float(sum(f * loss for f, (_, _, loss) in zip(factors, parsed)))
        return protocol.reply(weighted_average([arrays for arrays, _, _ in parsed], weights), int(sum(weights)), loss)
