"""One-shot baselines beside FuseFL: every client trains once on its own data and uploads once (one round).

With M clients training the common initial model w_0 for `client.epochs` epochs each, giving w_m (n_m examples):

- `fedavg-oneshot`  one-shot FedAvg: w = sum_m (n_m / n) w_m, parameters and BatchNorm buffers averaged once
                    (`strategy.weighting = "uniform"`: plain mean); FuseFL's first baseline (Tang et al. 2024,
                    arXiv 2410.20380, and the one-shot FL literature since Guha et al. 2019, arXiv 1902.11175).
- `ensemble`        the M local models side by side: p(y|x) = (1/M) sum_m softmax(f_m(x)) (`combine = "softmax"`)
                    or the mean logits (`"logits"`, what FuseFL's code reports); M times the memory and compute.
                    Its summary also reports every local model's test accuracy (`best_local_accuracy`,
                    `mean_local_accuracy`; table `local_models.csv`).
- `best-local`      the single local model with the highest test accuracy (an oracle choice: it looks at the
                    test set, so it is an optimistic reference, not a deployable rule).

Clients with no data are left out. The saved model.pt is a standalone `torch.nn.Module` in every case.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
from flwr.app import RecordDict

from clients.oneshot import META_PREFIX, MODEL_PREFIX, WEIGHT_KEY, LocalModelClient
from clients.sgd import from_arrayrecord, scenario_model
from fedsim.config import _choice
from fedsim.engine import ServerContext, StrategySpec, register_strategy
from fedsim.errors import ConfigError
from fedsim.learners.fusefl import COMBINES, Ensemble, average_states
from fedsim.models import num_parameters
from fedsim.training import arrays_to_state, evaluate


@dataclass
class OneShotAvgParams:
    weighting: str = "examples"  # examples: FedAvg's n_m / n; uniform: 1 / M

    def validate(self, path: str = "strategy") -> None:
        _choice(f"{path}.weighting", self.weighting, ("examples", "uniform"))


@dataclass
class EnsembleParams:
    combine: str = "softmax"  # softmax: mean of probabilities; logits: mean of logits

    def validate(self, path: str = "strategy") -> None:
        _choice(f"{path}.combine", self.combine, COMBINES)


@dataclass
class BestLocalParams:
    pass


class OneShotServer:
    """Collects the M locally trained models in one round; subclasses say how they become one predictor."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def collect(self, ctx: ServerContext) -> list[dict]:
        """One round: every client trains from the common initialization and uploads its model."""
        replies = ctx.send(RecordDict(), round=1)
        found: dict[int, dict] = {}
        for reply in replies:
            if reply.content is None:
                continue
            for key, record in reply.content.array_records.items():
                if key.startswith(MODEL_PREFIX):
                    found.setdefault(int(key[len(MODEL_PREFIX):]), {})["arrays"] = from_arrayrecord(record)
            for key, record in reply.content.metric_records.items():
                if key.startswith(META_PREFIX):
                    entry = found.setdefault(int(key[len(META_PREFIX):]), {})
                    entry["n"] = int(record[WEIGHT_KEY])
                    entry["loss"] = float(record["train_loss"])
        local = [dict(pid=pid, **r) for pid, r in sorted(found.items()) if r.get("n", 0) > 0 and "arrays" in r]
        if not local:
            raise RuntimeError("no client with data answered; nothing to combine")
        return local

    def local_model(self, ctx: ServerContext, arrays: dict):  # noqa: ANN201
        model = scenario_model(ctx.config, ctx.num_classes, ctx.input_shape)
        arrays_to_state(model, arrays)
        return model.eval()

    def evaluate(self, ctx: ServerContext, model) -> dict:  # noqa: ANN001
        test = ctx.test_data()
        res = evaluate(model, test.x, test.y, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)
        model.cpu()
        return res

    def local_table(self, ctx: ServerContext, local: list[dict]) -> pd.DataFrame:
        rows = []
        for entry in local:
            res = self.evaluate(ctx, self.local_model(ctx, entry["arrays"]))
            rows.append({"client": entry["pid"], "num_examples": entry["n"], "train_loss": entry["loss"],
                         "test_accuracy": float(res["accuracy"]), "test_loss": float(res["loss"])})
        return pd.DataFrame(rows)

    def combine(self, ctx: ServerContext, local: list[dict]):  # noqa: ANN201
        raise NotImplementedError

    def run(self, ctx: ServerContext) -> None:
        ctx.set_total_steps(1)
        local = self.collect(ctx)
        model, extra = self.combine(ctx, local)
        res = self.evaluate(ctx, model)
        n = np.array([e["n"] for e in local], dtype=np.float64)
        loss = float(np.dot(n, [e["loss"] for e in local]) / n.sum())
        ctx.log(1, accuracy=res["accuracy"], loss=res["loss"], train_loss=loss, local_models=len(local),
                **ctx.client_accuracy(res["class_accuracy"]))
        ctx.save_model(model.cpu())
        single = num_parameters(self.local_model(ctx, local[0]["arrays"]))
        ctx.summary(final_accuracy=float(res["accuracy"]), num_parameters=num_parameters(model),
                    single_model_parameters=single, local_models=len(local), **extra)


class OneShotFedAvgServer(OneShotServer):
    def combine(self, ctx: ServerContext, local: list[dict]):  # noqa: ANN201
        weights = [e["n"] for e in local] if self.params.weighting == "examples" else None
        return self.local_model(ctx, average_states([e["arrays"] for e in local], weights)), {}


class EnsembleServer(OneShotServer):
    def combine(self, ctx: ServerContext, local: list[dict]):  # noqa: ANN201
        table = self.local_table(ctx, local)
        ctx.save_table("local_models.csv", table, index=False)
        models = [self.local_model(ctx, e["arrays"]) for e in local]
        extra = {"best_local_accuracy": float(table["test_accuracy"].max()),
                 "mean_local_accuracy": float(table["test_accuracy"].mean()),
                 "best_local_client": int(table.loc[table["test_accuracy"].idxmax(), "client"])}
        return Ensemble(models, combine=self.params.combine).eval(), extra


class BestLocalServer(OneShotServer):
    def combine(self, ctx: ServerContext, local: list[dict]):  # noqa: ANN201
        table = self.local_table(ctx, local)
        ctx.save_table("local_models.csv", table, index=False)
        best = int(table["test_accuracy"].idxmax())
        extra = {"best_local_client": int(table.loc[best, "client"]),
                 "mean_local_accuracy": float(table["test_accuracy"].mean()),
                 "selection": "highest test accuracy (oracle)"}
        return self.local_model(ctx, local[best]["arrays"]), extra


def _one_round(tree: dict) -> dict:
    tree = copy.deepcopy(tree)
    tree.setdefault("rounds", 1)
    return tree


def _check(config) -> None:  # noqa: ANN001
    if config.rounds != 1:
        raise ConfigError(f"rounds: {config.rounds} but {config.strategy.name} is one-shot (exactly one round); "
                          "set rounds = 1 or leave rounds out")
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for "
                          f"{config.strategy.name}")


register_strategy(StrategySpec(
    name="fedavg-oneshot", params=OneShotAvgParams, server=OneShotFedAvgServer, client=LocalModelClient,
    check=_check, prepare=_one_round,
    description="One-shot FedAvg: local training once, parameters averaged once (FuseFL's baseline)",
))
register_strategy(StrategySpec(
    name="ensemble", params=EnsembleParams, server=EnsembleServer, client=LocalModelClient,
    check=_check, prepare=_one_round,
    description="Ensemble of the M local models (averaged softmax); also reports each local model's accuracy",
))
register_strategy(StrategySpec(
    name="best-local", params=BestLocalParams, server=BestLocalServer, client=LocalModelClient,
    check=_check, prepare=_one_round,
    description="Best single local model (chosen by test accuracy: an oracle reference)",
))
