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
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn

from clients.sgd import from_arrayrecord, scenario_model, to_arrayrecord
from fedsim.engine.client import ClientEnv, concatenate_replies, train_split
from fedsim.analytic import RidgeStatistics, pack_upper
from fedsim.learners.fusefl import Column, Merge, StageModel, build_fused, column_state, fused_embedding, \
    stage_modules, stage_output_shapes
from fedsim.training import arrays_to_state, train_epochs

STAGE_KEY = "fusefl"  # ConfigRecord: stage (1-based), columns (columns per fused stage so far)
FUSED_KEY = "fused"  # ArrayRecord: state of the fused lower part (stages 1..k-1), FusedNet keys
COLUMN_PREFIX = "column."  # ArrayRecord per client: "column.<pid>"
HEAD_PREFIX = "head."  # ArrayRecord per client at the last stage: "head.<pid>"
STATS_PREFIX = "stats."  # ArrayRecord per client in the ridge-head round: gram (packed), cross
META_PREFIX = "meta."  # MetricRecord per client: num-examples, train_loss
WEIGHT_KEY = "num-examples"


def stage_of(content: RecordDict) -> tuple[int, list[int]]:
    """The stage number and the fused layout (columns per stage) a server message describes."""
    cfg = content.config_records[STAGE_KEY]
    columns = [int(c) for c in cfg.get("columns", [])]
    return int(cfg["stage"]), columns


def stage_message(stage: int, columns: list[int], lower_arrays: dict[str, np.ndarray] | None) -> RecordDict:
    """What the server sends at `stage`: the stage number, the fused layout and (stage > 1) the fused weights."""
    content = RecordDict({STAGE_KEY: ConfigRecord({"stage": int(stage), "columns": [int(c) for c in columns]})})
    if lower_arrays:
        content[FUSED_KEY] = to_arrayrecord(lower_arrays)
    return content


def client_stage_model(config, params, num_classes: int, input_shape: tuple, stage: int, columns: list[int],
                       lower_arrays: dict[str, np.ndarray] | None) -> StageModel:  # noqa: ANN001
    """Client m's trainable model at `stage` (1-based): frozen fused lower part, own column, own local head."""
    net = scenario_model(config, num_classes, input_shape)  # the common initial model
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


def head_statistics(config, params, num_classes: int, input_shape: tuple, columns: list[int],
                    fused_arrays: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 1024) -> RidgeStatistics:  # noqa: ANN001
    """Ridge statistics of [e(x), 1] for the fused embedding e of the K fused stages (strategy.head = "ridge")."""
    net = scenario_model(config, num_classes, input_shape)
    templates = stage_modules(net, params.stages)
    fused = build_fused(templates, columns, params.merge, input_shape)
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

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        stage, columns = stage_of(content)
        data = env.train_data()
        full = train_split(env.config)
        lower_arrays = from_arrayrecord(content[FUSED_KEY]) if FUSED_KEY in content else None
        pid = env.partition_id
        if stage == self.params.stages + 1:  # the ridge-head round: statistics of the fused embedding
            stats = head_statistics(env.config, self.params, full.num_classes, full.input_shape, columns,
                                    lower_arrays or {}, data.x, data.y)
            return RecordDict({
                f"{STATS_PREFIX}{pid}": to_arrayrecord({"gram": pack_upper(stats.gram), "cross": stats.cross}),
                f"{META_PREFIX}{pid}": MetricRecord({WEIGHT_KEY: int(len(data)), "train_loss": 0.0}),
            })
        model = client_stage_model(env.config, self.params, full.num_classes, full.input_shape, stage, columns,
                                   lower_arrays)
        c = env.config.client
        epochs = self.params.epochs_per_stage if self.params.epochs_per_stage is not None else c.epochs
        loss = float("nan")
        if len(data) > 0 and epochs > 0:
            stats = train_epochs(model, data.x, data.y, epochs=epochs, batch_size=c.batch_size, lr=c.lr,
                                 momentum=c.momentum, weight_decay=c.weight_decay, optimizer=c.optimizer,
                                 seed=env.seed, device=env.device)
            loss = float(stats.get("loss", float("nan")))
        model.cpu()
        reply = RecordDict({
            f"{COLUMN_PREFIX}{pid}": to_arrayrecord(column_state(model.column)),
            f"{META_PREFIX}{pid}": MetricRecord({WEIGHT_KEY: int(len(data)),
                                                 "train_loss": loss if np.isfinite(loss) else 0.0}),
        })
        if stage == self.params.stages and self.params.head != "ridge":
            head = {k: v.detach().numpy() for k, v in model.head.state_dict().items()}
            reply[f"{HEAD_PREFIX}{pid}"] = to_arrayrecord(head)
        return reply

    reduce = staticmethod(concatenate_replies)  # one node, several clients: records side by side
