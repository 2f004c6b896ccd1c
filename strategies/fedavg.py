"""FedAvg and FedProx: Flower's own strategies, run on fedsim's accounting grid.

FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629): w_{t+1} = sum_k (n_k / n) w_k^{t+1}, where each selected
client starts from w_t and runs ``client.epochs`` epochs of SGD on its partition.
FedProx (Li et al., MLSys 2020, arXiv 1812.06127) adds (mu / 2) ||w - w_t||^2 to each client's local loss.
Aggregation is ``flwr.serverapp.strategy.FedAvg`` / ``FedProx``; the server evaluates the global model on the test
set after every ``evaluation.every`` rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from clients.sgd import SGDClient, from_arrayrecord, scenario_model, to_arrayrecord
from fedsim.config import _fraction
from fedsim.engine import ServerContext, StrategySpec, register_strategy
from fedsim.errors import ConfigError
from fedsim.training import arrays_to_state, evaluate, state_to_arrays


@dataclass
class FedAvgParams:
    fraction_train: float = 1.0  # fraction of nodes sampled per round (seeded)

    def validate(self, path: str = "strategy") -> None:
        _fraction(f"{path}.fraction_train", self.fraction_train)
        if self.fraction_train == 0:
            raise ConfigError(f"{path}.fraction_train: 0.0 trains nobody; it must lie in (0, 1]")


@dataclass
class FedProxParams(FedAvgParams):
    proximal_mu: float = 0.01

    def validate(self, path: str = "strategy") -> None:
        super().validate(path)
        if self.proximal_mu < 0:
            raise ConfigError(f"{path}.proximal_mu: {self.proximal_mu!r} is out of range; it must be >= 0")


def _metrics_without_engine_keys(records: list[RecordDict], weight_key: str) -> MetricRecord:
    total = sum(float(next(iter(r.metric_records.values()))[weight_key]) for r in records) or 1.0
    loss = sum(float(next(iter(r.metric_records.values()))[weight_key])
               * float(next(iter(r.metric_records.values())).get("train_loss", 0.0)) for r in records)
    return MetricRecord({"train_loss": loss / total})


class FedAvgServer:
    """Runs Flower's FedAvg for ``rounds`` rounds; evaluation and logging through the fedsim context."""

    flower_strategy = FedAvg

    def __init__(self, params: FedAvgParams) -> None:
        self.params = params

    def _strategy(self, ctx: ServerContext):  # noqa: ANN202
        kwargs = dict(fraction_train=self.params.fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
                      min_evaluate_nodes=0, min_available_nodes=ctx.config.num_nodes,
                      train_metrics_aggr_fn=_metrics_without_engine_keys)
        if self.flower_strategy is FedProx:
            kwargs["proximal_mu"] = self.params.proximal_mu
        return self.flower_strategy(**kwargs)

    def run(self, ctx: ServerContext) -> None:
        test = ctx.test_data()
        model = scenario_model(ctx.config, test.num_classes, test.input_shape)
        every, rounds = ctx.config.evaluation.every, ctx.config.rounds
        bs = ctx.config.evaluation.batch_size

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round % every and server_round != rounds:
                ctx.log(server_round)
                return None
            arrays_to_state(model, from_arrayrecord(arrays))
            res = evaluate(model, test.x, test.y, batch_size=bs, device=ctx.device)
            ctx.log(server_round, accuracy=res["accuracy"], loss=res["loss"],
                    **ctx.client_accuracy(res["class_accuracy"]))
            return MetricRecord({"accuracy": float(res["accuracy"]), "loss": float(res["loss"])})

        result = self._strategy(ctx).start(
            grid=ctx.grid, initial_arrays=to_arrayrecord(state_to_arrays(model)), num_rounds=rounds,
            timeout=ctx.config.simulation.timeout, train_config=ConfigRecord(), evaluate_fn=evaluate_fn,
        )
        arrays_to_state(model, from_arrayrecord(result.arrays))
        ctx.save_model(model.cpu())
        ctx.summary(num_parameters=int(sum(p.numel() for p in model.parameters())))


class FedProxServer(FedAvgServer):
    flower_strategy = FedProx


def _check_trainable(config) -> None:  # noqa: ANN001
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for "
                          f"{config.strategy.name}")


register_strategy(StrategySpec(
    name="fedavg", params=FedAvgParams, server=FedAvgServer, client=SGDClient, check=_check_trainable,
    description="FedAvg (McMahan et al. 2017): local SGD epochs, example-weighted model averaging",
))
register_strategy(StrategySpec(
    name="fedprox", params=FedProxParams, server=FedProxServer, client=SGDClient, check=_check_trainable,
    description="FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 on clients",
))
