"""FuseFL's learner: what only FuseFL builds on top of the one-shot framework's fused network.

FuseFL (Tang et al., "FuseFL: One-Shot Federated Learning through the Lens of Causality with Progressive Model
Fusion", NeurIPS 2024, arXiv 2410.20380). A network is cut into K stages B^1..B^K (contiguous groups of a
`fedsim.nn.models.BlockNet`'s blocks) plus a head. With M clients, stage k = 1..K is one round:

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
    classifier (strategy.head): avg:    logits = head_avg(sum_m h^K_m),  head_avg = parameter mean of head_m
                                        (the sum of the final features, as the official code; head rule "sum")
                                recalibrated (the published method): the avg head, then retrained on virtual
                                        features: clients send per-class (n_c, mu_c, S_c) of f(x) = sum_m
                                        e_m(x) (e_m: column m's pooled final output), the server pools them
                                        (`pooled_class_gaussians`), draws N(mu_c, Sigma_c) samples per class
                                        (`virtual_features`) and trains the head's linear layer on them with
                                        SGD (`recalibrate_head`; CCVR, Luo et al. 2021)
                                logits: logits = (1/M) sum_m head_m(h^K_m)
                                ridge:  one more round, after stage K: with z(x) = [e(x), 1], e(x) the mean (or the
                                        concatenation) over columns of the pooled final outputs, clients send
                                        Z_m^T Z_m and Z_m^T Y_m; the server solves the ridge regression
                                        W = (sum_m Z_m^T Z_m + gamma I)^-1 sum_m Z_m^T Y_m  (`fedsim.analytic`),
                                        the least-squares head on everybody's data, exactly.

Frozen stages always run in eval mode (their BatchNorm statistics are those the clients uploaded; the official
code leaves them in train mode so they drift). The fused network grows with M: M columns per stage.
The result, `FusedNet`, is a plain `torch.nn.Module` (inference needs torch and `fedsim.frameworks.oneshot`).

The fused network's parts (`Merge`, `Column`, `FusedStage`, `FusedNet`, `stage_modules`, `build_fused`,
`fused_embedding`) and the head recalibration (`class_statistics_of`, `pooled_class_gaussians`,
`virtual_features`, `recalibrated_head`) are shared with the one-shot baselines, so they live in
`fedsim.frameworks.oneshot`; here are FuseFL's own pieces: `StageModel` (what a client trains at stage k) and
`ridge_head` (the ridge head's classifier). Model averages (FuseFL's "avg" head) use
`fedsim.averaging.weighted_average`. The option names are in the torch-free `fedsim.algorithms.fusefl.protocol`
(HEADS, HEAD_FEATURES) and `fedsim.frameworks.oneshot_protocol` (MERGES).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fedsim.frameworks.oneshot import Column, FusedNet

__all__ = ["StageModel", "ridge_head"]


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
