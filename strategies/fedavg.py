"""FedAvg and FedProx (and centralized training): Flower's own strategies, run on fedsim's accounting grid.

FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629): w_{t+1} = sum_k (n_k / n) w_k^{t+1}, where each selected
client starts from w_t and runs ``client.epochs`` epochs of SGD on its partition.
FedProx (Li et al., MLSys 2020, arXiv 1812.06127) adds (mu / 2) ||w - w_t||^2 to each client's local loss; Flower's
FedProx sends mu to the clients in its train config.
Centralized training is FedAvg with a single client holding the whole training set (the registry's
``single_client``): the same model, optimizer, epochs and evaluation; only the data distribution differs.
Aggregation is ``flwr.serverapp.strategy.FedAvg`` / ``FedProx``; the server evaluates the global model on the test
set after every ``evaluation.every`` rounds. Messages: ``fedsim.protocol.sgd``.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from fedsim.codec import from_record, to_record
from fedsim.engine import ServerContext
from fedsim.protocol import sgd as protocol
from fedsim.training import arrays_to_state, evaluate, state_to_arrays


def _train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean training loss of the replies (Flower's default would also average the engine's keys)."""
    weights = [protocol.reply_weight(r) for r in records]
    total = sum(n for n, _ in weights) or 1.0
    return MetricRecord({protocol.LOSS_KEY: sum(n * loss for n, loss in weights) / total})


class FedAvgServer:
    """Runs Flower's FedAvg for ``rounds`` rounds; evaluation and logging through the fedsim context."""

    flower_strategy = FedAvg

    def __init__(self, params: protocol.FedAvgParams) -> None:
        self.params = params

    def strategy_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the Flower strategy (FedProx: its mu)."""
        return {}

    def _strategy(self, ctx: ServerContext) -> FedAvg:
        return self.flower_strategy(
            fraction_train=self.params.fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
            min_evaluate_nodes=0, min_available_nodes=ctx.config.num_nodes, arrayrecord_key=protocol.ARRAYS_KEY,
            configrecord_key=protocol.CONFIG_KEY, weighted_by_key=protocol.WEIGHT_KEY,
            train_metrics_aggr_fn=_train_metrics, **self.strategy_options(),
        )

    def run(self, ctx: ServerContext) -> None:
        test = ctx.test_data()
        model = ctx.initial_model()
        every, rounds = ctx.config.evaluation.every, ctx.config.rounds
        bs = ctx.config.evaluation.batch_size

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round % every and server_round != rounds:
                ctx.log(server_round)
                return None
            arrays_to_state(model, from_record(arrays))
            res = evaluate(model, test.x, test.y, batch_size=bs, device=ctx.device)
            ctx.log(server_round, accuracy=res["accuracy"], loss=res["loss"],
                    **ctx.client_accuracy(res["class_accuracy"]))
            return MetricRecord({"accuracy": float(res["accuracy"]), "loss": float(res["loss"])})

        result = self._strategy(ctx).start(
            grid=ctx.grid, initial_arrays=to_record(state_to_arrays(model)), num_rounds=rounds,
            timeout=ctx.config.simulation.timeout, train_config=ConfigRecord(), evaluate_fn=evaluate_fn,
        )
        arrays_to_state(model, from_record(result.arrays))
        ctx.save_model(model.cpu())
        ctx.summary(num_parameters=int(sum(p.numel() for p in model.parameters())))


class FedProxServer(FedAvgServer):
    """FedAvg's server with Flower's FedProx, which sends ``proximal_mu`` to the clients."""

    flower_strategy = FedProx

    def strategy_options(self) -> dict[str, Any]:
        return {"proximal_mu": float(self.params.proximal_mu)}
