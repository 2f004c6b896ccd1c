"""The class-incremental server loop every class-incremental strategy runs on (finetune, LwF, LwF + NCM, joint,
DPCR), and the model factories its server and client parts share.

Setting (``stream.kind = "class-incremental"``): the classes arrive in ``stream.tasks`` disjoint groups (seeded
order, ``fedsim.data.streams.class_incremental``); task t holds every training sample of its classes. Messages follow
``fedsim.frameworks.class_incremental_protocol`` (the train phase, the statistics requests and replies, the shared
parameters), which a strategy extends with its own statistics phases.

The loop (``CILServer.run``), per task t with the seen classes S_t (tasks 0..t) and R = ``strategy.local_rounds``:

1. ``train_task``: R rounds of FedAvg. Each round sends the global model and the phase settings (loss ``ce`` over
   S_t, or from task 1 on with ``loss = "lwf"`` CE over the new classes + KD from the previous task's model, which
   travels along) and the local training (the scenario's ``[client]`` table: epochs, batch size, optimizer); every
   client trains as the request says on its samples of the task's classes (of S_t with ``cumulative = True``, joint
   training), and the server replaces the model by the example-weighted average.
2. ``after_training`` (hook): statistics rounds of the strategy (``collect`` sends one and sums the replies);
   returns extra metrics for the task's row.
3. Evaluation on the test samples of S_t with ``predict`` (hook): the head restricted to S_t by default; a
   strategy may return companion predictions (other classifiers on the same backbone), each with its own matrix.
4. One metrics row: ``round`` = t + 1, ``accuracy`` (the main prediction), ``loss`` (last train loss), ``task``,
   ``classes_seen``, ``acc_<companion>`` and the extras. The model is copied as the next task's previous model.

At the end: ``accuracy_matrix.csv`` (a[i][j] after task i on task j's classes), ``summary.json`` with the continual
metrics of ``fedsim.results.continual`` (``final_accuracy``, ``average_incremental_accuracy``, ``forgetting``,
``backward_transfer``), ``num_tasks``, ``task_classes``, ``num_parameters``, ``companions`` and the
``final_summary`` hook's values, and ``model.pt`` = the ``saved_model`` hook's ``IncrementalModel``: one torch module
that maps images to scores over all classes exactly as the run predicted (the backbone's head, or a classifier on
its embeddings), with the stored statistics readable by key (``model["backbone"]``, ``model["dpcr"]``, ...).

Other hooks: ``begin`` (before the first task; create classifiers), ``train_settings`` (the train phase's loss,
logits and data) and ``extend_train_request`` (a strategy's own records in the train requests). Class attributes
``loss`` ("ce" or "lwf") and ``cumulative`` choose the training.

The network's classifier (``strategy.head``, built by ``initial_model``): ``"cosine"`` for LwF and the methods on its
backbone (lwf, lwf-ncm, dpcr, ridge-uncalibrated), as the official DPCR code trains (PyCIL ``"cosine": true``);
``"linear"`` for finetune and joint (PyCIL's ``IncrementalNet``). Either is one ``--set strategy.head=...`` away. The
embeddings the statistics read (``embed``) are the pooled features before that layer, un-normalized in both cases.

Round numbering: with P = R + 1 message rounds per task, task t uses rounds t P + 1 .. t P + R for training and
t P + R + 1 for statistics (whether the strategy sends any or not). The numbering is the same in every strategy, so
runs of LwF and DPCR (or finetune and joint's first task) with the same seed and head draw the same client seeds and
train the same backbones.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedsim.codec import from_record
from fedsim.errors import ConfigError
from fedsim.data.streams import class_incremental
from fedsim.frameworks import class_incremental_protocol as protocol
from fedsim.frameworks.class_incremental_protocol import CILParams, TrainSettings
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.nn.training import arrays_to_state, predict_logits, state_to_arrays
from fedsim.results.continual import AccuracyMatrix
from fedsim.scenario import ScenarioView

if TYPE_CHECKING:  # the client parts import the factories below without the server's machinery
    from fedsim.engine.server import ServerContext

__all__ = ["MAIN", "CILServer", "IncrementalModel", "embed", "initial_model", "load_model"]

MAIN = "main"  # the strategy's own prediction among those ``predict`` returns


# ------------------------------------------------------------------------------------------ shared factories
class _Embedder(nn.Module):
    """``model.embed`` as a module, so ``fedsim.nn.training.predict_logits`` batches it in eval mode."""

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


def initial_model(view: ScenarioView) -> nn.Module:
    """The scenario's initial network with the strategy's training head (``strategy.head``), on the CPU.

    ``"linear"``: the model as built (``nn.Linear`` with bias); ``"cosine"``: its last layer replaced by
    ``fedsim.nn.models.CosineLinear`` drawn from a seed derived from the scenario's, so the server and every client
    build the same network.
    """
    from fedsim.nn.models import use_cosine_classifier

    model = view.initial_model()
    params: CILParams = view.params  # every class-incremental strategy's parameters derive from CILParams
    if params.head == "cosine":
        use_cosine_classifier(model, seed=view.derive_seed("cosine-head"))
    return model


def load_model(view: ScenarioView, arrays: ArrayRecord | dict[str, np.ndarray]) -> nn.Module:
    """The scenario's network (on the CPU, with the strategy's head) holding ``arrays`` (a record or a dict)."""
    model = initial_model(view)
    arrays_to_state(model, from_record(arrays) if isinstance(arrays, ArrayRecord) else arrays)
    return model


class IncrementalModel(nn.Module):
    """What a class-incremental run saves: ``model(x)`` -> scores (n, num_classes) as the run predicted them.

    With ``weights`` None the backbone's own head scores the ``classes`` seen; otherwise a linear classifier
    (``weights``: embedding dim x len(classes), float64) reads the backbone's embeddings, L2-normalized when
    ``normalize`` (nearest class mean on unit vectors). Classes outside ``classes`` score -inf. The strategy's
    stored state (backbone weights, class statistics, prototypes) stays readable as ``model[key]``.
    """

    def __init__(self, backbone: nn.Module, classes: list[int], num_classes: int,
                 weights: np.ndarray | None = None, normalize: bool = False, state: dict | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.normalize = bool(normalize)
        self.register_buffer("classes", torch.as_tensor(list(classes), dtype=torch.long))
        self.register_buffer("weights", None if weights is None else torch.as_tensor(np.asarray(weights),
                                                                                       dtype=torch.float64))
        self.state = dict(state or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            logits = self.backbone(x)
            out = torch.full_like(logits, float("-inf"))
            out[:, self.classes] = logits[:, self.classes]
            return out
        z = self.backbone.embed(x).double()
        if self.normalize:
            z = nn.functional.normalize(z, dim=1)
        out = torch.full((z.shape[0], self.num_classes), float("-inf"), dtype=torch.float64, device=z.device)
        out[:, self.classes] = z @ self.weights
        return out

    def __getitem__(self, key: str):  # noqa: ANN204
        return self.state[key]


# ---------------------------------------------------------------------------------------------- the loop
class CILServer:
    """The task loop every class-incremental strategy shares; subclasses choose the loss and the classifier."""

    loss = "ce"  # loss from task 1 on: "ce" over the seen classes or "lwf"
    cumulative = False  # joint training: the data of every seen task

    def __init__(self, params: CILParams) -> None:  # or a subclass (LwFParams, DPCRParams)
        self.params = params

    # ---- hooks -------------------------------------------------------------------------------------------
    def tasks(self, ctx: ServerContext) -> list:
        """The task stream (``fedsim.data.streams.Task``): disjoint classes in a seeded order. A strategy whose
        clients select a task's samples by its indices may override it (the generalized streams of G-ACIL);
        the default clients take every sample of a task's classes, so ``stream.generalized`` is refused here."""
        s = ctx.config.stream
        if s.generalized:
            raise ConfigError(f"stream.generalized: {ctx.config.strategy.name!r} trains on every sample of a task's "
                              "classes, so classes cannot recur across its tasks; set stream.generalized = false "
                              "or use a strategy that reads it (acil, g-acil, ds-al)")
        return class_incremental(ctx.train_data().labels, s.tasks, seed=ctx.config.seed,
                                 first_task_classes=s.first_task_classes)

    def begin(self, ctx: ServerContext, tasks: list) -> None:
        """Before the first task (e.g. create the classifier)."""

    def after_training(self, ctx: ServerContext, t: int, task_classes: list[int], model: nn.Module,
                       old: nn.Module | None, round_: int) -> dict:
        """After task t's backbone training: statistics rounds; returns extra metrics for the task's row."""
        return {}

    def predict(self, ctx: ServerContext, model: nn.Module, x: torch.Tensor, seen: list[int]
                ) -> dict[str, np.ndarray]:
        """Predicted labels of ``x`` by name; ``MAIN`` is the strategy's, others are companions (own matrices)."""
        logits = predict_logits(model, x, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)
        cols = torch.as_tensor(seen)
        return {MAIN: cols[logits[:, cols].argmax(dim=1)].numpy()}

    def final_summary(self, ctx: ServerContext) -> dict:
        """Extra summary.json values."""
        return {}

    def saved_model(self, ctx: ServerContext, model: nn.Module, seen: list[int]) -> IncrementalModel:
        """What model.pt holds: by default the backbone's head over the seen classes."""
        model = model.cpu()
        return IncrementalModel(model, seen, ctx.num_classes, state={"backbone": model.state_dict()})

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self, ctx: ServerContext) -> None:
        cfg = ctx.config
        train, test = ctx.train_data(), ctx.test_data()
        tasks = self.tasks(ctx)
        ctx.set_total_steps(len(tasks))
        task_classes = [t.classes for t in tasks]
        matrices: dict[str, AccuracyMatrix] = {}
        model = initial_model(ctx)
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
        ctx.save_model(self.saved_model(ctx, model, seen))

    def train_task(self, ctx: ServerContext, t: int, task_classes: list[int], seen: list[int],
                   old_classes: list[int], model: nn.Module, old: nn.Module | None, base: int) -> float:
        """``local_rounds`` rounds of FedAvg on task t (rounds base + 1 ..); the model is updated in place.

        Returns the last round's example-weighted train loss (nan if no round had a client with data).
        """
        lwf = self.loss == "lwf" and t > 0
        settings = self.train_settings(ctx, t, task_classes, seen, old_classes)
        loss = float("nan")
        for i in range(self.params.local_rounds):
            content = protocol.train_request(state_to_arrays(model), settings, state_to_arrays(old) if lwf else None)
            content = self.extend_train_request(content, t, model, old)
            merged = protocol.merge_models([r.content for r in ctx.send(content, round=base + i + 1) if r.ok])
            if merged is None:
                continue
            arrays, weight, merged_loss = merged
            if weight > 0:
                arrays_to_state(model, arrays)
                loss = merged_loss
        return loss

    def train_settings(self, ctx: ServerContext, t: int, task_classes: list[int], seen: list[int],
                       old_classes: list[int]) -> TrainSettings:
        """Hook: what task t's train rounds ask of the clients (loss, logits, data, local training)."""
        data_classes = seen if self.cumulative else task_classes
        training = LocalTraining.from_settings(ctx.config.client)
        if self.loss == "lwf" and t > 0:
            return TrainSettings("lwf", seen, data_classes, training, new_classes=task_classes,
                                 old_classes=old_classes, lwf_lambda=float(self.params.lwf_lambda),
                                 temperature=float(self.params.temperature))
        return TrainSettings("ce", seen, data_classes, training)

    def extend_train_request(self, content: RecordDict, t: int, model: nn.Module, old: nn.Module | None
                             ) -> RecordDict:
        """Hook: add a strategy's own records to a train request (EWC's Fisher and anchor, ER's replay settings)."""
        return content

    def collect(self, ctx: ServerContext, content: RecordDict, round_: int) -> dict[str, np.ndarray] | None:
        """Send a statistics phase and add the replies (they are sums); None when no client answered."""
        return protocol.merge_statistics([r.content for r in ctx.send(content, round=round_) if r.ok])
