"""One-shot baselines beside FuseFL: every client trains once on its own data and uploads once (one round).

With M clients training the common initial model w_0 for `client.epochs` epochs each, giving w_m (n_m examples):

- `fedavg-oneshot`  one-shot FedAvg: w = (1/M) sum_m w_m, parameters and BatchNorm buffers averaged once (FuseFL's
                    baseline as its code defines it; `strategy.weighting = "examples"`: FedAvg's sum_m (n_m / n) w_m,
                    which equals one round of `fedavg`) (Tang et al. 2024, arXiv 2410.20380, and the one-shot FL
                    literature since Guha et al. 2019, arXiv 1902.11175).
- `ensemble`        the M local models side by side: the mean of their logits (`combine = "logits"`, FuseFL's
                    baseline) or p(y|x) = (1/M) sum_m softmax(f_m(x)) (`"softmax"`); M times the memory and compute.
                    Its summary also reports every local model's test accuracy (`best_local_accuracy`,
                    `mean_local_accuracy`; table `local_models.csv`).
- `ensemble-recalibrated`  the same local models with FuseFL's head: logits = head(sum_m e_m(x)), head = the
                    parameter mean of the M heads, recalibrated on virtual features from the pooled class
                    statistics of sum_m e_m(x) (a second round: the server sends the M models, clients send their
                    class statistics), exactly FuseFL's recalibration (FuseFL with K = 1 is this model); so a
                    report separates what the head gives from what the fusion gives. Its summary also reports the
                    plain ensemble (`ensemble_accuracy`, mean logits), the local models and
                    `accuracy_before_recalibration`.
- `best-local`      the single local model with the highest test accuracy (an oracle choice: it looks at the
                    test set, so it is an optimistic reference, not a deployable rule).

Clients with no data are left out. The saved model.pt is a standalone `torch.nn.Module` in every case.
The ensemble, the fused stage and the recalibration are the one-shot framework's (`fedsim.frameworks.oneshot`).
Messages: `fedsim.frameworks.oneshot_protocol` (the upload, the class statistics) and
`fedsim.algorithms.oneshot.protocol` (round 2's members request).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from fedsim.algorithms.oneshot import protocol
from fedsim.averaging import weighted_average
from fedsim.engine import ServerContext
from fedsim.frameworks import oneshot_protocol
from fedsim.frameworks.oneshot import Column, Ensemble, FusedNet, FusedStage, recalibrated_head, stage_modules
from fedsim.frameworks.oneshot_protocol import LocalModel
from fedsim.nn.models import num_parameters
from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays


class OneShotServer:
    """Collects the M locally trained models in one round; subclasses say how they become one predictor."""

    def __init__(self, params) -> None:  # noqa: ANN001 - the params of the registered baseline
        self.params = params

    def collect(self, ctx: ServerContext) -> list[LocalModel]:
        """One round: every client trains from the common initialization and uploads its model."""
        return oneshot_protocol.collect_local_models(ctx, "combine")

    def local_model(self, ctx: ServerContext, arrays: dict):  # noqa: ANN201
        return arrays_to_state(ctx.initial_model(), arrays).eval()

    def evaluate(self, ctx: ServerContext, model) -> dict:  # noqa: ANN001
        test = ctx.test_data()
        res = evaluate(model, test.x, test.y, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)
        model.cpu()
        return res

    def local_table(self, ctx: ServerContext, local: list[LocalModel]) -> pd.DataFrame:
        rows = []
        for entry in local:
            res = self.evaluate(ctx, self.local_model(ctx, entry.arrays))
            rows.append({"client": entry.pid, "num_examples": entry.n, "train_loss": entry.loss,
                         "test_accuracy": float(res["accuracy"]), "test_loss": float(res["loss"])})
        return pd.DataFrame(rows)

    def combine(self, ctx: ServerContext, local: list[LocalModel]):  # noqa: ANN201
        raise NotImplementedError

    rounds = 1

    def run(self, ctx: ServerContext) -> None:
        ctx.set_total_steps(self.rounds)
        local = self.collect(ctx)
        model, extra = self.combine(ctx, local)
        res = self.evaluate(ctx, model)
        n = np.array([e.n for e in local], dtype=np.float64)
        loss = float(np.dot(n, [e.loss for e in local]) / n.sum())
        ctx.log(self.rounds, accuracy=res["accuracy"], loss=res["loss"], train_loss=loss, local_models=len(local),
                **ctx.client_accuracy(res["class_accuracy"], model=model))
        ctx.save_model(model.cpu())
        single = num_parameters(self.local_model(ctx, local[0].arrays))
        ctx.summary(final_accuracy=float(res["accuracy"]), num_parameters=num_parameters(model),
                    single_model_parameters=single, local_models=len(local), **extra)


class OneShotFedAvgServer(OneShotServer):
    def combine(self, ctx: ServerContext, local: list[LocalModel]):  # noqa: ANN201
        weights = [e.n for e in local] if self.params.weighting == "examples" else None
        return self.local_model(ctx, weighted_average([e.arrays for e in local], weights)), {}


class EnsembleServer(OneShotServer):
    def combine(self, ctx: ServerContext, local: list[LocalModel]):  # noqa: ANN201
        table = self.local_table(ctx, local)
        ctx.save_table("local_models.csv", table, index=False)
        models = [self.local_model(ctx, e.arrays) for e in local]
        extra = {"best_local_accuracy": float(table["test_accuracy"].max()),
                 "mean_local_accuracy": float(table["test_accuracy"].mean()),
                 "best_local_client": int(table.loc[table["test_accuracy"].idxmax(), "client"])}
        return Ensemble(models, combine=self.params.combine).eval(), extra


class BestLocalServer(OneShotServer):
    def combine(self, ctx: ServerContext, local: list[LocalModel]):  # noqa: ANN201
        table = self.local_table(ctx, local)
        ctx.save_table("local_models.csv", table, index=False)
        best = int(table["test_accuracy"].idxmax())
        extra = {"best_local_client": int(table.loc[best, "client"]),
                 "mean_local_accuracy": float(table["test_accuracy"].mean()),
                 "selection": "highest test accuracy (oracle)"}
        return self.local_model(ctx, local[best].arrays), extra


class EnsembleRecalibratedServer(OneShotServer):
    """The local models under FuseFL's recalibrated head (one more round for the class statistics)."""

    rounds = 2

    def combine(self, ctx: ServerContext, local: list[LocalModel]):  # noqa: ANN201
        table = self.local_table(ctx, local)
        ctx.save_table("local_models.csv", table, index=False)
        n = np.array([e.n for e in local], dtype=np.float64)
        ctx.log(1, train_loss=float(np.dot(n, [e.loss for e in local]) / n.sum()), local_models=len(local))
        models = [self.local_model(ctx, e.arrays) for e in local]
        extra = {"ensemble_accuracy": float(self.evaluate(ctx, Ensemble(models, "logits").eval())["accuracy"]),
                 "best_local_accuracy": float(table["test_accuracy"].max()),
                 "mean_local_accuracy": float(table["test_accuracy"].mean()),
                 "best_local_client": int(table.loc[table["test_accuracy"].idxmax(), "client"])}
        stage = FusedStage([Column(stage_modules(m, 1)[0]) for m in models]).eval()
        head = copy.deepcopy(models[0].head)
        arrays_to_state(head, weighted_average([{k[len("head."):]: v for k, v in e.arrays.items()
                                                 if k.startswith("head.")} for e in local]))
        before = FusedNet([stage], head, head_rule="sum").eval()
        extra["accuracy_before_recalibration"] = float(self.evaluate(ctx, before)["accuracy"])

        replies = ctx.send(protocol.members_request(state_to_arrays(FusedNet([stage])), len(models)), round=2)
        exchange = ctx.last_exchange
        parts = oneshot_protocol.parse_class_statistics((r.content for r in replies), ctx.num_classes,
                                                        models[0].feature_dim)
        if not parts:
            raise RuntimeError("round 2: no client sent class statistics")
        new_head, facts = recalibrated_head(head, parts, self.params, ctx.derive_seed("fusefl", "virtual-features"))
        extra.update(facts)
        extra["head_bytes_up_per_client"] = exchange.mean_up_per_answering_client()
        return FusedNet([stage], new_head, head_rule="sum").eval(), extra
