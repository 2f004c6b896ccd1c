"""FuseFL: one-shot federated learning by progressive block training and fusion.

Tang et al., "FuseFL: One-Shot Federated Learning through the Lens of Causality with Progressive Model Fusion",
NeurIPS 2024, arXiv 2410.20380; official code github wizard1203/FuseFL (`models/fl_exnn.py`).

The scenario's model (a `fedsim.models.BlockNet`) is cut into K = `strategy.stages` stages B^1..B^K
(`group_blocks(K)`) plus a classifier; every node builds the same initial model from the scenario seed. Round
k = 1..K is stage k:

    down:   the fused stages 1..k-1 (all their columns, frozen) and their layout
    client m (its data D_m, E = epochs_per_stage or client.epochs):
            min  CE( head_m(B^K_m(...B^{k+1}_m(B^k_m(A^k_m(F_{<k}(x)))))), y )   over (x, y) in D_m, E epochs,
            F_{<k} frozen (eval mode); uploads (A^k_m, B^k_m), and head_m at k = K
    server: fused stage k = the M columns side by side; column m reads A^k_m(h^{k-1}_1, ..., h^{k-1}_M):
            avg (1/M) sum_j h_j | sum  sum_j h_j | conv1x1  Conv_{1x1}([h_1; ...; h_M])  (strategy.merge)
    end:    classifier = parameter mean of the M heads on the mean of the M final outputs (strategy.head = "avg")
            or the mean of the M heads' logits, each on its own column (strategy.head = "logits");
            or (strategy.head = "ridge") one more round K + 1 in which clients run their data once through the
            fused network and send the ridge statistics of z = [e(x), 1] (e = mean, or concatenation with
            head_features = "concat", of the columns' pooled final outputs): the server solves
            W = (sum_m Z_m^T Z_m + gamma I)^-1 sum_m Z_m^T Y_m, the least-squares head on all clients' data.
            The official code also recalibrates its head after stage K from pooled class statistics (Gaussian
            virtual features, one SGD epoch); without a recalibration the heads, each fitted to its own client's
            few classes under label skew, are the weak part (see docs/results-fusefl.md).

Each client uploads K blocks, about one model in total; what each stage sends is logged (metrics.csv) and put in
`stages.csv` / the summary. The fused network has M columns per stage, so it grows with M (`num_parameters`
against `single_model_parameters` in the summary). Clients without data (possible under Dirichlet skew) are left
out of the fusion. The fused model is saved as a standalone `torch.nn.Module` (model.pt).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd

from clients.fusefl import COLUMN_PREFIX, HEAD_PREFIX, META_PREFIX, STATS_PREFIX, WEIGHT_KEY, FuseFLClient, \
    stage_message
from clients.sgd import from_arrayrecord, scenario_model
from fedsim.config import _choice
from fedsim.engine import ServerContext, StrategySpec, register_strategy
from fedsim.errors import ConfigError
from fedsim.analytic import RidgeStatistics, ridge_solve, unpack_upper
from fedsim.learners.fusefl import HEAD_FEATURES, HEADS, MERGES, Column, FusedNet, FusedStage, Merge, \
    average_states, ridge_head, stage_modules, stage_output_shapes
from fedsim.models import num_parameters
from fedsim.training import arrays_to_state, evaluate


@dataclass
class FuseFLParams:
    stages: int = 2  # K: the model is cut into K stages, one round each
    merge: str = "avg"  # how a column reads the previous stage's M outputs: avg | sum | conv1x1
    head: str = "avg"  # final classifier: avg (mean of heads on mean features) | logits (mean of head logits)
    #                    | ridge (one more round: ridge head from all clients' statistics of the fused features)
    head_features: str = "mean"  # ridge head input: mean over columns (d) or their concatenation (M d)
    ridge_gamma: float = 1.0  # ridge regularization of the ridge head
    epochs_per_stage: int | None = None  # local epochs at each stage; unset = client.epochs

    @property
    def rounds(self) -> int:
        return self.stages + (1 if self.head == "ridge" else 0)

    def validate(self, path: str = "strategy") -> None:
        if self.stages < 1:
            raise ConfigError(f"{path}.stages: {self.stages!r} is out of range; it must be >= 1 (2..4 is usual)")
        _choice(f"{path}.merge", self.merge, MERGES)
        _choice(f"{path}.head", self.head, HEADS)
        _choice(f"{path}.head_features", self.head_features, HEAD_FEATURES)
        if not self.ridge_gamma >= 0 or self.ridge_gamma == float("inf"):
            raise ConfigError(f"{path}.ridge_gamma: {self.ridge_gamma!r} is out of range; it must be a finite "
                              "number >= 0")
        if self.epochs_per_stage is not None and self.epochs_per_stage < 1:
            raise ConfigError(f"{path}.epochs_per_stage: {self.epochs_per_stage!r} is out of range; it must be "
                              ">= 1 or unset (then client.epochs is used)")


def _split_replies(replies) -> dict[int, dict]:  # noqa: ANN001
    """Per client: its column arrays, head arrays (last stage), example count and training loss."""
    out: dict[int, dict] = {}
    for reply in replies:
        if reply.content is None:
            continue
        for key, record in reply.content.array_records.items():
            for prefix, field in ((COLUMN_PREFIX, "column"), (HEAD_PREFIX, "head"), (STATS_PREFIX, "stats")):
                if key.startswith(prefix):
                    out.setdefault(int(key[len(prefix):]), {})[field] = from_arrayrecord(record)
        for key, record in reply.content.metric_records.items():
            if key.startswith(META_PREFIX):
                entry = out.setdefault(int(key[len(META_PREFIX):]), {})
                entry["n"] = int(record[WEIGHT_KEY])
                entry["loss"] = float(record["train_loss"])
    return dict(sorted(out.items()))


class FuseFLServer:
    """Runs the K stages, fuses the columns after each, assembles and evaluates the fused network."""

    def __init__(self, params: FuseFLParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        p = self.params
        test = ctx.test_data()
        shape = tuple(ctx.input_shape)
        net = scenario_model(ctx.config, ctx.num_classes, shape)
        templates = stage_modules(net, p.stages)
        out_shapes = stage_output_shapes(templates, shape)
        ctx.set_total_steps(p.rounds)

        stages: list[FusedStage] = []
        columns: list[int] = []
        members: list[list[int]] = []  # which clients' columns make up each stage
        table = []
        heads: dict[int, dict] = {}
        for k in range(1, p.stages + 1):
            lower = FusedNet(stages) if stages else None
            lower_arrays = {key: v.detach().cpu().numpy() for key, v in lower.state_dict().items()} if lower else None
            before = dict(ctx.grid.traffic.per_client_up)
            down_before = ctx.grid.traffic.down
            replies = ctx.send(stage_message(k, columns, lower_arrays), round=k)
            received = _split_replies(replies)
            kept = {pid: r for pid, r in received.items() if r.get("n", 0) > 0 and "column" in r}
            if not kept:
                raise RuntimeError(f"stage {k}: no client with data answered; nothing to fuse")
            cols = []
            for r in kept.values():
                merge = Merge(p.merge, columns[-1], out_shapes[k - 2]) if k > 1 else None
                column = Column(copy.deepcopy(templates[k - 1]), merge)
                arrays_to_state(column, r["column"])
                cols.append(column)
            stages.append(FusedStage(cols).eval())
            columns.append(len(cols))
            members.append(list(kept))
            if k == p.stages and p.head != "ridge":
                heads = {pid: r["head"] for pid, r in kept.items()}

            after = ctx.grid.traffic.per_client_up
            up = {pid: after.get(pid, 0) - before.get(pid, 0) for pid in after}
            uploaded = [v for v in up.values() if v > 0]
            weights = np.array([r["n"] for r in kept.values()], dtype=np.float64)
            loss = float(np.dot(weights, [r["loss"] for r in kept.values()]) / weights.sum())
            column_params = num_parameters(cols[0])
            table.append({
                "stage": k, "blocks": "{}-{}".format(*net.group_blocks(p.stages)[k - 1]),
                "columns": len(cols), "clients_answered": len(received),
                "column_parameters": column_params,
                "head_parameters": num_parameters(net.head) if k == p.stages and p.head != "ridge" else 0,
                "bytes_up_per_client": float(np.mean(uploaded)) if uploaded else 0.0,
                "bytes_down": ctx.grid.traffic.down - down_before, "train_loss": loss,
            })
            if k < p.rounds:
                ctx.log(k, train_loss=loss, columns=len(cols), column_parameters=column_params)

        head_template = net.head
        if p.head == "ridge":
            model = self._ridge_head(ctx, net, stages, columns, table)
        elif p.head == "logits":
            head_list = []
            for pid in members[-1]:
                h = copy.deepcopy(head_template)
                arrays_to_state(h, heads[pid])
                head_list.append(h)
            model = FusedNet(stages, head_list, head_rule="logits")
        else:
            head = copy.deepcopy(head_template)
            arrays_to_state(head, average_states(list(heads.values())))
            model = FusedNet(stages, head, head_rule="avg")
        model = model.eval().cpu()
        res = evaluate(model, test.x, test.y, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)
        model.cpu()
        last = table[p.stages - 1]
        ctx.log(p.rounds, accuracy=res["accuracy"], loss=res["loss"], train_loss=last["train_loss"],
                columns=columns[-1], column_parameters=last["column_parameters"],
                **ctx.client_accuracy(res["class_accuracy"]))
        ctx.save_model(model)
        frame = pd.DataFrame(table)
        uploads = frame[frame["stage"].apply(lambda v: str(v).isdigit())]
        ctx.save_table("stages.csv", frame, index=False)
        fused_params, single = num_parameters(model), num_parameters(net)
        ctx.summary(
            final_accuracy=float(res["accuracy"]),
            num_parameters=fused_params,
            single_model_parameters=single,
            fused_size_ratio=round(fused_params / single, 3),
            columns_per_stage=columns,
            bytes_up_per_stage=[float(b) for b in uploads["bytes_up_per_client"]],
            block_parameters_per_stage=[int(c) for c in uploads["column_parameters"]],
            head_bytes_up_per_client=float(frame["bytes_up_per_client"].iloc[-1]) if p.head == "ridge" else 0.0,
            head=p.head,
            local_epochs_total=p.stages * (p.epochs_per_stage or ctx.config.client.epochs),
            model_note=f"fused network: {columns[-1]} columns per stage (one per client with data), "
                       f"{fused_params} parameters = {fused_params / single:.2f}x one local model ({single}); "
                       "it grows linearly with the number of clients",
        )

    def _ridge_head(self, ctx: ServerContext, net, stages, columns, table):  # noqa: ANN001, ANN202
        """Round K + 1: clients' ridge statistics of the fused embedding, summed and solved once."""
        p = self.params
        fused = FusedNet(stages)
        arrays = {key: v.detach().cpu().numpy() for key, v in fused.state_dict().items()}
        before = dict(ctx.grid.traffic.per_client_up)
        down_before = ctx.grid.traffic.down
        replies = ctx.send(stage_message(p.stages + 1, columns, arrays), round=p.stages + 1)
        received = _split_replies(replies)
        dim = net.feature_dim * (columns[-1] if p.head_features == "concat" else 1) + 1
        total = RidgeStatistics.zeros(dim, ctx.num_classes)
        for r in received.values():
            if "stats" in r:
                s = r["stats"]
                total += RidgeStatistics(unpack_upper(s["gram"], dim), s["cross"], r.get("n", 0))
        if total.count == 0:
            raise RuntimeError(f"round {p.rounds}: no client sent head statistics")
        weights = ridge_solve(total.gram, total.cross, p.ridge_gamma)
        after = ctx.grid.traffic.per_client_up
        uploaded = [after.get(pid, 0) - before.get(pid, 0) for pid in after if after.get(pid, 0) > before.get(pid, 0)]
        table.append({"stage": "head", "blocks": f"ridge head ({p.head_features})", "columns": columns[-1],
                      "clients_answered": len(received), "column_parameters": 0,
                      "head_parameters": int(weights.size),
                      "bytes_up_per_client": float(np.mean(uploaded)) if uploaded else 0.0,
                      "bytes_down": ctx.grid.traffic.down - down_before, "train_loss": table[-1]["train_loss"]})
        rule = "concat" if p.head_features == "concat" else "avg"
        return FusedNet(stages, ridge_head(net.head, weights), head_rule=rule)


def _with_rounds(value_of_rounds):  # noqa: ANN001, ANN202
    """`prepare` hook: a scenario that does not set `rounds` gets the strategy's fixed number of rounds."""

    def prepare(tree: dict) -> dict:
        tree = copy.deepcopy(tree)
        if "rounds" not in tree:
            tree["rounds"] = value_of_rounds(tree.get("strategy") or {})
        return tree

    return prepare


def _stages_in(strategy_tree: dict) -> int:
    value = strategy_tree.get("stages", FuseFLParams.stages)
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    stages = value if valid else 1  # an invalid value is reported by the params' validation, naming the field
    return stages + (1 if strategy_tree.get("head") == "ridge" else 0)


def _check(config) -> None:  # noqa: ANN001
    p = config.strategy.params
    if config.rounds != p.rounds:
        extra = " plus one for the ridge head" if p.head == "ridge" else ""
        raise ConfigError(f"rounds: {config.rounds} but fusefl runs exactly one round per stage{extra} "
                          f"(strategy.stages = {p.stages}); set rounds = {p.rounds} or leave rounds out")
    if p.epochs_per_stage is None and config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for fusefl "
                          "(or set strategy.epochs_per_stage)")
    from fedsim.models import build_model

    probe = build_model(config.model.name, (3, 32, 32), num_classes=2, width=2)
    if p.stages > probe.num_blocks:
        raise ConfigError(f"strategy.stages: {p.stages} is more than model {config.model.name!r} has blocks "
                          f"({probe.num_blocks}); use 1..{probe.num_blocks}")


register_strategy(StrategySpec(
    name="fusefl", params=FuseFLParams, server=FuseFLServer, client=FuseFLClient, check=_check,
    prepare=_with_rounds(_stages_in),
    description="FuseFL (Tang et al. 2024): one-shot FL, K stages of block training on the fused lower blocks",
))
