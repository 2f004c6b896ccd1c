"""FuseFL's protocol (Tang et al., NeurIPS 2024, arXiv 2410.20380): one message down and one reply up per stage,
and (heads "recalibrated" and "ridge") one more round in which clients send statistics of the fused features.

    down  STAGE_KEY       ConfigRecord {stage (1-based), columns (columns per fused stage so far)} and, stages
                          1..K, the stage's local training (``LocalTraining`` of
                          ``fedsim.frameworks.model_rounds_protocol``: local-epochs = this stage's epochs,
                          local-batch-size, local-lr, ...)
          FUSED_KEY       ArrayRecord: the fused lower part (stages 1..k-1; all K stages in the head round K + 1),
                          ``FusedNet`` state keys; absent at stage 1
    up    column.<pid>    ArrayRecord: the client's column (merge adaptor + block k), stages 1..K
          head.<pid>      ArrayRecord: its classifier, at stage K unless ``head = "ridge"``
          classes.<pid>   ArrayRecord: in round K + 1 of the recalibrated head, the class statistics of the fused
                          final features (``CLASS_STATS_KEYS``: classes present, counts, means, centred scatter
                          matrices as packed upper triangles, float64): the one-shot family's form,
                          ``fedsim.frameworks.oneshot_protocol.class_statistics_reply``
          stats.<pid>     ArrayRecord: in round K + 1 of the ridge head, the ridge statistics of [e(x), 1]:
                          gram (upper triangle, ``fedsim.analytic.pack_upper``, float64) and cross
          meta.<pid>      MetricRecord {num-examples, train_loss}

Replies are keyed by partition id, so a node serving several clients sends them side by side (``reduce`` is
``concatenate_replies``). The server part is ``fedsim.strategies.fusefl``, the client part ``fedsim.clients.fusefl``.
Training budget: ``client.epochs`` is the total of local epochs, spread over the K stages by ``stage_epochs``
(the official scripts: K = 2 -> half per stage); ``strategy.epochs_per_stage`` is the per-stage form. The server
computes each stage's budget (``stage_training``) and sends it; the client trains what the message says.
Torch-free: loading a scenario reads only this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim.catalog import MODEL_BLOCKS
from fedsim.codec import from_record, to_record
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.frameworks.oneshot_protocol import MERGES, META_PREFIX, WEIGHT_KEY, RecalibrationParams, training_of
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

if TYPE_CHECKING:  # fedsim.analytic (scipy) is imported where statistics are built, not when a scenario loads
    from fedsim.analytic import RidgeStatistics

HEADS = ("recalibrated", "avg", "logits", "ridge")  # the fused network's classifier
HEAD_FEATURES = ("mean", "concat")  # the ridge head's input: mean over columns or their concatenation
STATS_ROUND_HEADS = ("recalibrated", "ridge")  # heads that need round K + 1 (statistics of the fused features)

STAGE_KEY = "fusefl"
FUSED_KEY = "fused"
COLUMN_PREFIX = "column."
HEAD_PREFIX = "head."
STATS_PREFIX = "stats."
# META_PREFIX, WEIGHT_KEY and the class-statistics record (classes.<pid>): the one-shot family's
# (fedsim.frameworks.oneshot_protocol), shared with the one-shot baselines


@dataclass
class FuseFLParams(RecalibrationParams):
    stages: int = 2  # K: the model is cut into K stages, one round each
    merge: str = "avg"  # how a column reads the previous stage's M outputs: avg | sum | conv1x1
    head: str = "recalibrated"  # final classifier:
    #   recalibrated (the published method): the mean of the M heads on the sum of the M final features, then
    #                 retrained on virtual features from pooled class statistics (one more round, K + 1)
    #   avg          the same averaged head without the recalibration (K rounds)
    #   logits       the mean of the M heads' logits, each on its own column (K rounds)
    #   ridge        one more round: the ridge head from all clients' statistics of the fused features
    head_features: str = "mean"  # ridge head input: mean over columns (d) or their concatenation (M d)
    ridge_gamma: float = 1.0  # ridge regularization of the ridge head
    epochs_per_stage: int | None = None  # per-stage form: this many local epochs at every stage (K times in all);
    #                                      unset = client.epochs is the total, spread over the K stages
    warm_start: bool = True  # each client's later blocks and head continue from its previous stage (official)

    _parameter_constraints = {"stages": [Interval(1, None, integer=True)], "merge": [Options(MERGES)],
                              "head": [Options(HEADS)], "head_features": [Options(HEAD_FEATURES)],
                              "ridge_gamma": [Interval(0, None)],
                              "epochs_per_stage": [Interval(1, None, integer=True), None],
                              "warm_start": [Options((True, False))]}

    @property
    def rounds(self) -> int:
        """K stage rounds, plus the statistics round of the recalibrated and the ridge head."""
        return self.stages + (1 if self.head in STATS_ROUND_HEADS else 0)


def stage_epochs(params: FuseFLParams, total_epochs: int, stage: int) -> int:
    """Local epochs at `stage` (1-based): ``epochs_per_stage`` if set; else the total budget `total_epochs`
    spread over the K stages, E // K each and the remainder E % K one epoch each to the earliest stages (their
    blocks are frozen afterwards; with warm start the later blocks train at those stages too). Sums to E."""
    if params.epochs_per_stage is not None:
        return int(params.epochs_per_stage)
    k = params.stages
    return total_epochs // k + (1 if stage <= total_epochs % k else 0)


def stage_training(params: FuseFLParams, client: Any, stage: int) -> LocalTraining:
    """The local training of `stage` (1-based): the scenario's ``client`` settings (``fedsim.config.ClientConfig``)
    with ``stage_epochs`` epochs; what the server sends, so the client reads no scenario."""
    return replace(LocalTraining.from_settings(client), epochs=stage_epochs(params, client.epochs, stage))


# ------------------------------------------------------------------------------------------------- requests
def stage_message(stage: int, columns: list[int], fused_arrays: dict[str, np.ndarray] | None,
                  training: LocalTraining | None = None) -> RecordDict:
    """What the server sends at `stage`: the stage number, the fused layout, (stage > 1) the fused weights and
    (stages 1..K) the stage's local training (``stage_training``); the statistics round K + 1 trains nothing."""
    settings = {"stage": int(stage), "columns": [int(c) for c in columns]}
    if training is not None:
        settings.update(training.to_config())
    content = RecordDict({STAGE_KEY: ConfigRecord(settings)})
    if fused_arrays:
        content[FUSED_KEY] = to_record(fused_arrays)
    return content


def stage_of(content: RecordDict) -> tuple[int, list[int]]:
    """The stage number and the fused layout (columns per stage) a server message describes."""
    cfg = content.config_records[STAGE_KEY]
    columns = [int(c) for c in cfg.get("columns", [])]
    return int(cfg["stage"]), columns


def stage_training_of(content: RecordDict) -> LocalTraining:
    """The local training a stage message asks for (stages 1..K); a KeyError when it carries none."""
    return training_of(content, STAGE_KEY)


def fused_of(content: RecordDict) -> dict[str, np.ndarray] | None:
    """The fused lower part's state a server message carries (read-only views), None at stage 1."""
    return from_record(content[FUSED_KEY]) if FUSED_KEY in content else None


# --------------------------------------------------------------------------------------------------- replies
def column_reply(pid: int, column: dict[str, np.ndarray], num_examples: int, train_loss: float,
                 head: dict[str, np.ndarray] | None = None) -> RecordDict:
    """Client `pid`'s reply at a stage: its column's state, its example count and loss, and (stage K) its head."""
    reply = RecordDict({
        f"{COLUMN_PREFIX}{pid}": to_record(column),
        f"{META_PREFIX}{pid}": MetricRecord({WEIGHT_KEY: int(num_examples), "train_loss": float(train_loss)}),
    })
    if head is not None:
        reply[f"{HEAD_PREFIX}{pid}"] = to_record(head)
    return reply


def statistics_reply(pid: int, stats: RidgeStatistics, num_examples: int) -> RecordDict:
    """Client `pid`'s reply in the ridge-head round: Z^T Z as its upper triangle, Z^T Y, the example count."""
    from fedsim.analytic import pack_upper

    return RecordDict({
        f"{STATS_PREFIX}{pid}": to_record({"gram": pack_upper(stats.gram), "cross": stats.cross}),
        f"{META_PREFIX}{pid}": MetricRecord({WEIGHT_KEY: int(num_examples), "train_loss": float("nan")}),  # no training
    })


@dataclass
class ClientUpload:
    """What one client sent in one round (arrays are read-only views of the message)."""

    column: dict[str, np.ndarray] | None = None
    head: dict[str, np.ndarray] | None = None
    stats: RidgeStatistics | None = None
    num_examples: int = 0
    train_loss: float = 0.0


def parse_replies(contents: Iterable[RecordDict | None]) -> dict[int, ClientUpload]:
    """Every client's upload in a round's reply contents (None for a failed node), by partition id, sorted.
    The recalibration round's class statistics are read by ``fedsim.frameworks.oneshot_protocol.parse_class_statistics``."""
    out: dict[int, ClientUpload] = {}
    packed: dict[int, dict[str, np.ndarray]] = {}
    for content in contents:
        if content is None:
            continue
        for key, record in content.array_records.items():
            if key.startswith(COLUMN_PREFIX):
                out.setdefault(int(key[len(COLUMN_PREFIX):]), ClientUpload()).column = from_record(record)
            elif key.startswith(HEAD_PREFIX):
                out.setdefault(int(key[len(HEAD_PREFIX):]), ClientUpload()).head = from_record(record)
            elif key.startswith(STATS_PREFIX):
                pid = int(key[len(STATS_PREFIX):])
                out.setdefault(pid, ClientUpload())
                packed[pid] = from_record(record)
        for key, record in content.metric_records.items():
            if key.startswith(META_PREFIX):
                upload = out.setdefault(int(key[len(META_PREFIX):]), ClientUpload())
                upload.num_examples = int(record[WEIGHT_KEY])
                upload.train_loss = float(record["train_loss"])
    if packed:
        from fedsim.analytic import RidgeStatistics, unpack_upper

        for pid, s in packed.items():
            cross = s["cross"]
            out[pid].stats = RidgeStatistics(unpack_upper(s["gram"], cross.shape[0]), cross, out[pid].num_examples)
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------ registration
def _check(config) -> None:  # noqa: ANN001
    """Rules across sections: the rounds the stages define, something to train, no more stages than blocks."""
    p = config.strategy.params
    if config.rounds != p.rounds:
        extra = f" plus one for the {p.head} head" if p.head in STATS_ROUND_HEADS else ""
        raise ConfigError(f"rounds: {config.rounds} but fusefl runs exactly one round per stage{extra} "
                          f"(strategy.stages = {p.stages}); set rounds = {p.rounds} or leave rounds out")
    if p.epochs_per_stage is None and config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for fusefl "
                          "(it is the total of local epochs over the stages; or set strategy.epochs_per_stage)")
    blocks = MODEL_BLOCKS.get(config.model.name)  # None: a factory model, whose blocks fedsim.preflight counts
    if blocks is not None and p.stages > blocks:
        raise ConfigError(f"strategy.stages: {p.stages} is more than model {config.model.name!r} has blocks "
                          f"({blocks}); use 1..{blocks}")


register_strategy(StrategySpec(
    name="fusefl", params=FuseFLParams, server="fedsim.strategies.fusefl:FuseFLServer",
    client="fedsim.clients.fusefl:FuseFLClient", check=_check, fixed_rounds=lambda p: p.rounds, reducible=True,
    description="FuseFL (Tang et al. 2024): one-shot FL, K stages of block training on the fused lower blocks, "
                "head recalibrated on virtual features",
))
