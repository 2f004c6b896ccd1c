"""Client part of FuseFL: at stage k, train one's own block k (with a local head) on top of the fused stages < k.

The message of stage k carries the fused lower part (every column of stages 1..k-1, frozen) and its layout; the
client rebuilds it, builds its own column for stage k (merge adaptor + block k, from the common initial model
that every node derives from the scenario seed) and trains column + the rest of its own network (blocks of stages
k+1..K and the classifier, its local head) for `epochs_per_stage` (default `client.epochs`) epochs. It uploads
exactly its column's parameters and buffers, and at the last stage also its classifier.
With `strategy.head = "ridge"` there is one more round (K + 1): the client receives the whole fused network
(stages 1..K), runs its data through it once (no training) and uploads the ridge statistics of the fused
embedding with a bias column, Z^T Z (upper triangle, float64) and Z^T Y.
Replies are keyed by partition id, so a node serving several clients concatenates them (`reduce`).
Messages: `fedsim.protocol.fusefl`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.analytic import RidgeStatistics
from fedsim.engine import ClientEnv
from fedsim.engine.node import concatenate_replies
from fedsim.learners.fusefl import Column, Merge, StageModel, build_fused, column_state, fused_embedding, \
    stage_modules, stage_output_shapes
from fedsim.protocol import fusefl as protocol
from fedsim.protocol.fusefl import FuseFLParams
from fedsim.scenario import ScenarioView
from fedsim.training import arrays_to_state, train_epochs


def client_stage_model(view: ScenarioView, params: FuseFLParams, stage: int, columns: list[int],
                       lower_arrays: dict[str, np.ndarray] | None) -> StageModel:
    """Client m's trainable model at `stage` (1-based): frozen fused lower part, own column, own local head."""
    input_shape = view.input_shape
    net = view.initial_model()  # the common initial model
    templates = stage_modules(net, params.stages)
    if len(columns) != stage - 1:
        raise ValueError(f"stage {stage} needs the layout of {stage - 1} fused stages, got {columns}")
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


def head_statistics(view: ScenarioView, params: FuseFLParams, columns: list[int],
                    fused_arrays: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 1024) -> RidgeStatistics:
    """Ridge statistics of [e(x), 1] for the fused embedding e of the K fused stages (strategy.head = "ridge")."""
    num_classes = view.num_classes
    net = view.initial_model()
    templates = stage_modules(net, params.stages)
    fused = build_fused(templates, columns, params.merge, view.input_shape)
    arrays_to_state(fused, fused_arrays)
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
        if stage == p.stages + 1:  # the ridge-head round: statistics of the fused embedding
            stats = head_statistics(env, p, columns, lower_arrays or {}, data.x, data.y)
            return protocol.statistics_reply(pid, stats, len(data))
        model = client_stage_model(env, p, stage, columns, lower_arrays)
        c = env.config.client
        epochs = p.epochs_per_stage if p.epochs_per_stage is not None else c.epochs
        loss = float("nan")
        if len(data) > 0 and epochs > 0:
            stats = train_epochs(model, data.x, data.y, epochs=epochs, batch_size=c.batch_size, lr=c.lr,
                                 momentum=c.momentum, weight_decay=c.weight_decay, optimizer=c.optimizer,
                                 seed=env.seed, device=env.device)
            loss = float(stats.get("loss", float("nan")))
        model.cpu()
        head = None
        if stage == p.stages and p.head != "ridge":
            head = {k: v.detach().numpy() for k, v in model.head.state_dict().items()}
        return protocol.column_reply(pid, column_state(model.column), len(data),
                                     loss if np.isfinite(loss) else 0.0, head)

    reduce = staticmethod(concatenate_replies)  # one node, several clients: records side by side
