"""The one-shot family's torch pieces: the fused network, the ensemble and the head recalibration.

FuseFL (``fedsim.algorithms.fusefl``), the one-shot baselines (``strategies/oneshot.py``, ``clients/oneshot.py``) and
the distillation baselines build on these; none of them knows an algorithm. Extension points:

- the fused network (FuseFL's, Tang et al. NeurIPS 2024, arXiv 2410.20380): ``Merge`` (A^k_m: how a column reads
  the previous stage's M outputs, ``MERGES``), ``Column`` (merge + block), ``FusedStage`` (M columns side by side),
  ``FusedNet`` (stages, then a head applied by one of ``HEAD_RULES``); ``stage_modules`` cuts a
  ``fedsim.nn.models.BlockNet`` into K stages, ``build_fused`` builds a skeleton to load a fused state into,
  ``fused_embedding`` is e(x) of the final columns. The recalibrated ensemble is a ``FusedNet`` of one stage whose
  columns are the M local models.
- ``Ensemble``: the M local models side by side (mean logits or mean softmax, ``COMBINES``).
- the head recalibration (CCVR, Luo et al. 2021; FuseFL's official ``locals/ccvr.py``): clients send per-class
  count, mean and centred scatter of the features the head reads (``class_statistics_of``, a
  ``fedsim.analytic.ClassStatistics`` with ``track_scatter``); the server pools them (``pooled_class_gaussians``),
  draws Gaussian virtual features (``virtual_features``) and trains the head's last linear layer on them
  (``recalibrate_head``); ``recalibrated_head`` is the whole server side, parameterized by
  ``fedsim.frameworks.oneshot_protocol.RecalibrationParams``.

Frozen stages always run in eval mode (their BatchNorm statistics are those the clients uploaded). Everything built
here is a plain ``torch.nn.Module``: inference needs torch and this module, not the simulator. The option names and
the wire form are torch-free, in ``fedsim.frameworks.oneshot_protocol``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.analytic import ClassStatistics
from fedsim.frameworks.oneshot_protocol import COMBINES, COVARIANCES, MERGES

__all__ = [
    "HEAD_RULES",
    "Merge",
    "Column",
    "FusedStage",
    "FusedNet",
    "Ensemble",
    "stage_modules",
    "stage_output_shapes",
    "build_fused",
    "fused_embedding",
    "linear_of",
    "pooled_class_gaussians",
    "virtual_features",
    "recalibrate_head",
    "recalibrated_head",
    "class_statistics_of",
]

HEAD_RULES = ("avg", "sum", "logits", "concat")  # how a FusedNet applies its head


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

    `head` is one module (rule "avg": applied to the mean of the final outputs; "sum": to their sum, as FuseFL's
    averaged head reads them; rule "concat": its layers but the
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
        if self.head_rule == "sum":
            return self.head(_sum(hs))
        return self.head(_mean(hs))


def _sum(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    total = xs[0]
    for h in xs[1:]:
        total = total + h
    return total


def _mean(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return _sum(xs) / len(xs)


def stage_modules(net, stages: int) -> list[nn.Sequential]:  # noqa: ANN001 - a fedsim.nn.models.BlockNet
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
    columns ("mean", width d), summed ("sum": what the averaged head reads) or concatenated ("concat", M d)."""
    pre = nn.Sequential(*list(head.children())[:-1])
    embs = [pre(h) for h in lower.features(x)]
    if features == "concat":
        return torch.cat(embs, dim=1)
    if features == "sum":
        return _sum(embs)
    return _mean(embs)


# ----------------------------------------------------------------------------------------- head recalibration
def pooled_class_gaussians(parts: Sequence[ClassStatistics], rule: str = "unbiased"
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count (c,), mean (c, d), covariance (c, d, d)) of the union of the clients' data, per class.

    "unbiased": the pooled sample covariance S / (N_c - 1) of all N_c features of class c, exactly what
    ``np.cov`` gives on the pooled data. "official": FuseFL's ``locals/ccvr.py``: each client's biased covariance
    C_k = S_k / n_k and mean mu_k pooled as sum_k [(n_k - 1) C_k + n_k mu_k mu_k^T] / (N_c - 1) - (N_c / N_c - 1)
    mu mu^T, whose last coefficient is 0 (operator precedence), so the class mean is never subtracted: a scaled
    second moment around the origin instead of a covariance. Classes with fewer than 2 features get covariance 0.
    """
    if rule not in COVARIANCES:
        raise ValueError(f"rule must be one of {COVARIANCES}, got {rule!r}")
    if not parts:
        raise ValueError("no class statistics to pool")
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    if rule == "unbiased":
        return total.count, total.mean, total.covariance
    parts = [p.copy().grow_classes(total.num_classes) for p in parts]  # one class axis for all
    n = total.count.astype(np.float64)
    denom = np.maximum(n - 1, 1)[:, None, None]
    cov = np.zeros_like(total.scatter)
    for p in parts:
        nk = p.count.astype(np.float64)[:, None, None]
        biased = np.where(nk > 0, p.scatter / np.maximum(nk, 1), 0.0)
        outer = np.einsum("ci,cj->cij", p.mean, p.mean)
        cov += (np.maximum(nk - 1, 0) * biased + nk * outer) / denom
    # the official "- (n / n - 1) * mu mu^T" subtracts 0 * mu mu^T: nothing
    cov = np.where((total.count >= 2)[:, None, None], cov, 0.0)
    return total.count, total.mean, cov


def virtual_features(count: np.ndarray, mean: np.ndarray, cov: np.ndarray, per_class: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` draws from N(mean_c, cov_c) for every class with count_c > 0 (classes in order), float32
    features and int64 labels; seeded, so every process draws the same set."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in np.flatnonzero(np.asarray(count) > 0):
        sym = (cov[c] + cov[c].T) / 2
        xs.append(rng.multivariate_normal(mean[c], sym, size=int(per_class), method="eigh", check_valid="ignore"))
        ys.append(np.full(int(per_class), int(c), dtype=np.int64))
    if not xs:
        raise ValueError("no class with features to draw virtual features from")
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def recalibrate_head(head: nn.Module, features: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float,
                     batch_size: int, momentum: float = 0.0, seed: int = 0) -> tuple[nn.Module, float]:
    """A copy of `head` whose last (linear) layer is trained on (features, labels) with cross-entropy and SGD
    (shuffled batches; `fedsim.nn.training.train_epochs`); its other layers (pooling, flatten) carry no parameters.
    Returns (the new head, the mean loss of the last epoch)."""
    from fedsim.nn.training import train_epochs

    new = copy.deepcopy(head)
    stats = train_epochs(linear_of(new), torch.as_tensor(features), torch.as_tensor(labels), epochs=epochs,
                         batch_size=batch_size, lr=lr, momentum=momentum, seed=seed)
    return new.cpu().eval(), float(stats["loss"])


def recalibrated_head(head: nn.Module, parts: Sequence[ClassStatistics], params: Any, seed: int
                      ) -> tuple[nn.Module, dict]:
    """The whole server-side recalibration: pool the clients' class statistics (`params.recalibration_covariance`),
    draw `params.virtual_per_class` virtual features per class present, train a copy of `head` on them
    (`params`: a `fedsim.frameworks.oneshot_protocol.RecalibrationParams`). Returns (head, facts for the summary)."""
    count, mean, cov = pooled_class_gaussians(parts, params.recalibration_covariance)
    x, y = virtual_features(count, mean, cov, params.virtual_per_class, seed)
    new, loss = recalibrate_head(head, x, y, epochs=params.recalibration_epochs, lr=params.recalibration_lr,
                                 batch_size=params.recalibration_batch_size,
                                 momentum=params.recalibration_momentum, seed=seed)
    return new, {"recalibration_classes": int((count > 0).sum()), "virtual_features": int(len(y)),
                 "recalibration_loss": loss}


@torch.no_grad()
def class_statistics_of(lower: FusedNet, head: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        batch_size: int = 1024, device: str | torch.device = "cpu") -> ClassStatistics:
    """The class statistics (count, mean, centred scatter) of f(x) = sum of the final columns' pooled outputs (what
    the averaged head reads) over a client's data; `lower` runs in eval mode (BatchNorm statistics as uploaded)."""
    lower = lower.eval().to(device)
    stats = ClassStatistics.zeros(linear_of(head).in_features, num_classes, track_scatter=True)
    for start in range(0, len(y), batch_size):
        f = fused_embedding(lower, head.to(device), x[start:start + batch_size].to(device), "sum")
        stats.update(f.double().cpu().numpy(), np.asarray(y[start:start + batch_size]))
    lower.cpu()
    head.cpu()
    return stats


def linear_of(head: nn.Module) -> nn.Linear:
    """The head's last layer, which must be linear (the one the recalibration trains)."""
    children = list(head.children())
    last = children[-1] if children else head
    if not isinstance(last, nn.Linear):
        raise ValueError(f"the head's last layer must be nn.Linear, got {type(last).__name__}")
    return last


# ------------------------------------------------------------------------------------------------- ensemble
class Ensemble(nn.Module):
    """The M local models side by side; output = the mean logits ("logits", FuseFL's baseline) or the log of the
    mean softmax ("softmax").

    With "softmax", returning log-probabilities keeps cross-entropy evaluation meaningful (it is the ensemble's
    NLL) and the argmax equal to that of the averaged probabilities.
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "logits") -> None:
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
