"""DPCR: Dual-Projection shift estimation and Classifier Reconstruction, centralized and federated.

He et al., "Dual-Projection Shift Estimation and Classifier Reconstruction for Exemplar-Free Class-Incremental
Learning", ICML 2025 (arXiv 2503.05423); official code github RHe502/ICML25-DPCR. Exemplar-free: no image of an
old class is kept, only per-class statistics of backbone features x (rows, d = the backbone's embedding width).

Per task t (classes arriving as in ``fedsim.frameworks.class_incremental``, messages of ``fedsim.algorithms.dpcr.protocol``):

1. Backbone: task 0 cross-entropy; t >= 1 LwF, CE(new classes) + lambda * KD(old logits, T), trained by
   ``local_rounds`` rounds of FedAvg over the clients' shares of the task (one client = centralized training).
   The previous backbone f_old is kept for TSSP.
2. Statistics pass (one more round): each client sends, for the new classes, n_c, sum x and Phi_c = X_c^T X_c under
   f_new, and the TSSP pair X_old^T X_old, X_old^T X_new over its share. The server adds them: the sums are exact,
   so federated DPCR equals centralized DPCR given the same backbone. A client that fails in this round contributes
   nothing for this task (the sums cover the clients that answered, as in AFL).
3. TSSP: Delta = (X_old^T X_old + eps I)^-1 X_old^T X_new.  CIP: P_c = U_c U_c^T from the eigenvectors of Phi_c
   above the tolerance ``cip_tol`` (default 0: the official ``S > 0``; ``"rank"``: the numerical rank).
   Calibration of every old class: W_c = Delta P_c; Phi_c <- W_c^T Phi_c W_c; mu_c <- mu_c W_c.
4. Reconstruction: W = (sum_c Phi_c + gamma I)^-1 sum_c n_c mu_c^T e_c with the true class counts n_c (the
   official code uses a constant 500), then class normalization w_c <- w_c / ||w_c|| (CN).

The math lives in ``fedsim.algorithms.dpcr.learner`` (one code path for every deployment). ``tssp``, ``cip`` and
``class_norm`` switch components off for the ablation; ``ridge-uncalibrated`` is the same strategy with all three
off by default (the ridge classifier on stale statistics). ``ablation = true`` additionally evaluates, on the same
backbone and the same statistics, the four ablation classifiers (ridge only, +TSSP, +CIP, +CN), TSSP + CN without
CIP, and the LwF head,
logged as ``acc_*`` columns of metrics.csv and under ``companions`` in summary.json. ``cip_tol_sweep = [t, ...]``
adds the full method at each CIP tolerance t the same way (companions ``cip_tol_<t>``; metrics column
``rank_cip_tol_<t>`` = mean rank of the old classes' projectors; their ranks at the last task in summary.json).

The backbone trains with the cosine head by default (``strategy.head``, see ``fedsim.frameworks.class_incremental``), as in the
official code; the statistics are those of the un-normalized pooled features either way.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedsim.frameworks.class_incremental import MAIN, CILServer, IncrementalModel, embed
from fedsim.engine import ServerContext
from fedsim.algorithms.dpcr.learner import DPCR, decode_statistics
from fedsim.algorithms.dpcr import protocol
from fedsim.nn.training import state_to_arrays

#: The ablation rows of the paper (Table 4): name -> (tssp, cip, class_norm); "tssp_cn" (CN without CIP) is not a
#: row of the paper's table: it separates what CN adds from what CIP adds.
ABLATION = {
    "ridge": (False, False, False),
    "tssp": (True, False, False),
    "tssp_cip": (True, True, False),
    "tssp_cip_cn": (True, True, True),
    "tssp_cn": (True, False, True),
}


class DPCRServer(CILServer):
    """LwF backbone per task (FedAvg), one statistics round, calibration and reconstruction on the server."""

    loss = "lwf"

    def _learner(self, tssp: bool, cip: bool, class_norm: bool, cip_tol: float | str | None = None) -> DPCR:
        p = self.params
        return DPCR(gamma=p.gamma, tssp=tssp, cip=cip, cip_tol=p.cip_tol if cip_tol is None else cip_tol,
                    class_norm=class_norm, tssp_eps=p.tssp_eps)

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        p = self.params
        self.learner_ = self._learner(p.tssp, p.cip, p.class_norm)
        self.companions_ = {k: self._learner(*v) for k, v in ABLATION.items()} if p.ablation else {}
        self.sweep_ = {protocol.sweep_name(t): t if isinstance(t, str) else float(t) for t in p.cip_tol_sweep}
        for name, tol in self.sweep_.items():  # the full method at each tolerance
            self.companions_[name] = self._learner(True, True, p.class_norm, tol)
        self.stat_seconds_ = 0.0

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        needs_drift = self.params.tssp or bool(self.companions_)
        drift_from = state_to_arrays(old) if old is not None and needs_drift else None
        content = protocol.stats_request(state_to_arrays(model), task_classes, drift_from)
        arrays = self.collect(ctx, content, round_)
        if arrays is None:
            raise RuntimeError(f"no client answered the statistics round of task {t}")
        start = time.perf_counter()
        stats, drift = decode_statistics(arrays, ctx.num_classes)
        for learner in (self.learner_, *self.companions_.values()):
            learner.partial_fit(stats, drift if learner.tssp else None)
        self.stat_seconds_ += time.perf_counter() - start
        extra = {"statistics_bytes": self.learner_.statistics_nbytes()}
        if self.learner_.cip_ranks_:
            extra["cip_min_rank"] = min(self.learner_.cip_ranks_.values())
            extra["cip_mean_rank"] = float(np.mean(list(self.learner_.cip_ranks_.values())))
        for name in self.sweep_:
            ranks = self.companions_[name].cip_ranks_
            if ranks:
                extra[f"rank_{name}"] = float(np.mean(list(ranks.values())))
        return extra

    def predict(self, ctx, model, x, seen):  # noqa: ANN001, ANN201
        z = embed(model, x, ctx.device, ctx.config.evaluation.batch_size).double().numpy()
        out = {MAIN: self.learner_.predict(z)}
        if self.params.ablation:
            out["lwf_head"] = super().predict(ctx, model, x, seen)[MAIN]
        out.update({k: learner.predict(z) for k, learner in self.companions_.items()})
        return out

    def final_summary(self, ctx: ServerContext) -> dict:
        learner = self.learner_
        out = {
            "feature_dim": learner.dim_,
            "statistics_bytes": learner.statistics_nbytes(),  # float64, as stored
            "statistics_bytes_float32": learner.statistics_nbytes(np.float32),
            "server_solve_seconds": round(self.stat_seconds_, 4),
            "class_counts": learner.counts_.tolist(),
        }
        if learner.cip_ranks_:  # rank of each old class's projector at the last calibration
            out["cip_ranks"] = {str(c): r for c, r in sorted(learner.cip_ranks_.items())}
        if self.sweep_:
            out["cip_tol_sweep"] = {name: {"cip_tol": tol, "cip_ranks": {str(c): r for c, r in
                                                                         sorted(self.companions_[name].cip_ranks_
                                                                                .items())}}
                                    for name, tol in self.sweep_.items()}
        return out

    def saved_model(self, ctx: ServerContext, model: torch.nn.Module, seen: list[int]) -> IncrementalModel:
        learner = self.learner_
        classes = learner.classes_.tolist()
        model = model.cpu()
        return IncrementalModel(model, classes, ctx.num_classes, weights=learner.coef_[:, classes],
                                state={"backbone": model.state_dict(), "dpcr": learner.get_state(),
                                       "classes": classes})
