"""Client part of the class-incremental strategies (finetune, LwF, LwF + NCM, joint, and DPCR's backbone).

Stateless between messages: every message carries the global backbone (``arrays``), for LwF the previous task's
model (``old-arrays``) and a ``cil`` ConfigRecord naming the phase and the classes whose data to use. A client's
share of a task is the samples of its partition whose class belongs to the task (class-incremental: a task holds
every sample of its classes).

Phases:
- ``train``: ``client.epochs`` epochs of SGD from the global model on the share of ``data_classes``; the loss is
  ``ce`` (cross-entropy over the logits of ``classes``, the seen classes: task 0, fine-tuning, joint training) or
  ``lwf`` (Li & Hoiem, "Learning without Forgetting", TPAMI 2017: cross-entropy over the new classes' logits plus
  lambda * KD(old model's logits of the old classes, temperature T), as in the official DPCR/PyCIL code).
  Reply: the model and ``num-examples`` (FedAvg's example weight), like ``clients.sgd``.
- ``class-means``: per-class count and sum of the L2-normalized embeddings (nearest-class-mean prototypes);
  additive, so groups and the server sum them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from clients.sgd import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY, SGDClient, from_arrayrecord, scenario_model, \
    to_arrayrecord
from fedsim.engine.client import ClientEnv, train_split
from fedsim.training import arrays_to_state, predict_logits, state_to_arrays, train_epochs

CONFIG_KEY = "cil"  # ConfigRecord: phase, classes, data_classes, new_classes, old_classes, loss, lwf_lambda, T
OLD_KEY = "old-arrays"  # the previous task's model
STATS_KEY = "stats"  # ArrayRecord of additive statistics

PHASES = ("train", "class-means")
LOSSES = ("ce", "lwf")


# ----------------------------------------------------------------------------------------------- helpers
class _Embedder(nn.Module):
    """``model.embed`` as a module, so ``fedsim.training.predict_logits`` batches it in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def embed(model: nn.Module, x: torch.Tensor, device: str = "cpu", batch_size: int = 1024) -> torch.Tensor:
    """Backbone embeddings (n, feature_dim), float32 on the CPU, eval mode, no gradients."""
    if len(x) == 0:
        return torch.zeros(0, model.feature_dim)
    return predict_logits(_Embedder(model), x, batch_size=batch_size, device=device)


def load_model(config, arrays: ArrayRecord, num_classes: int, input_shape: tuple) -> nn.Module:  # noqa: ANN001
    model = scenario_model(config, num_classes, input_shape)
    arrays_to_state(model, from_arrayrecord(arrays))
    return model


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


def kd_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF's distillation as in PyCIL: -sum softmax(teacher / T) * log_softmax(logits / T), mean over the batch."""
    log_p = torch.log_softmax(logits / temperature, dim=1)
    q = torch.softmax(teacher / temperature, dim=1)
    return -(q * log_p).sum() / logits.shape[0]


def lwf_distillation(old_model: nn.Module, old_classes: list[int], lam: float, temperature: float):  # noqa: ANN201
    """``extra_loss`` for ``fedsim.training.train_epochs``: lambda * KD on the old classes' logits."""
    cols = torch.as_tensor(old_classes, dtype=torch.long)
    old_model.eval()
    for p in old_model.parameters():
        p.requires_grad_(False)

    def extra(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        c = cols.to(logits.device)
        with torch.no_grad():
            teacher = old_model(xb)[:, c]
        return lam * kd_loss(logits[:, c], teacher, temperature)

    return extra


def task_share(env: ClientEnv, classes: list[int]):  # noqa: ANN201
    """This client's samples of ``classes`` (LabeledData)."""
    data = env.train_data()
    mask = np.isin(data.labels, np.asarray(classes, dtype=np.int64))
    return data.subset(np.flatnonzero(mask))


def pack(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def ints(record: ConfigRecord, key: str) -> list[int]:
    return [int(v) for v in record.get(key, [])]


# --------------------------------------------------------------------------------------------- the client
class CILClient:
    """Backbone training (``train``) and nearest-class-mean statistics (``class-means``) on a task's share."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        cfg = content.config_records[CONFIG_KEY]
        phase = str(cfg["phase"])
        if phase == "train":
            return self.train_backbone(content, cfg, env)
        if phase == "class-means":
            return self.class_means(content, cfg, env)
        return self.other_phase(phase, content, cfg, env)

    def other_phase(self, phase: str, content: RecordDict, cfg: ConfigRecord, env: ClientEnv) -> RecordDict:
        raise ValueError(f"unknown phase {phase!r}")

    def _dataset_shape(self, env: ClientEnv) -> tuple[int, tuple]:
        full = train_split(env.config)
        return full.num_classes, full.input_shape

    def train_backbone(self, content: RecordDict, cfg: ConfigRecord, env: ClientEnv) -> RecordDict:
        num_classes, shape = self._dataset_shape(env)
        classes = ints(cfg, "classes")
        data = task_share(env, ints(cfg, "data_classes"))
        model = load_model(env.config, content[ARRAYS_KEY], num_classes, shape)
        loss = str(cfg["loss"])
        extra = None
        if loss == "lwf":
            old = load_model(env.config, content[OLD_KEY], num_classes, shape).to(env.device)
            loss_fn = restricted_ce(ints(cfg, "new_classes"), num_classes)
            extra = lwf_distillation(old, ints(cfg, "old_classes"), float(cfg["lwf_lambda"]),
                                     float(cfg["temperature"]))
        elif loss == "ce":
            loss_fn = restricted_ce(classes, num_classes)
        else:
            raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
        c = env.config.client
        stats = train_epochs(model, data.x, data.y, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                             momentum=c.momentum, weight_decay=c.weight_decay, optimizer=c.optimizer, seed=env.seed,
                             device=env.device, loss_fn=loss_fn, extra_loss=extra)
        train_loss = float(stats["loss"])
        return RecordDict({
            ARRAYS_KEY: to_arrayrecord(state_to_arrays(model.cpu())),
            METRICS_KEY: MetricRecord({WEIGHT_KEY: int(len(data)),
                                       "train_loss": train_loss if np.isfinite(train_loss) else 0.0}),
        })

    def class_means(self, content: RecordDict, cfg: ConfigRecord, env: ClientEnv) -> RecordDict:
        num_classes, shape = self._dataset_shape(env)
        classes = ints(cfg, "classes")
        data = task_share(env, classes)
        model = load_model(env.config, content[ARRAYS_KEY], num_classes, shape)
        z = nn.functional.normalize(embed(model, data.x, env.device).double(), dim=1).numpy()
        pos = class_lookup(classes, num_classes).numpy()[data.labels]
        counts = np.bincount(pos, minlength=len(classes)).astype(np.int64)
        sums = np.zeros((len(classes), z.shape[1]))
        np.add.at(sums, pos, z)
        return RecordDict({STATS_KEY: pack({"classes": np.asarray(classes, np.int64), "count": counts, "sum": sums}),
                           METRICS_KEY: MetricRecord({WEIGHT_KEY: int(len(data))})})

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """A group's replies as one: FedAvg's example-weighted average for models, sums for statistics."""
        if ARRAYS_KEY in replies[0]:
            return SGDClient.reduce(replies)
        stats = [{k: v.numpy() for k, v in r[STATS_KEY].items()} for r in replies]
        out = {"classes": stats[0]["classes"]}
        for key in stats[0]:
            if key != "classes":
                out[key] = sum(s[key] for s in stats)
        n = sum(int(r[METRICS_KEY][WEIGHT_KEY]) for r in replies)
        return RecordDict({STATS_KEY: pack(out), METRICS_KEY: MetricRecord({WEIGHT_KEY: n})})
