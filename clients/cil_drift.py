"""Client parts of SDC, LDC, FeCAM, online EWC and ER: the class-incremental client (``fedsim.clients.cil``) plus each
method's statistics phase (and, for EWC and ER, what their train phase adds).

- ``SDCClient`` (``sdc-stats``): per new class count and sum of the raw embeddings under the new backbone; from
  task 1 on, the kernel-weighted drift sums of the old prototypes over its share of the task.
- ``LDCClient`` (``ldc-stats``): the same class sums; from task 1 on, the projector fitted by Adam on its share's
  (old, new) embedding pairs from the server's initialization, times its number of samples.
- ``FeCAMClient`` (``fecam-stats``): per class count, sum z, sum T(z) and T(Z)^T T(Z) under the frozen backbone.
- ``EWCClient``: trains with lambda/2 sum F (theta - theta*)^2 added when the request carries a Fisher;
  ``ewc-fisher``: squared batch gradients of the CE over the seen classes on its share, summed, and the batch count.
- ``ERClient``: each training step concatenates a replay batch from its reservoir (``env.state``); ``er-buffer``
  offers its share of the finished task to the reservoir (seeded order) and reports the buffer's size.

Every reply is a sum over samples, so ``reduce`` (the framework's ``combine``) adds a group's replies.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.algorithms.ewc import protocol as ewc_protocol
from fedsim.algorithms.ewc.learner import ewc_penalty, fisher_sums
from fedsim.algorithms.er import protocol as er_protocol
from fedsim.algorithms.er.learner import reservoir_update
from fedsim.algorithms.fecam import protocol as fecam_protocol
from fedsim.algorithms.fecam.learner import fecam_sums
from fedsim.algorithms.ldc import protocol as ldc_protocol
from fedsim.algorithms.ldc.learner import fit_projector
from fedsim.algorithms.sdc import protocol as sdc_protocol
from fedsim.algorithms.sdc.learner import class_sums, drift_sums
from fedsim.clients.cil import CILClient, restricted_ce, task_share
from fedsim.codec import from_record, to_record
from fedsim.engine import ClientEnv
from fedsim.frameworks import class_incremental_protocol as cil
from fedsim.frameworks.class_incremental import embed, load_model


def _embeddings(env: ClientEnv, arrays: dict, x: torch.Tensor) -> np.ndarray:
    return embed(load_model(env, arrays), x, env.device).double().numpy()


def _class_sum_arrays(z: np.ndarray, labels: np.ndarray, classes: list[int]) -> dict[str, np.ndarray]:
    counts, sums = class_sums(z, labels, classes)
    return {"classes": np.asarray(classes, np.int64), "count": counts, "sum": sums}


class _PhaseClient(CILClient):
    """A CILClient with one statistics phase of its own (``phase`` -> ``statistics(content, env)``)."""

    phase = ""

    def other_phase(self, phase: str, content: RecordDict, env: ClientEnv) -> RecordDict:
        if phase != self.phase:
            return super().other_phase(phase, content, env)
        return self.statistics(content, env)

    def statistics(self, content: RecordDict, env: ClientEnv) -> RecordDict:  # pragma: no cover - abstract
        raise NotImplementedError


class SDCClient(_PhaseClient):
    phase = sdc_protocol.STATS_PHASE

    def statistics(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        arrays, classes, old_arrays = cil.parse_statistics_request(content)
        protos, sigma, floor = sdc_protocol.parse_prototypes(content)
        data = task_share(env, classes)
        z_new = _embeddings(env, arrays, data.x)
        out = _class_sum_arrays(z_new, data.labels, classes)
        if old_arrays is not None and protos is not None:
            out.update(drift_sums(_embeddings(env, old_arrays, data.x), z_new, protos, sigma, floor))
        return cil.statistics_reply(out, len(data))


class LDCClient(_PhaseClient):
    phase = ldc_protocol.STATS_PHASE

    def statistics(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        arrays, classes, old_arrays = cil.parse_statistics_request(content)
        init, fit = ldc_protocol.parse_projector(content)
        data = task_share(env, classes)
        z_new = _embeddings(env, arrays, data.x)
        out = _class_sum_arrays(z_new, data.labels, classes)
        if old_arrays is not None and init is not None:
            n = len(data)
            w = fit_projector(_embeddings(env, old_arrays, data.x), z_new, init, seed=env.seed, **fit) if n else init
            out.update(projector_sum=n * w, projector_count=np.array([n], np.int64))
        return cil.statistics_reply(out, len(data))


class FeCAMClient(_PhaseClient):
    phase = fecam_protocol.STATS_PHASE

    def statistics(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        arrays, classes, _ = cil.parse_statistics_request(content)
        beta = float(content.config_records[cil.CONFIG_KEY]["beta"])
        data = task_share(env, classes)
        return cil.statistics_reply(fecam_sums(_embeddings(env, arrays, data.x), data.labels, classes, beta),
                                    len(data))


class EWCClient(_PhaseClient):
    phase = ewc_protocol.FISHER_PHASE

    def training_objective(self, content, env, model, settings, loss_fn, extra):  # noqa: ANN001, ANN201
        penalty = ewc_protocol.parse_penalty(content)
        if penalty is None:
            return model, loss_fn, extra
        fisher, anchor, lam = penalty
        device = env.device
        f = {k: torch.tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in fisher.items()}
        a = {k: torch.tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in anchor.items()}

        def term(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            return ewc_penalty(m, f, a, lam)

        return model, loss_fn, term

    def statistics(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        arrays, classes, _ = cil.parse_statistics_request(content)
        cfg = content.config_records[cil.CONFIG_KEY]
        logit_classes = cil.config_ints(cfg, "logit_classes")
        data = task_share(env, classes)
        model = load_model(env, arrays)
        sums, batches = fisher_sums(model, data.x, data.y, restricted_ce(logit_classes, env.num_classes),
                                    int(cfg["batch_size"]), env.seed, env.device)
        out = {ewc_protocol.PREFIX + k: v for k, v in sums.items()}
        out.update(classes=np.asarray(classes, np.int64), batches=np.array([batches], np.int64))
        return cil.statistics_reply(out, len(data))


class _ReplayForward(nn.Module):
    """``model`` whose training forward appends a replay batch (drawn without replacement from the buffer) to the
    current one, so BatchNorm and the loss see the concatenation, as in Mammoth's ER; ``labels`` of the last
    replay batch are kept for the loss. Evaluation mode forwards unchanged."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        super().__init__()
        self.model = model
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.labels = torch.zeros(0, dtype=torch.long)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        if not self.training or len(self.x) == 0:
            self.labels = torch.zeros(0, dtype=torch.long)
            return self.model(xb)
        idx = torch.randperm(len(self.x), generator=self.gen)[: self.batch_size]
        self.labels = self.y[idx]
        return self.model(torch.cat([xb, self.x[idx].to(xb.device)]))


class ERClient(_PhaseClient):
    phase = er_protocol.BUFFER_PHASE

    def _reservoir(self, env: ClientEnv) -> tuple[np.ndarray, int]:
        stored = env.state.get(er_protocol.STATE_KEY)
        if stored is None:
            return np.zeros(0, np.int64), 0
        arrays = from_record(stored)
        return np.array(arrays["indices"], np.int64), int(np.asarray(arrays["seen"]).reshape(-1)[0])

    def training_objective(self, content, env, model, settings, loss_fn, extra):  # noqa: ANN001, ANN201
        indices, _ = self._reservoir(env)
        if len(indices) == 0:
            return model, loss_fn, extra
        data = env.train_data().subset(indices)
        module = _ReplayForward(model, data.x, data.y, er_protocol.parse_replay(content), env.seed + 1)
        ce = restricted_ce(settings.classes, env.num_classes)

        def replay_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return ce(logits, torch.cat([y, module.labels.to(y.device)]))

        return module, replay_loss, extra

    def statistics(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        _, classes, _ = cil.parse_statistics_request(content)
        capacity = int(content.config_records[cil.CONFIG_KEY]["buffer_size"])
        labels = env.train_data().labels
        share = np.flatnonzero(np.isin(labels, np.asarray(classes, np.int64)))
        rng = np.random.default_rng(env.seed)
        indices, seen = self._reservoir(env)
        indices, seen = reservoir_update(indices, seen, rng.permutation(share), capacity, rng)
        env.state[er_protocol.STATE_KEY] = to_record({"indices": indices, "seen": np.array([seen], np.int64)})
        return cil.statistics_reply({"classes": np.asarray(classes, np.int64),
                                     "buffered": np.array([len(indices)], np.int64),
                                     "offered": np.array([seen], np.int64)}, len(share))
