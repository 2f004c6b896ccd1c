"""Class-incremental baselines on the same task stream as DPCR: finetune, LwF, LwF + NCM, joint training.

Setting (``stream.kind = "class-incremental"``): the classes arrive in ``stream.tasks`` disjoint groups (seeded
order, ``fedsim.streams.class_incremental``); task t holds every training sample of its classes and nothing is
kept from earlier tasks (exemplar-free), except for ``joint``. Each task's backbone is trained federatedly:
``strategy.local_rounds`` rounds of FedAvg (McMahan et al. 2017) in which every client trains ``client.epochs``
epochs on its share of the task (its partition's samples of the task's classes) and the server averages the
models weighted by sample counts. With ``partition.num_clients = 1`` and ``local_rounds = 1`` this is plain
centralized training, through the same code.

- ``finetune`` (lower bound): cross-entropy over the logits of all classes seen so far, on the new task's data
  only; evaluation with the network's head restricted to the seen classes.
- ``lwf`` (Li & Hoiem, TPAMI 2017, as in PyCIL / the official DPCR code): task 0 cross-entropy; task t >= 1
  CE(new classes' logits, y) + lambda * KD(old classes' logits; previous model's, T), with
  KD(z, z_old) = -(1/B) sum softmax(z_old / T) . log_softmax(z / T); head prediction over the seen classes.
- ``lwf-ncm``: the same backbone, classified by the nearest class mean of L2-normalized embeddings; each class's
  prototype is computed once, right after its task (clients upload per-class sums), and never updated, so it
  shows the raw semantic drift that DPCR corrects.
- ``joint`` (upper bound): at task t, cross-entropy over the seen classes on the data of tasks 0..t.

After task t the server logs a metrics row (``round`` = t + 1, ``accuracy`` = accuracy on the test samples of all
classes seen so far) and finally saves ``accuracy_matrix.csv`` (a[i][j] after task i on task j's classes) and
``summary.json`` with ``final_accuracy``, ``average_incremental_accuracy``, ``forgetting`` and
``backward_transfer`` (``fedsim.continual``). Message rounds are numbered identically in every strategy here and in
DPCR (task t uses rounds t (R + 1) + 1 .. t (R + 1) + R for training and t (R + 1) + R + 1 for statistics), so
finetune/LwF/DPCR runs with the same seed train the same backbones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.cil import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, OLD_KEY, STATS_KEY, WEIGHT_KEY, CILClient, embed
from clients.sgd import from_arrayrecord, scenario_model, to_arrayrecord
from fedsim.continual import AccuracyMatrix
from fedsim.engine import ServerContext, StrategySpec, register_strategy
from fedsim.errors import ConfigError
from fedsim.streams import class_incremental
from fedsim.training import arrays_to_state, predict_logits, state_to_arrays

MAIN = "main"


@dataclass
class CILParams:
    local_rounds: int = 1  # FedAvg rounds per task (each: client.epochs local epochs)

    def validate(self, path: str = "strategy") -> None:
        if self.local_rounds < 1:
            raise ConfigError(f"{path}.local_rounds: {self.local_rounds!r} is out of range; it must be >= 1")


@dataclass
class LwFParams(CILParams):
    lwf_lambda: float = 10.0  # weight of the distillation term
    temperature: float = 2.0  # distillation temperature T

    def validate(self, path: str = "strategy") -> None:
        super().validate(path)
        if not self.lwf_lambda >= 0:
            raise ConfigError(f"{path}.lwf_lambda: {self.lwf_lambda!r} is out of range; it must be >= 0")
        if not self.temperature > 0:
            raise ConfigError(f"{path}.temperature: {self.temperature!r} is out of range; it must be > 0")


def check_class_incremental(config) -> None:  # noqa: ANN001
    """Cross-field checks shared by every class-incremental strategy."""
    name = config.strategy.name
    if config.stream.kind != "class-incremental":
        raise ConfigError(f"stream.kind: {config.stream.kind!r} does not suit {name!r}; it needs "
                          "'class-incremental' (with stream.tasks)")
    if config.rounds not in (1, config.stream.tasks):
        raise ConfigError(f"rounds: {config.rounds} does not match the {config.stream.tasks} tasks; {name} logs one "
                          f"step per task, so leave rounds unset or set it to stream.tasks; FedAvg rounds within a "
                          f"task are strategy.local_rounds")


class CILServer:
    """The task loop every class-incremental strategy shares; subclasses choose the loss and the classifier."""

    loss = "ce"  # loss from task 1 on: "ce" over the seen classes or "lwf"
    cumulative = False  # joint training: the data of every seen task

    def __init__(self, params: CILParams) -> None:
        self.params = params

    # ---- hooks -------------------------------------------------------------------------------------------
    def begin(self, ctx: ServerContext, tasks: list) -> None:
        """Before the first task (e.g. create the classifier)."""

    def after_training(self, ctx: ServerContext, t: int, task_classes: list[int], model: torch.nn.Module,
                       old: torch.nn.Module | None, round_: int) -> dict:
        """After task t's backbone training: statistics rounds; returns extra metrics for the task's row."""
        return {}

    def predict(self, ctx: ServerContext, model: torch.nn.Module, x: torch.Tensor, seen: list[int]
                ) -> dict[str, np.ndarray]:
        """Predicted labels of ``x`` by name; ``MAIN`` is the strategy's, others are companions (own matrices)."""
        logits = predict_logits(model, x, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)
        cols = torch.as_tensor(seen)
        return {MAIN: cols[logits[:, cols].argmax(dim=1)].numpy()}

    def final_summary(self, ctx: ServerContext) -> dict:
        return {}

    def model_state(self, model: torch.nn.Module) -> dict:
        return {"backbone": model.cpu().state_dict()}

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self, ctx: ServerContext) -> None:
        cfg = ctx.config
        train, test = ctx.train_data(), ctx.test_data()
        tasks = class_incremental(train.labels, cfg.stream.tasks, seed=cfg.seed,
                                  first_task_classes=cfg.stream.first_task_classes)
        ctx.set_total_steps(len(tasks))
        task_classes = [t.classes for t in tasks]
        matrices: dict[str, AccuracyMatrix] = {}
        model = scenario_model(cfg, train.num_classes, train.input_shape)
        old = None
        per_task = self.params.local_rounds + 1
        self.begin(ctx, tasks)
        for t, task in enumerate(tasks):
            seen = [c for classes in task_classes[: t + 1] for c in classes]
            old_classes = seen[: len(seen) - len(task.classes)]
            train_loss = self.train_task(ctx, t, task.classes, seen, old_classes, model, old, t * per_task)
            extra = self.after_training(ctx, t, task.classes, model, old, t * per_task + per_task)
            mask = np.isin(test.labels, seen)
            x_test, y_test = test.x[torch.from_numpy(np.flatnonzero(mask))], test.labels[mask]
            preds = self.predict(ctx, model, x_test, seen)
            accs = {}
            for name, pred in preds.items():
                m = matrices.setdefault(name, AccuracyMatrix(task_classes))
                accs[name] = m.record(t, pred, y_test)
            companions = {f"acc_{k}": v for k, v in accs.items() if k != MAIN}
            ctx.log(t + 1, accuracy=accs[MAIN], loss=train_loss, task=t, classes_seen=len(seen), **companions,
                    **extra)
            old = copy.deepcopy(model)
        main = matrices[MAIN]
        ctx.save_table("accuracy_matrix.csv", main.to_frame())
        summary = main.summary()
        summary["num_tasks"] = len(tasks)
        summary["task_classes"] = task_classes
        summary["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
        others = {k: m.summary() for k, m in matrices.items() if k != MAIN}
        if others:
            summary["companions"] = others
        summary.update(self.final_summary(ctx))
        ctx.summary(**summary)
        ctx.save_model(self.model_state(model))

    def train_task(self, ctx: ServerContext, t: int, task_classes: list[int], seen: list[int],
                   old_classes: list[int], model: torch.nn.Module, old: torch.nn.Module | None, base: int) -> float:
        """``local_rounds`` rounds of FedAvg on task t; the model is updated in place. Returns the last train loss."""
        lwf = self.loss == "lwf" and t > 0
        settings = {"phase": "train", "loss": "lwf" if lwf else "ce", "classes": seen,
                    "data_classes": seen if self.cumulative else task_classes}
        if lwf:
            settings.update(new_classes=task_classes, old_classes=old_classes,
                            lwf_lambda=float(self.params.lwf_lambda), temperature=float(self.params.temperature))
        loss = float("nan")
        for r in range(self.params.local_rounds):
            content = RecordDict({ARRAYS_KEY: to_arrayrecord(state_to_arrays(model)),
                                  CONFIG_KEY: ConfigRecord(settings)})
            if lwf:
                content[OLD_KEY] = to_arrayrecord(state_to_arrays(old))
            replies = [r.content for r in ctx.send(content, round=base + r + 1) if r.ok]
            if not replies:
                continue
            merged = CILClient.reduce(replies)
            if int(merged[METRICS_KEY][WEIGHT_KEY]) > 0:
                arrays_to_state(model, from_arrayrecord(merged[ARRAYS_KEY]))
                loss = float(merged[METRICS_KEY]["train_loss"])
        return loss

    def collect(self, ctx: ServerContext, content: RecordDict, round_: int) -> dict[str, np.ndarray] | None:
        """Send a statistics phase and add the replies (they are sums); None when no client answered."""
        replies = [r.content for r in ctx.send(content, round=round_) if r.ok]
        if not replies:
            return None
        merged = CILClient.reduce(replies)
        return {k: v.numpy() for k, v in merged[STATS_KEY].items()}


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
        content = RecordDict({ARRAYS_KEY: to_arrayrecord(state_to_arrays(model)),
                              CONFIG_KEY: ConfigRecord({"phase": "class-means", "classes": task_classes})})
        stats = self.collect(ctx, content, round_)
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

    def model_state(self, model):  # noqa: ANN001, ANN201
        return {"backbone": model.cpu().state_dict(), "prototypes": dict(self.prototypes_)}


for _name, _server, _params, _desc in (
    ("finetune", FinetuneServer, CILParams,
     "Class-incremental fine-tuning (lower bound): CE on each new task, head over the seen classes"),
    ("lwf", LwFServer, LwFParams,
     "Learning without Forgetting (Li & Hoiem 2017): CE on new classes + lambda * KD from the previous model"),
    ("lwf-ncm", LwFNCMServer, LwFParams,
     "LwF backbone with a nearest-class-mean classifier (prototypes stored once, never calibrated)"),
    ("joint", JointServer, CILParams,
     "Joint training (upper bound): at each task, CE on the data of every task so far"),
):
    register_strategy(StrategySpec(name=_name, params=_params, server=_server, client=CILClient, kind="continual",
                                   description=_desc, check=check_class_incremental))
