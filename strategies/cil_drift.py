"""Server parts of SDC, LDC, FeCAM, online EWC and ER on the class-incremental loop
(``fedsim.frameworks.class_incremental``): the same task stream, round numbering and outputs as DPCR and the
baselines of ``fedsim.strategies.cil_baselines``, so runs with the same seed and head train the same backbones.

- ``SDCServer`` / ``LDCServer`` (Yu et al. CVPR 2020; Gomez-Villa et al. ECCV 2024): the LwF backbone, a
  nearest-class-mean classifier on L2-normalized embeddings whose prototypes (class means of raw embeddings, taken
  right after each class's task) are moved after every later task: by the kernel-weighted drift of the current
  task's embeddings (SDC) or by a linear projector old -> new fitted on them (LDC). Companion ``ncm_frozen``: the
  same prototypes never moved (what compensation adds, on the same backbone).
- ``FeCAMServer`` (Goswami et al., NeurIPS 2023): trains the first task only, then keeps the backbone frozen; per
  class a Tukey-transformed prototype and a shrunk, normalized covariance; Mahalanobis decision.
- ``EWCServer`` (online EWC; PyCIL defaults): CE on the new classes + lambda/2 sum F (theta - theta*)^2, the running
  Fisher accumulated after every task from the clients' squared batch gradients.
- ``ERServer`` (reservoir experience replay): **keeps exemplars** (``buffer_size`` images per client); every step
  trains on the current batch concatenated with a replay batch.

The math lives in ``fedsim.algorithms.<name>.learner``; the messages in ``fedsim.algorithms.<name>.protocol``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.algorithms.er import protocol as er_protocol
from fedsim.algorithms.ewc import protocol as ewc_protocol
from fedsim.algorithms.ewc.learner import accumulate_fisher, fisher_from_sums
from fedsim.algorithms.fecam import protocol as fecam_protocol
from fedsim.algorithms.fecam.learner import FeCAM
from fedsim.algorithms.ldc import protocol as ldc_protocol
from fedsim.algorithms.ldc.learner import initial_projector
from fedsim.algorithms.sdc import protocol as sdc_protocol
from fedsim.algorithms.sdc.learner import PrototypeNCM, sdc_shift
from fedsim.engine import ServerContext
from fedsim.frameworks.class_incremental import MAIN, CILServer, IncrementalModel, embed
from fedsim.frameworks.class_incremental_protocol import TrainSettings
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.nn.training import state_to_arrays


def _embed(ctx: ServerContext, model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return embed(model, x, ctx.device, ctx.config.evaluation.batch_size).double().numpy()


def _collect(server: CILServer, ctx: ServerContext, content: RecordDict, round_: int, t: int) -> dict:
    stats = server.collect(ctx, content, round_)
    if stats is None:
        raise RuntimeError(f"no client answered the statistics round of task {t}")
    return stats


# ------------------------------------------------------------------------------------ prototype drift (SDC, LDC)
class _DriftNCMServer(CILServer):
    """LwF backbone + nearest-class-mean prototypes that ``compensate`` moves after each task."""

    loss = "lwf"

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        self.ncm_ = PrototypeNCM()
        self.frozen_ = PrototypeNCM()  # the same prototypes, never moved (companion "ncm_frozen")

    def request(self, ctx: ServerContext, t: int, task_classes: list[int], model: nn.Module, old: nn.Module | None,
                old_classes: list[int]) -> RecordDict:
        raise NotImplementedError

    def compensate(self, ctx: ServerContext, stats: dict, old_classes: list[int]) -> dict:
        raise NotImplementedError

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        old_classes = self.ncm_.classes_.tolist() if self.ncm_.is_fitted else []
        stats = _collect(self, ctx, self.request(ctx, t, task_classes, model, old, old_classes), round_, t)
        extra = self.compensate(ctx, stats, old_classes) if old_classes and old is not None else {}
        for ncm in (self.ncm_, self.frozen_):
            ncm.add_classes(stats["classes"], stats["count"], stats["sum"])
        return extra

    def predict(self, ctx, model, x, seen):  # noqa: ANN001, ANN201
        z = _embed(ctx, model, x)
        return {MAIN: self.ncm_.predict(z), "ncm_frozen": self.frozen_.predict(z)}

    def saved_model(self, ctx, model, seen):  # noqa: ANN001, ANN201
        model = model.cpu()
        return IncrementalModel(model, self.ncm_.classes_.tolist(), ctx.num_classes, weights=self.ncm_.normalized().T,
                                normalize=True, state={"backbone": model.state_dict(),
                                                       "prototypes": dict(self.ncm_.prototypes_)})


class SDCServer(_DriftNCMServer):
    """mu_c <- mu_c + sum_i w_ic (z_i^new - z_i^old) / sum_i w_ic over the current task's samples."""

    def request(self, ctx, t, task_classes, model, old, old_classes):  # noqa: ANN001, ANN201
        protos = self.ncm_.matrix(old_classes) if old_classes else None
        p = self.params
        return sdc_protocol.stats_request(state_to_arrays(model), task_classes,
                                          state_to_arrays(old) if old is not None else None, protos, p.sigma, p.floor)

    def compensate(self, ctx, stats, old_classes):  # noqa: ANN001, ANN201
        delta = sdc_shift(stats)
        self.ncm_.shift(old_classes, delta)
        weight = np.asarray(stats["weight"])
        return {"sdc_shift_norm": float(np.linalg.norm(delta, axis=1).mean()),
                "sdc_kernel_fraction": float(np.mean(np.asarray(stats["kernel"]) / np.maximum(weight, 1e-300)))}


class LDCServer(_DriftNCMServer):
    """mu_c <- mu_c W, W the FedAvg of the clients' projectors fitted by Adam from one seeded initialization."""

    def request(self, ctx, t, task_classes, model, old, old_classes):  # noqa: ANN001, ANN201
        init = initial_projector(model.feature_dim, ctx.derive_seed("ldc-projector", t)) if old_classes else None
        return ldc_protocol.stats_request(state_to_arrays(model), task_classes,
                                          state_to_arrays(old) if old is not None else None, init, self.params)

    def compensate(self, ctx, stats, old_classes):  # noqa: ANN001, ANN201
        n = int(np.asarray(stats["projector_count"]).reshape(-1)[0])
        w = np.asarray(stats["projector_sum"]) / max(n, 1)
        self.ncm_.transform(w)
        return {"ldc_projector_norm": float(np.linalg.norm(w))}


# ------------------------------------------------------------------------------------------------------ FeCAM
class FeCAMModel(IncrementalModel):
    """model.pt of FeCAM: minus the squared Mahalanobis distance of n(T(n(z))) to each class (float64)."""

    def __init__(self, backbone: nn.Module, learner: FeCAM, num_classes: int) -> None:
        super().__init__(backbone, learner.classes_.tolist(), num_classes,
                         state={"backbone": backbone.state_dict(), "fecam": learner})
        protos = learner.prototypes_
        self.beta = float(learner.beta)
        self.register_buffer("prototypes", torch.as_tensor(protos / np.linalg.norm(protos, axis=1, keepdims=True)))
        d = protos.shape[1]
        factors = np.zeros((len(learner.classes_), d, d))  # zero-padded S_c^+ factors
        for k, c in enumerate(learner.classes_.tolist()):
            f = learner._store[c][3]
            factors[k, :, : f.shape[1]] = f
        self.register_buffer("factors", torch.as_tensor(factors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone.embed(x).double()
        z = z / (z.norm(dim=1, keepdim=True) + 1e-8)
        t = torch.log(z) if self.beta == 0 else z.clamp_min(0).pow(self.beta)
        u = nn.functional.normalize(t, dim=1)
        diff = u[:, None, :] - self.prototypes[None, :, :]  # (n, k, d)
        dist = torch.einsum("nkd,kde->nke", diff, self.factors).pow(2).sum(-1)
        out = torch.full((z.shape[0], self.num_classes), float("-inf"), dtype=torch.float64, device=z.device)
        out[:, self.classes] = -dist
        return out


class FeCAMServer(CILServer):
    """First task trained (CE), then the backbone is frozen; per-class Mahalanobis prototypes."""

    loss = "ce"

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        p = self.params
        self.learner_ = FeCAM(beta=p.beta, alpha1=p.alpha1, alpha2=p.alpha2, shrink_times=p.shrink_times,
                              normalize=p.normalize_cov)

    def train_task(self, ctx, t, task_classes, seen, old_classes, model, old, base):  # noqa: ANN001, ANN201
        if t > 0:  # frozen after the first task: no training rounds
            return float("nan")
        return super().train_task(ctx, t, task_classes, seen, old_classes, model, old, base)

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        content = fecam_protocol.stats_request(state_to_arrays(model), task_classes, self.params.beta)
        self.learner_.partial_fit(_collect(self, ctx, content, round_, t))
        return {}

    def predict(self, ctx, model, x, seen):  # noqa: ANN001, ANN201
        return {MAIN: self.learner_.predict(_embed(ctx, model, x))}

    def saved_model(self, ctx, model, seen):  # noqa: ANN001, ANN201
        return FeCAMModel(model.cpu(), self.learner_, ctx.num_classes)


# ------------------------------------------------------------------------------------------------ online EWC
class EWCServer(CILServer):
    """CE on the new classes + lambda/2 sum F (theta - theta*)^2; running Fisher from the clients' sums."""

    loss = "ce"

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        self.fisher_: dict[str, np.ndarray] | None = None
        self.seen_: list[int] = []

    def train_settings(self, ctx, t, task_classes, seen, old_classes):  # noqa: ANN001, ANN201
        if t == 0:
            return super().train_settings(ctx, t, task_classes, seen, old_classes)
        # PyCIL: cross_entropy(logits[:, known:], targets - known), the new classes' logits only
        return TrainSettings("ce", task_classes, task_classes, LocalTraining.from_settings(ctx.config.client))

    def extend_train_request(self, content, t, model, old):  # noqa: ANN001, ANN201
        if self.fisher_ is None or old is None:
            return content
        return ewc_protocol.extend_train(content, self.fisher_, state_to_arrays(old), self.params.ewc_lambda)

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        known = len(self.seen_)
        self.seen_ += list(task_classes)
        content = ewc_protocol.fisher_request(state_to_arrays(model), task_classes, self.seen_,
                                              ctx.config.client.batch_size)
        stats = _collect(self, ctx, content, round_, t)
        sums = {k[len(ewc_protocol.PREFIX):]: v for k, v in stats.items() if k.startswith(ewc_protocol.PREFIX)}
        batches = int(np.asarray(stats["batches"]).reshape(-1)[0])
        new = fisher_from_sums(sums, batches, self.params.fisher_max)
        self.fisher_ = accumulate_fisher(self.fisher_, new, known, len(self.seen_), self.params.gamma)
        return {"fisher_mean": float(np.mean(np.concatenate([f.ravel() for f in self.fisher_.values()])))}


# ------------------------------------------------------------------------------------------------------- ER
class ERServer(CILServer):
    """CE over the seen classes on the current batch + a replay batch from each client's reservoir buffer."""

    loss = "ce"

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        self.buffered_ = 0
        self.replay_batch_size_ = int(self.params.replay_batch_size or ctx.config.client.batch_size)

    def extend_train_request(self, content, t, model, old):  # noqa: ANN001, ANN201
        return er_protocol.extend_train(content, self.replay_batch_size_)

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        stats = _collect(self, ctx, er_protocol.buffer_request({}, task_classes, self.params.buffer_size), round_, t)
        self.buffered_ = int(np.asarray(stats["buffered"]).reshape(-1)[0])
        return {"exemplars": self.buffered_}

    def final_summary(self, ctx: ServerContext) -> dict:
        image_bytes = int(np.prod(ctx.input_shape))  # uint8 pixels
        return {"uses_exemplars": True, "exemplars": self.buffered_, "exemplar_bytes": self.buffered_ * image_bytes}
