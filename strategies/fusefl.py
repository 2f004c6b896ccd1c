"""FuseFL: one-shot federated learning by progressive block training and fusion.

Tang et al., "FuseFL: One-Shot Federated Learning through the Lens of Causality with Progressive Model Fusion",
NeurIPS 2024, arXiv 2410.20380; official code github wizard1203/FuseFL (`models/fl_exnn.py`, `alg_train.py`,
`locals/ccvr.py`).

The scenario's model (a `fedsim.nn.models.BlockNet`) is cut into K = `strategy.stages` stages B^1..B^K
(`group_blocks(K)`) plus a classifier; every node builds the same initial model from the scenario seed. Round
k = 1..K is stage k:

    down:   the fused stages 1..k-1 (all their columns, frozen) and their layout
    client m (its data D_m, E_k = stage_epochs: client.epochs spread over the K stages, or epochs_per_stage):
            min  CE( head_m(B^K_m(...B^{k+1}_m(B^k_m(A^k_m(F_{<k}(x)))))), y )   over (x, y) in D_m, E_k epochs,
            F_{<k} frozen (eval mode); B^{k..K}_m and head_m continue from its previous stage (warm start, client
            state); uploads (A^k_m, B^k_m), and head_m at k = K
    server: fused stage k = the M columns side by side; column m reads A^k_m(h^{k-1}_1, ..., h^{k-1}_M):
            avg (1/M) sum_j h_j | sum  sum_j h_j | conv1x1  Conv_{1x1}([h_1; ...; h_M])  (strategy.merge)
    end (strategy.head):
            recalibrated (default, the published method): the parameter mean of the M heads reading the SUM of
                the M final features, then round K + 1: clients run their data through the fused network once
                and send per-class count, mean and centred scatter of those features; the server pools them
                (unbiased covariance; `recalibration_covariance = "official"` reproduces the official centring
                bug), draws `virtual_per_class` Gaussian features per class and trains the head on them
                (`recalibration_epochs` of SGD at `recalibration_lr`). The summary also reports the accuracy
                before the recalibration (`accuracy_before_recalibration` = head "avg").
            avg: the averaged head without recalibration (K rounds); logits: the mean of the M heads' logits,
                each on its own column (K rounds); ridge: round K + 1 sends the ridge statistics of z = [e(x), 1]
                (e = mean, or concatenation with head_features = "concat", of the columns' pooled final
                outputs) and the server solves W = (sum_m Z_m^T Z_m + gamma I)^-1 sum_m Z_m^T Y_m.

Each client uploads K blocks, about one model in total, plus its class statistics (recalibrated head) or ridge
statistics (ridge head); what each round sends is logged (metrics.csv) and put in `stages.csv` / the summary.
The fused network has M columns per stage, so it grows with M (`num_parameters` against
`single_model_parameters` in the summary). Clients without data (possible under Dirichlet skew) are left out of
the fusion. The fused model is saved as a standalone `torch.nn.Module` (model.pt). The fused network and the head
recalibration are the one-shot framework's (`fedsim.frameworks.oneshot`). Messages: `fedsim.algorithms.fusefl.protocol`
(each stage's request carries its local training, `stage_training`) and, for the class statistics,
`fedsim.frameworks.oneshot_protocol`; the bytes of each round are the engine's record of that exchange
(`ctx.last_exchange`).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from fedsim.algorithms.fusefl import protocol
from fedsim.algorithms.fusefl.learner import ridge_head
from fedsim.algorithms.fusefl.protocol import FuseFLParams, stage_epochs, stage_training
from fedsim.analytic import RidgeStatistics, ridge_solve
from fedsim.averaging import weighted_average
from fedsim.engine import ServerContext
from fedsim.frameworks.oneshot import Column, FusedNet, FusedStage, Merge, recalibrated_head, stage_modules, \
    stage_output_shapes
from fedsim.frameworks.oneshot_protocol import parse_class_statistics
from fedsim.nn.models import num_parameters
from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays


def _mean_upload(exchange) -> float:  # noqa: ANN001
    """Mean bytes uploaded per client in an exchange, over the clients that uploaded anything."""
    uploaded = [v for v in exchange.bytes_up.values() if v > 0]
    return float(np.mean(uploaded)) if uploaded else 0.0


class FuseFLServer:
    """Runs the K stages, fuses the columns after each, assembles and evaluates the fused network."""

    def __init__(self, params: FuseFLParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        p = self.params
        test = ctx.test_data()
        shape = tuple(ctx.input_shape)
        net = ctx.initial_model()
        templates = stage_modules(net, p.stages)
        out_shapes = stage_output_shapes(templates, shape)
        ctx.set_total_steps(p.rounds)

        stages: list[FusedStage] = []
        columns: list[int] = []
        members: list[list[int]] = []  # which clients' columns make up each stage
        table = []
        heads: dict[int, dict] = {}
        for k in range(1, p.stages + 1):
            lower_arrays = state_to_arrays(FusedNet(stages)) if stages else None
            training = stage_training(p, ctx.config.client, k)
            replies = ctx.send(protocol.stage_message(k, columns, lower_arrays, training), round=k)
            exchange = ctx.last_exchange
            received = protocol.parse_replies(r.content for r in replies)
            kept = {pid: u for pid, u in received.items() if u.num_examples > 0 and u.column is not None}
            if not kept:
                raise RuntimeError(f"stage {k}: no client with data answered; nothing to fuse")
            cols = []
            for upload in kept.values():
                merge = Merge(p.merge, columns[-1], out_shapes[k - 2]) if k > 1 else None
                column = Column(copy.deepcopy(templates[k - 1]), merge)
                arrays_to_state(column, upload.column)
                cols.append(column)
            stages.append(FusedStage(cols).eval())
            columns.append(len(cols))
            members.append(list(kept))
            if k == p.stages and p.head != "ridge":
                heads = {pid: u.head for pid, u in kept.items()}

            weights = np.array([u.num_examples for u in kept.values()], dtype=np.float64)
            loss = float(np.dot(weights, [u.train_loss for u in kept.values()]) / weights.sum())
            column_params = num_parameters(cols[0])
            table.append({
                "stage": k, "blocks": "{}-{}".format(*net.group_blocks(p.stages)[k - 1]),
                "columns": len(cols), "clients_answered": len(exchange.answered),
                "column_parameters": column_params,
                "head_parameters": num_parameters(net.head) if k == p.stages and p.head != "ridge" else 0,
                "bytes_up_per_client": _mean_upload(exchange), "bytes_down": exchange.total_down,
                "train_loss": loss,
            })
            if k < p.rounds:
                ctx.log(k, train_loss=loss, columns=len(cols), column_parameters=column_params)

        head_template = net.head
        extra: dict = {}
        if p.head == "ridge":
            model = self._ridge_head(ctx, net, stages, columns, table)
        elif p.head == "logits":
            head_list = []
            for pid in members[-1]:
                h = copy.deepcopy(head_template)
                arrays_to_state(h, heads[pid])
                head_list.append(h)
            model = FusedNet(stages, head_list, head_rule="logits")
        else:  # avg, and the start of recalibrated: the uniform mean of the heads on the sum of the features
            head = copy.deepcopy(head_template)
            arrays_to_state(head, weighted_average(list(heads.values())))
            model = FusedNet(stages, head, head_rule="sum")
            if p.head == "recalibrated":
                before = evaluate(model.eval().cpu(), test.x, test.y, batch_size=ctx.config.evaluation.batch_size,
                                  device=ctx.device)
                model.cpu()
                extra["accuracy_before_recalibration"] = float(before["accuracy"])
                model, facts = self._recalibrated(ctx, net, stages, columns, head, table)
                extra.update(facts)
        model = model.eval().cpu()
        res = evaluate(model, test.x, test.y, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)
        model.cpu()
        last = table[p.stages - 1]
        ctx.log(p.rounds, accuracy=res["accuracy"], loss=res["loss"], train_loss=last["train_loss"],
                columns=columns[-1], column_parameters=last["column_parameters"],
                **ctx.client_accuracy(res["class_accuracy"], model=model))
        ctx.save_model(model)
        frame = pd.DataFrame(table)
        uploads = frame[frame["stage"].apply(lambda v: str(v).isdigit())]
        ctx.save_table("stages.csv", frame, index=False)
        fused_params, single = num_parameters(model), num_parameters(net)
        epochs = [stage_epochs(p, ctx.config.client.epochs, k) for k in range(1, p.stages + 1)]
        ctx.summary(
            final_accuracy=float(res["accuracy"]),
            num_parameters=fused_params,
            single_model_parameters=single,
            fused_size_ratio=round(fused_params / single, 3),
            columns_per_stage=columns,
            bytes_up_per_stage=[float(b) for b in uploads["bytes_up_per_client"]],
            block_parameters_per_stage=[int(c) for c in uploads["column_parameters"]],
            head_bytes_up_per_client=(float(frame["bytes_up_per_client"].iloc[-1])
                                      if p.head in protocol.STATS_ROUND_HEADS else 0.0),
            head=p.head,
            warm_start=p.warm_start,
            epochs_per_stage=epochs,
            local_epochs_total=int(sum(epochs)),
            **extra,
            model_note=f"fused network: {columns[-1]} columns per stage (one per client with data), "
                       f"{fused_params} parameters = {fused_params / single:.2f}x one local model ({single}); "
                       "it grows linearly with the number of clients",
        )

    def _recalibrated(self, ctx: ServerContext, net, stages, columns, head, table):  # noqa: ANN001, ANN202
        """Round K + 1: clients' class statistics of the summed fused features; the averaged `head` retrained
        on virtual features drawn from the pooled class Gaussians."""
        p = self.params
        replies = ctx.send(protocol.stage_message(p.stages + 1, columns, state_to_arrays(FusedNet(stages))),
                           round=p.stages + 1)
        exchange = ctx.last_exchange
        parts = parse_class_statistics((r.content for r in replies), ctx.num_classes, net.feature_dim)
        if not parts:
            raise RuntimeError(f"round {p.rounds}: no client sent class statistics")
        new_head, facts = recalibrated_head(head, parts, p, ctx.derive_seed("fusefl", "virtual-features"))
        table.append({"stage": "head", "blocks": f"recalibration ({p.recalibration_covariance} covariance)",
                      "columns": columns[-1], "clients_answered": len(exchange.answered), "column_parameters": 0,
                      "head_parameters": num_parameters(new_head), "bytes_up_per_client": _mean_upload(exchange),
                      "bytes_down": exchange.total_down, "train_loss": table[-1]["train_loss"]})
        return FusedNet(stages, new_head, head_rule="sum"), facts

    def _ridge_head(self, ctx: ServerContext, net, stages, columns, table):  # noqa: ANN001, ANN202
        """Round K + 1: clients' ridge statistics of the fused embedding, summed and solved once."""
        p = self.params
        replies = ctx.send(protocol.stage_message(p.stages + 1, columns, state_to_arrays(FusedNet(stages))),
                           round=p.stages + 1)
        exchange = ctx.last_exchange
        received = protocol.parse_replies(r.content for r in replies)
        dim = net.feature_dim * (columns[-1] if p.head_features == "concat" else 1) + 1
        total = RidgeStatistics.zeros(dim, ctx.num_classes)
        for upload in received.values():
            if upload.stats is not None:
                total += upload.stats
        if total.count == 0:
            raise RuntimeError(f"round {p.rounds}: no client sent head statistics")
        weights = ridge_solve(total.gram, total.cross, p.ridge_gamma)
        table.append({"stage": "head", "blocks": f"ridge head ({p.head_features})", "columns": columns[-1],
                      "clients_answered": len(exchange.answered), "column_parameters": 0,
                      "head_parameters": int(weights.size), "bytes_up_per_client": _mean_upload(exchange),
                      "bytes_down": exchange.total_down, "train_loss": table[-1]["train_loss"]})
        rule = "concat" if p.head_features == "concat" else "avg"
        return FusedNet(stages, ridge_head(net.head, weights), head_rule=rule)
