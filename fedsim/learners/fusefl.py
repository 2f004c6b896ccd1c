"""FuseFL's learner: the fused network both the client and the server part build, and the one-shot baselines' modules.

FuseFL (Tang et al., "FuseFL: One-Shot Federated Learning through the Lens of Causality with Progressive Model
Fusion", NeurIPS 2024, arXiv 2410.20380). A network is cut into K stages B^1..B^K (contiguous groups of a
`fedsim.models.BlockNet`'s blocks) plus a head. With M clients, stage k = 1..K is one round:

    client m trains  head_m o B^K_m o ... o B^{k+1}_m o B^k_m o A^k_m  on top of the frozen fused stages 1..k-1
    (B^{k+1..K}_m and head_m are its local head for this stage, all starting from the common initial model)
    and uploads the column (A^k_m, B^k_m); at k = K also head_m.
    server: the fused stage k runs every received column side by side:

        h^1_m = B^1_m(x)                                   (stage 1 reads the input itself)
        h^k_m = B^k_m(A^k_m(h^{k-1}_1, ..., h^{k-1}_M))    (k > 1; every column reads all columns of stage k-1)

    merge A (strategy.merge):  avg:     A(h_1..h_M) = (1/M) sum_j h_j
                               sum:     A(h_1..h_M) = sum_j h_j
                               conv1x1: A(h_1..h_M) = Conv_{1x1, M c -> c}([h_1; ...; h_M])  (channel concatenation;
                                        a Linear for flat features); client m's own adaptor, trained with B^k_m
                                        at stage k and initialized to the average, so it starts where `avg` does.
    classifier (strategy.head): avg:    logits = head_avg((1/M) sum_m h^K_m),  head_avg = parameter mean of head_m
                                logits: logits = (1/M) sum_m head_m(h^K_m)
                                ridge:  one more round, after stage K (the official code also recalibrates
                                        the head on pooled class statistics, there with Gaussian virtual
                                        features and SGD): with z(x) = [e(x), 1], e(x) the mean (or the
                                        concatenation) over columns of the pooled final outputs, clients send
                                        Z_m^T Z_m and Z_m^T Y_m; the server solves the ridge regression
                                        W = (sum_m Z_m^T Z_m + gamma I)^-1 sum_m Z_m^T Y_m  (`fedsim.analytic`),
                                        the least-squares head on everybody's data, exactly.

Frozen stages always run in eval mode (their BatchNorm statistics are those the clients uploaded; the official
code leaves them in train mode so they drift). The fused network grows with M: M columns per stage.
The result, `FusedNet`, is a plain `torch.nn.Module` (inference needs torch and this module, not the simulator).

The one-shot baselines' `Ensemble` (the M local models, averaged softmax or logits) lives beside it; model averages
(FuseFL's "avg" head, one-shot FedAvg) use `fedsim.averaging.weighted_average`. The option names (MERGES, HEADS,
HEAD_FEATURES) belong to the torch-free protocol `fedsim.protocol.fusefl`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedsim.protocol.fusefl import HEAD_FEATURES, HEADS, MERGES

__all__ = [
    "MERGES",
    "HEADS",
    "HEAD_FEATURES",
    "COMBINES",
    "Merge",
    "Column",
    "FusedStage",
    "FusedNet",
    "StageModel",
    "Ensemble",
    "stage_modules",
    "stage_output_shapes",
    "build_fused",
    "fused_embedding",
    "ridge_head",
    "column_state",
]

HEAD_RULES = ("avg", "logits", "concat")  # how a FusedNet applies its head
from fedsim.protocol.oneshot import COMBINES  # noqa: E402  (torch-free, shared with the ensemble baseline)


# ------------------------------------------------------------------------------------------------- fusion parts
class Merge(nn.Module):
    """A^k_m: combines the outputs of the previous fused stage's columns into one input of the block's width."""

    def __init__(self, rule: str, num_inputs: int, shape: Sequence[int]) -> None:
        super().__init__()
        if rule not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {rule!r}")
        if num_inputs < 1:
            raise ValueError(f"a merge needs at least one input, got {num_inputs}")
        self.rule = rule
        self.num_inputs = int(num_inputs)
        self.shape = tuple(int(s) for s in shape)  # one input without the batch dimension: (C, H, W) or (D,)
        if rule == "conv1x1":
            c = self.shape[0]
            if len(self.shape) == 3:
                self.adaptor = nn.Conv2d(num_inputs * c, c, kernel_size=1)
            elif len(self.shape) == 1:
                self.adaptor = nn.Linear(num_inputs * c, c)
            else:
                raise ValueError(f"conv1x1 merges (C, H, W) maps or (D,) vectors, got shape {self.shape}")
            with torch.no_grad():  # start at the average: W = [I/M, ..., I/M], b = 0
                eye = torch.eye(c) / num_inputs
                weight = torch.cat([eye] * num_inputs, dim=1)
                self.adaptor.weight.copy_(weight.reshape(self.adaptor.weight.shape))
                self.adaptor.bias.zero_()

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"merge expects {self.num_inputs} inputs, got {len(inputs)}")
        if self.rule == "conv1x1":
            return self.adaptor(torch.cat(list(inputs), dim=1))
        total = inputs[0]
        for h in inputs[1:]:
            total = total + h
        return total / self.num_inputs if self.rule == "avg" else total

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, num_inputs={self.num_inputs}"


class Column(nn.Module):
    """One client's contribution to a stage: its merge (none at stage 1) followed by its block B^k_m."""

    def __init__(self, block: nn.Module, merge: Merge | None = None) -> None:
        super().__init__()
        self.merge = merge
        self.block = block

    def forward(self, inputs):  # noqa: ANN001, ANN201 - a tensor (stage 1) or the previous stage's outputs
        if self.merge is not None:
            inputs = self.merge(inputs)
        return self.block(inputs)


class FusedStage(nn.Module):
    """Stage k of the fused network: M columns side by side, each reading all outputs of stage k-1."""

    def __init__(self, columns: Sequence[Column]) -> None:
        super().__init__()
        if not columns:
            raise ValueError("a fused stage needs at least one column")
        self.columns = nn.ModuleList(columns)

    def forward(self, inputs) -> list[torch.Tensor]:  # noqa: ANN001
        return [column(inputs) for column in self.columns]


class FusedNet(nn.Module):
    """The fused network: stages of columns, then the classifier over the last stage's M outputs.

    `head` is one module (rule "avg": applied to the mean of the final outputs; rule "concat": its layers but the
    last embed each column's output, the last reads their concatenation) or a list of M modules (rule "logits":
    each applied to its own column's output, logits averaged). Without a head the net is a frozen lower part
    (`features` only), as clients receive it.
    """

    def __init__(self, stages: Sequence[FusedStage], head: nn.Module | Sequence[nn.Module] | None = None,
                 head_rule: str = "avg") -> None:
        super().__init__()
        if head_rule not in HEAD_RULES:
            raise ValueError(f"head_rule must be one of {HEAD_RULES}, got {head_rule!r}")
        self.stages = nn.ModuleList(stages)
        self.head_rule = head_rule
        if head is None:
            self.head = None
        elif head_rule == "logits":
            self.head = nn.ModuleList(list(head))  # type: ignore[arg-type]
        else:
            self.head = head

    @property
    def columns_per_stage(self) -> list[int]:
        return [len(stage.columns) for stage in self.stages]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the last stage's columns (x itself, as a one-element list, when there is no stage)."""
        h = x
        for stage in self.stages:
            h = stage(h)
        return h if self.stages else [x]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this FusedNet has no classifier yet (a lower part sent to clients)")
        hs = self.features(x)
        if self.head_rule == "logits":
            logits = [head(h) for head, h in zip(self.head, hs)]
            return _mean(logits)
        if self.head_rule == "concat":
            layers = list(self.head.children())
            pre = nn.Sequential(*layers[:-1])
            return layers[-1](torch.cat([pre(h) for h in hs], dim=1))
        return self.head(_mean(hs))


def _mean(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    total = xs[0]
    for h in xs[1:]:
        total = total + h
    return total / len(xs)


class StageModel(nn.Module):
    """What client m trains at stage k: frozen fused stages 1..k-1 -> its column (A^k_m, B^k_m) -> local head.

    The local head is the rest of the client's own network (blocks of stages k+1..K, then the classifier); it is
    discarded after stage k < K. `train()` keeps the frozen lower part in eval mode, whatever the caller does.
    """

    def __init__(self, lower: FusedNet | None, column: Column, upper: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.lower = lower
        if lower is not None:
            lower.requires_grad_(False)
            lower.eval()
        self.column = column
        self.upper = upper
        self.head = head

    def train(self, mode: bool = True) -> "StageModel":
        super().train(mode)
        if self.lower is not None:
            self.lower.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lower is not None and self.lower.stages:
            with torch.no_grad():
                inputs = self.lower.features(x)
        else:
            inputs = x
        return self.head(self.upper(self.column(inputs)))


# --------------------------------------------------------------------------------------------------- building
def stage_modules(net, stages: int) -> list[nn.Sequential]:  # noqa: ANN001 - a fedsim.models.BlockNet
    """The K stages of `net` as modules (copies): stage k = its blocks [start, stop) of `net.group_blocks(K)`.

    Composed in order they compute exactly `net.features`.
    """
    return [nn.Sequential(*[copy.deepcopy(b) for b in net.blocks[a:b]]) for a, b in net.group_blocks(stages)]


@torch.no_grad()
def stage_output_shapes(modules: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Output shape (without batch) of each module composed in order, from one probe input."""
    h = torch.zeros(2, *input_shape)
    shapes = []
    for module in modules:
        was = module.training
        module.eval()
        h = module(h)
        module.train(was)
        shapes.append(tuple(h.shape[1:]))
    return shapes


def build_fused(stage_templates: Sequence[nn.Module], columns: Sequence[int], merge: str,
                input_shape: Sequence[int], head: nn.Module | None = None, num_heads: int | None = None,
                head_rule: str = "avg") -> FusedNet:
    """A `FusedNet` skeleton with `columns[k]` columns at stage k (copies of the templates; load weights after).

    `head`: template of the classifier; with head_rule "logits" it is copied `num_heads` times (default: the
    number of columns of the last stage). Without `head`, the result is a lower part.
    """
    shapes = stage_output_shapes(stage_templates[: len(columns)], input_shape) if columns else []
    stages = []
    for k, m in enumerate(columns):
        cols = []
        for _ in range(int(m)):
            mrg = Merge(merge, columns[k - 1], shapes[k - 1]) if k > 0 else None
            cols.append(Column(copy.deepcopy(stage_templates[k]), mrg))
        stages.append(FusedStage(cols))
    heads = None
    if head is not None:
        if head_rule == "logits":
            count = num_heads if num_heads is not None else columns[-1]
            heads = [copy.deepcopy(head) for _ in range(count)]
        else:
            heads = copy.deepcopy(head)
    net = FusedNet(stages, heads, head_rule=head_rule)
    return net.eval()


def fused_embedding(lower: FusedNet, head: nn.Module, x: torch.Tensor, features: str = "mean") -> torch.Tensor:
    """e(x): the final columns' outputs through `head`'s layers but the last (pooling, flatten), averaged over
    columns ("mean", width d) or concatenated ("concat", width M d)."""
    pre = nn.Sequential(*list(head.children())[:-1])
    embs = [pre(h) for h in lower.features(x)]
    if features == "concat":
        return torch.cat(embs, dim=1)
    return _mean(embs)


def ridge_head(head: nn.Module, weights: np.ndarray) -> nn.Module:
    """A copy of `head` whose last (linear) layer holds the ridge solution `weights` ((e + 1) x c, bias last row);
    its input width becomes e (d for "mean" features, M d for "concat")."""
    new = copy.deepcopy(head)
    layers = list(new.named_children())
    name, last = layers[-1]
    if not isinstance(last, nn.Linear):
        raise ValueError(f"the head's last layer must be nn.Linear, got {type(last).__name__}")
    w = torch.as_tensor(np.asarray(weights), dtype=last.weight.dtype)
    fc = nn.Linear(w.shape[0] - 1, w.shape[1])
    with torch.no_grad():
        fc.weight.copy_(w[:-1].T)
        fc.bias.copy_(w[-1])
    setattr(new, name, fc)
    return new


def column_state(column: Column) -> dict[str, np.ndarray]:
    """What a client uploads for its column: every parameter and buffer of (merge, block), as numpy arrays."""
    return {k: v.detach().cpu().numpy() for k, v in column.state_dict().items()}


# ---------------------------------------------------------------------------------------------- ensemble baseline
class Ensemble(nn.Module):
    """The M local models side by side; output = log of the mean softmax ("softmax") or the mean logits.

    Returning log-probabilities keeps cross-entropy evaluation meaningful (it is the ensemble's NLL) and the
    argmax equal to that of the averaged probabilities.
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "softmax") -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.models]
        if self.combine == "logits":
            return _mean(outs)
        probs = _mean([torch.softmax(o, dim=1) for o in outs])
        return torch.log(probs.clamp_min(1e-30))
