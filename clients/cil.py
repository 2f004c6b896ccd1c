"""Client part of the class-incremental strategies (finetune, LwF, LwF + NCM, joint, and DPCR's backbone).

Stateless between messages: every message carries the global backbone, for LwF the previous task's model, and the
phase with the classes whose data to use and, for training, the local optimization
(``fedsim.frameworks.class_incremental_protocol``; ``class-means``: ``fedsim.algorithms.cil.protocol``). A client's
share of a task is the samples of its partition whose class belongs to the task (class-incremental: a task holds
every sample of its classes). It reads no hyperparameter from the scenario: the request says how to train.

Phases:
- ``train``: the requested epochs of SGD (or Adam) from the global model on the share of ``data_classes``; the loss
  is ``ce`` (cross-entropy over the logits of ``classes``, the seen classes: task 0, fine-tuning, joint training) or
  ``lwf`` (Li & Hoiem, "Learning without Forgetting", TPAMI 2017: cross-entropy over the new classes' logits plus
  lambda * KD(old model's logits of the old classes, temperature T), as in the official DPCR/PyCIL code: the
  soft cross-entropy of ``fedsim.nn.losses.soft_cross_entropy``).
  Reply: the model and ``num-examples`` (FedAvg's example weight).
- ``class-means``: per-class count and sum of the L2-normalized embeddings (nearest-class-mean prototypes);
  additive, so groups and the server sum them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.algorithms.cil.protocol import CLASS_MEANS
from fedsim.engine import ClientEnv
from fedsim.frameworks import class_incremental_protocol as protocol
from fedsim.frameworks.class_incremental import embed, load_model
from fedsim.nn.losses import soft_cross_entropy
from fedsim.nn.training import state_to_arrays, train_epochs


# ----------------------------------------------------------------------------------------------- helpers
def class_lookup(classes: list[int], num_classes: int) -> torch.Tensor:
    """Position of each label in ``classes`` (-1 for labels outside)."""
    lookup = torch.full((num_classes,), -1, dtype=torch.long)
    lookup[torch.as_tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
    return lookup


def restricted_ce(classes: list[int], num_classes: int):  # noqa: ANN201
    """Cross-entropy over the logits of ``classes`` only (the head's other outputs get no gradient)."""
    cols = torch.as_tensor(classes, dtype=torch.long)
    lookup = class_lookup(classes, num_classes)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits[:, cols.to(logits.device)], lookup.to(y.device)[y])

    return loss


def lwf_distillation(old_model: nn.Module, old_classes: list[int], lam: float, temperature: float):  # noqa: ANN201
    """``extra_loss`` for ``fedsim.nn.training.train_epochs``: lambda * KD on the old classes' logits (PyCIL's
    soft cross-entropy, ``fedsim.nn.losses.soft_cross_entropy``)."""
    cols = torch.as_tensor(old_classes, dtype=torch.long)
    old_model.eval()
    for p in old_model.parameters():
        p.requires_grad_(False)

    def extra(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        c = cols.to(logits.device)
        with torch.no_grad():
            teacher = old_model(xb)[:, c]
        return lam * soft_cross_entropy(logits[:, c], teacher, temperature)

    return extra


def task_share(env: ClientEnv, classes: list[int]):  # noqa: ANN201
    """This client's samples of ``classes`` (LabeledData)."""
    data = env.train_data()
    mask = np.isin(data.labels, np.asarray(classes, dtype=np.int64))
    return data.subset(np.flatnonzero(mask))


# --------------------------------------------------------------------------------------------- the client
class CILClient:
    """Backbone training (``train``) and nearest-class-mean statistics (``class-means``) on a task's share."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        phase = protocol.parse_phase(content)
        if phase == protocol.TRAIN:
            return self.train_backbone(content, env)
        if phase == CLASS_MEANS:
            return self.class_means(content, env)
        return self.other_phase(phase, content, env)

    def other_phase(self, phase: str, content: RecordDict, env: ClientEnv) -> RecordDict:
        """A phase of a subclass's protocol (DPCR's statistics)."""
        raise ValueError(f"unknown phase {phase!r}")

    def train_backbone(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        arrays, s, old_arrays = protocol.parse_train_request(content)
        data = task_share(env, s.data_classes)
        model = load_model(env, arrays)
        extra = None
        if s.loss == "lwf":
            old = load_model(env, old_arrays).to(env.device)
            loss_fn = restricted_ce(s.new_classes, env.num_classes)
            extra = lwf_distillation(old, s.old_classes, s.lwf_lambda, s.temperature)
        else:
            loss_fn = restricted_ce(s.classes, env.num_classes)
        module, loss_fn, extra = self.training_objective(content, env, model, s, loss_fn, extra)
        stats = train_epochs(module, data.x, data.y, **s.training.train_kwargs(), seed=env.seed, device=env.device,
                             loss_fn=loss_fn, extra_loss=extra)
        train_loss = float(stats["loss"])
        return protocol.model_reply(state_to_arrays(model.cpu()), len(data),
                                    train_loss if np.isfinite(train_loss) else 0.0)

    def training_objective(self, content: RecordDict, env: ClientEnv, model: nn.Module, settings, loss_fn,  # noqa: ANN001
                           extra):  # noqa: ANN001, ANN201
        """Hook: the (module, loss_fn, extra_loss) ``train_epochs`` runs; a subclass adds a term (EWC's penalty) or
        wraps the forward (ER's replay batch). The module must train ``model``'s parameters."""
        return model, loss_fn, extra

    def class_means(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        arrays, classes, _ = protocol.parse_statistics_request(content)
        data = task_share(env, classes)
        model = load_model(env, arrays)
        z = nn.functional.normalize(embed(model, data.x, env.device).double(), dim=1).numpy()
        pos = class_lookup(classes, env.num_classes).numpy()[data.labels]
        counts = np.bincount(pos, minlength=len(classes)).astype(np.int64)
        sums = np.zeros((len(classes), z.shape[1]))
        np.add.at(sums, pos, z)
        return protocol.statistics_reply({"classes": np.asarray(classes, np.int64), "count": counts, "sum": sums},
                                         len(data))

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A group's replies as one: FedAvg's example-weighted average for models, sums for statistics."""
        return protocol.combine(replies)
