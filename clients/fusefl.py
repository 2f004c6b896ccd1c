"""Client part of FuseFL: at stage k, train one's own block k (with a local head) on top of the fused stages < k.

The message of stage k carries the fused lower part (every column of stages 1..k-1, frozen) and its layout; the
client rebuilds it, builds its own column for stage k (a fresh merge adaptor + its block k) and trains column +
the rest of its own network (blocks of stages k+1..K and the classifier, its local head). With
``strategy.warm_start`` (the default, as the official code) the client keeps its own network between stages in
its client state (``env.state``): block k and everything above it continue from where its previous stage left
them; without it they restart from the common initial model every stage (fedsim 0.1's form). It trains with the
local training the stage message carries (the server's ``stage_training``: ``client.epochs`` spread over the K
stages, or ``epochs_per_stage``; batch size, lr, ...), reading no scenario setting, uploads exactly its column's
parameters and buffers, and at the last stage also its classifier.
Round K + 1 (heads "recalibrated" and "ridge"): the client receives the whole fused network (stages 1..K), runs
its data through it once (no training) and uploads statistics of the fused features: per-class count, mean and
centred scatter of the summed final features (recalibrated head) or the ridge statistics Z^T Z, Z^T Y (ridge).
Replies are keyed by partition id, so a node serving several clients concatenates them (`reduce`).
Messages: `fedsim.algorithms.fusefl.protocol` (the class statistics: `fedsim.frameworks.oneshot_protocol`); the fused
network and the class statistics are the one-shot framework's (`fedsim.frameworks.oneshot`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from fedsim.algorithms.fusefl import protocol
from fedsim.algorithms.fusefl.learner import StageModel
from fedsim.algorithms.fusefl.protocol import FuseFLParams
from fedsim.analytic import RidgeStatistics
from fedsim.codec import from_record, to_record
from fedsim.engine import ClientEnv
from fedsim.engine.node import concatenate_replies
from fedsim.frameworks.oneshot import Column, Merge, build_fused, class_statistics_of, fused_embedding, \
    stage_modules, stage_output_shapes
from fedsim.frameworks.oneshot_protocol import class_statistics_reply
from fedsim.nn.training import arrays_to_state, state_to_arrays, train_epochs
from fedsim.scenario import ScenarioView

OWN_KEY = "fusefl.own"  # client state: this client's blocks of the stages not yet fused, and its head
TRAINED_KEY = "fusefl.trained"  # client state: {stage: the last stage it trained, steps: optimizer steps so far}


def own_network(state: RecordDict) -> dict[str, np.ndarray] | None:
    """The client's own (not yet fused) blocks and head kept from its previous stage, None before stage 1."""
    return from_record(state[OWN_KEY]) if OWN_KEY in state else None


def client_stage_model(view: ScenarioView, params: FuseFLParams, stage: int, columns: list[int],
                       lower_arrays: dict[str, np.ndarray] | None,
                       own: dict[str, np.ndarray] | None = None) -> StageModel:
    """Client m's trainable model at `stage` (1-based): frozen fused lower part, own column, own local head.

    `own` (warm start): the client's blocks of stages >= `stage` and head as it left them (keys
    ``stage<j>.<key>``, ``head.<key>``); missing entries start from the common initial model.
    """
    input_shape = view.input_shape
    net = view.initial_model()  # the common initial model
    templates = stage_modules(net, params.stages)
    if len(columns) != stage - 1:
        raise ValueError(f"stage {stage} needs the layout of {stage - 1} fused stages, got {columns}")
    if own:
        for j in range(stage - 1, params.stages):
            part = {k[len(f"stage{j}."):]: v for k, v in own.items() if k.startswith(f"stage{j}.")}
            if part:
                arrays_to_state(templates[j], part)
        head_part = {k[len("head."):]: v for k, v in own.items() if k.startswith("head.")}
        if head_part:
            arrays_to_state(net.head, head_part)
    lower = None
    merge = None
    if stage > 1:
        lower = build_fused(templates, columns, params.merge, input_shape)
        arrays_to_state(lower, lower_arrays or {})
        shape = stage_output_shapes(templates[: stage - 1], input_shape)[-1]
        merge = Merge(params.merge, columns[-1], shape)
    column = Column(templates[stage - 1], merge)
    upper = nn.Sequential(*templates[stage:])
    return StageModel(lower, column, upper, net.head)


def own_after(model: StageModel, stage: int) -> dict[str, np.ndarray]:
    """What the client keeps after training `stage`: its blocks of the later stages and its head (its block of
    `stage` is uploaded and becomes part of the frozen fused network)."""
    out: dict[str, np.ndarray] = {}
    for i, block in enumerate(model.upper):
        out.update((f"stage{stage + i}.{key}", value) for key, value in state_to_arrays(block).items())
    out.update((f"head.{key}", value) for key, value in state_to_arrays(model.head).items())
    return out


def _fused_network(view: ScenarioView, params: FuseFLParams, columns: list[int],
                   fused_arrays: dict[str, np.ndarray]):  # noqa: ANN202
    net = view.initial_model()
    fused = build_fused(stage_modules(net, params.stages), columns, params.merge, view.input_shape)
    arrays_to_state(fused, fused_arrays)
    return net, fused


def head_statistics(view: ScenarioView, params: FuseFLParams, columns: list[int],
                    fused_arrays: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 1024) -> RidgeStatistics:
    """Ridge statistics of [e(x), 1] for the fused embedding e of the K fused stages (strategy.head = "ridge")."""
    num_classes = view.num_classes
    net, fused = _fused_network(view, params, columns, fused_arrays)
    dim = net.feature_dim * (columns[-1] if params.head_features == "concat" else 1)
    stats = RidgeStatistics.zeros(dim + 1, num_classes)
    with torch.inference_mode():
        for start in range(0, len(y), batch_size):
            e = fused_embedding(fused, net.head, x[start:start + batch_size], params.head_features)
            z = torch.cat([e.double(), torch.ones(e.shape[0], 1, dtype=torch.float64)], dim=1)
            stats.update(z.numpy(), y[start:start + batch_size].numpy(), num_classes)
    return stats


class FuseFLClient:
    """Trains its column of stage k on top of the frozen fused stages and uploads it."""

    def __init__(self, params: FuseFLParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        p = self.params
        stage, columns = protocol.stage_of(content)
        data = env.train_data()
        lower_arrays = protocol.fused_of(content)
        pid = env.partition_id
        if stage == p.stages + 1:  # the head round: statistics of the fused features
            if p.head == "ridge":
                stats = head_statistics(env, p, columns, lower_arrays or {}, data.x, data.y)
                return protocol.statistics_reply(pid, stats, len(data))
            net, fused = _fused_network(env, p, columns, lower_arrays or {})
            stats = class_statistics_of(fused, net.head, data.x, data.y, env.num_classes, device=env.device)
            return class_statistics_reply(pid, stats, len(data))
        training = protocol.stage_training_of(content)
        own = own_network(env.state) if p.warm_start else None
        model = client_stage_model(env, p, stage, columns, lower_arrays, own)
        loss, steps = float("nan"), 0
        if len(data) > 0 and training.epochs > 0:
            stats = train_epochs(model, data.x, data.y, **training.train_kwargs(), seed=env.seed, device=env.device)
            loss, steps = float(stats.get("loss", float("nan"))), int(stats["steps"])
        model.cpu()
        if p.warm_start:
            env.state[OWN_KEY] = to_record(own_after(model, stage))
        done = env.state.get(TRAINED_KEY)
        env.state[TRAINED_KEY] = ConfigRecord({"stage": int(stage),
                                               "steps": int(done["steps"] if done is not None else 0) + steps})
        head = state_to_arrays(model.head) if stage == p.stages and p.head != "ridge" else None
        return protocol.column_reply(pid, state_to_arrays(model.column), len(data),
                                     loss if np.isfinite(loss) else 0.0, head)

    reduce = staticmethod(concatenate_replies)  # one node, several clients: records side by side
