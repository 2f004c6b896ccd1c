"""Class-incremental baselines on the same task stream as DPCR: finetune, LwF, LwF + NCM, joint training.

Exemplar-free: task t holds every training sample of its classes and nothing is kept from earlier tasks, except
for ``joint``. Each task's backbone is trained federatedly by the loop of ``fedsim.frameworks.class_incremental`` (R rounds of
FedAvg, McMahan et al. 2017; with ``partition.num_clients = 1`` and ``local_rounds = 1`` this is plain centralized
training, through the same code); messages follow ``fedsim.frameworks.class_incremental_protocol`` plus the
``class-means`` phase of ``fedsim.algorithms.cil.protocol``.

- ``finetune`` (lower bound): cross-entropy over the logits of all classes seen so far, on the new task's data
  only; evaluation with the network's head restricted to the seen classes.
- ``lwf`` (Li & Hoiem, TPAMI 2017, as in PyCIL / the official DPCR code): task 0 cross-entropy; task t >= 1
  CE(new classes' logits, y) + lambda * KD(old classes' logits; previous model's, T), with
  KD(z, z_old) = -(1/B) sum softmax(z_old / T) . log_softmax(z / T); head prediction over the seen classes.
- ``lwf-ncm``: the same backbone, classified by the nearest class mean of L2-normalized embeddings; each class's
  prototype is computed once, right after its task (clients upload per-class sums), and never updated, so it
  shows the raw semantic drift that DPCR corrects.
- ``joint`` (upper bound): at task t, cross-entropy over the seen classes on the data of tasks 0..t.

Outputs (metrics rows per task, accuracy matrix, continual summary) and the round numbering are the loop's, the
same as DPCR's, so finetune/LwF/DPCR runs with the same seed train the same backbones.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.algorithms.cil import protocol
from fedsim.engine import ServerContext
from fedsim.frameworks.class_incremental import MAIN, CILServer, IncrementalModel, embed
from fedsim.nn.training import state_to_arrays


class FinetuneServer(CILServer):
    loss = "ce"


class JointServer(CILServer):
    loss = "ce"
    cumulative = True


class LwFServer(CILServer):
    loss = "lwf"


class LwFNCMServer(LwFServer):
    """LwF's backbone, nearest-class-mean classifier on L2-normalized embeddings (prototypes never updated)."""

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        self.prototypes_: dict[int, np.ndarray] = {}

    def after_training(self, ctx, t, task_classes, model, old, round_):  # noqa: ANN001, ANN201
        stats = self.collect(ctx, protocol.class_means_request(state_to_arrays(model), task_classes), round_)
        if stats is not None:
            for c, n, s in zip(stats["classes"], stats["count"], stats["sum"]):
                if n > 0:
                    mean = s / n
                    self.prototypes_[int(c)] = mean / max(np.linalg.norm(mean), 1e-12)
        return {}

    def predict(self, ctx, model, x, seen):  # noqa: ANN001, ANN201
        known = [c for c in seen if c in self.prototypes_]
        z = torch.nn.functional.normalize(embed(model, x, ctx.device, ctx.config.evaluation.batch_size).double(),
                                          dim=1).numpy()
        protos = np.stack([self.prototypes_[c] for c in known])
        # unit vectors: the nearest mean in Euclidean distance is the one with the largest inner product
        return {MAIN: np.asarray(known)[np.argmax(z @ protos.T, axis=1)]}

    def saved_model(self, ctx, model, seen):  # noqa: ANN001, ANN201
        known = [c for c in seen if c in self.prototypes_]
        model = model.cpu()
        return IncrementalModel(model, known, ctx.num_classes, weights=np.stack([self.prototypes_[c] for c in known]).T,
                                normalize=True,
                                state={"backbone": model.state_dict(), "prototypes": dict(self.prototypes_)})
