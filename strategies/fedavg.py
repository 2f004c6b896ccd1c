"""Flower's Message-API strategies as fedsim strategies, run on fedsim's accounting grid.

One server class family: each member is a ``flwr.serverapp.strategy`` class plus the keyword arguments its
parameters name (Flower's own names), optionally wrapped (the DP wrappers around FedAvg). Every member trains with
the same client part (``fedsim.clients.sgd``: local SGD epochs), evaluates the global model on the test set after
every ``evaluation.every`` rounds and saves it. The round's local training (``client.epochs``, ``batch_size``,
``lr``, ...) travels to the clients in Flower's train ConfigRecord (``strategy.start(train_config=...)``), so the
clients read no hyperparameter from the scenario. Messages: ``fedsim.algorithms.fedavg.protocol``.

- FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629): w_{t+1} = sum_k (n_k / n) w_k^{t+1}, where each selected
  client starts from w_t and runs ``client.epochs`` epochs of SGD on its partition.
- FedProx (Li et al., MLSys 2020, arXiv 1812.06127) adds (mu / 2) ||w - w_t||^2 to each client's local loss; Flower's
  FedProx sends mu to the clients in its train config.
- Centralized training is FedAvg with a single client holding the whole training set (the registry's
  ``single_client``): the same model, optimizer, epochs and evaluation; only the data distribution differs.
- FedAvgM, FedAdagrad, FedAdam, FedYogi: server optimizers on the pseudo-gradient g_t = w_t - FedAvg(w_k) (FedAvgM
  steps w - lr * (momentum * m + g); Flower's FedOpt family adds eta * m_t / (sqrt(v_t) + tau) with
  m_t = beta_1 m_{t-1} + (1 - beta_1) Delta_t over Delta_t = -g_t, Reddi et al.'s Algorithm 2). Flower's FedAdam
  scales eta by sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)) (Adam's bias corrections, exponent round + 1, tau
  not rescaled), which Reddi et al.'s Algorithm 2 does not; FedYogi and FedAdagrad are uncorrected, and Flower's
  FedAdagrad fixes beta_1 = 0. By default they step the trainable parameters only (the model's
  ``named_parameters()``): the buffers (BatchNorm running mean / variance, ``num_batches_tracked``) are FedAvg's
  example-weighted average of the clients', as FL-bench aggregates them (``_TrainableOnly``); stepping a running
  variance with momentum 0.9 and rate 1 drove it negative within two rounds (NaN outputs; on a 3,000-image
  Fashion-MNIST slice, 10 clients Dirichlet(0.5), 5 rounds, seed 0: FedAvgM 0.106, FedAdam 0.282, FedYogi 0.330
  against FedAvg 0.725; buffers averaged: 0.686, 0.386 at Flower's eta 0.1 (0.721 at fedsim's 10^-1.5), 0.725).
  ``strategy.optimize_buffers = true`` keeps Flower's form (every array stepped). docs/results-fedopt.md.
- FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan: byzantine-robust rules over the clients' models (see
  ``simulation.byzantine_fraction`` for clients to be robust against).
- q-FedAvg: by default the clients report F_k(w_t), the loss of the model they received, as the paper's algorithm
  uses (``strategy.loss = "training"``: Flower's reading of the last epoch's training loss).
- DP with fixed clipping, server side or client side (the client clips, reading the norm Flower's wrapper puts
  into the train config). Noise is Flower's ``np.random.normal``, drawn from a per-round seed so a run repeats.
  By default the clipped updates are averaged uniformly (``weighting = "uniform"``), the average the noise std
  z C / m is calibrated for; Flower's wrapper around its FedAvg weights by examples (``weighting = "examples"``).

Every other rule acts on the whole model message, BatchNorm running statistics included, as Flower's strategies do
on a state dict. Two consequences measured on the digits test scenario (cnn width 16, 6 clients, 3 local epochs):
the BatchNorm statistics move 2-5x more than the parameters, so DP clipping at C = 1 spends most of the budget on
them and the parameters barely move (use a model without BatchNorm, ``model.name = "mlp"``, for DP); and
q-FedAvg's h_k grows with ||L (w_t - w_k)||^2, so with many local steps and L = 1 / client.lr its steps are small
(q = 0.1: loss 2.305 -> 2.297 in 5 rounds on the mlp; q = 0 is the uniform mean and learns like FedAvg). DP
wrappers skip a round's aggregation when a client failed (Flower's rule: the noise assumes every sampled update);
``rounds_not_aggregated`` in summary.json lists such rounds.

Integer arrays (BatchNorm's ``num_batches_tracked``) reach Flower's aggregation as float64 (FedAvg averages them to
float64 anyway; the server optimizers' buffer average rounds them back to their integer dtype): Flower's q-FedAvg
and DP clipping compute on them in place and fail on integers. Under DP the counters are held at the global
model's value (they are not learned, BatchNorm ignores them when its momentum is set, and a client's step count
should neither leak nor spend the clipping budget).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsim.codec import cache_headers, from_record, to_record
from fedsim.engine import ServerContext
from fedsim.engine.node import byzantine_summary
from fedsim.algorithms.fedavg import protocol
from fedsim.scenario import derive_seed
from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays


def _train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean training loss of the replies (Flower's default would also average the engine's keys)."""
    weights = [protocol.reply_weight(r) for r in records]
    total = sum(n for n, _ in weights) or 1.0
    return MetricRecord({protocol.LOSS_KEY: sum(n * loss for n, loss in weights) / total})


def _integer_arrays_as_float(content: RecordDict, hold: ArrayRecord | None = None) -> None:
    """Replace the integer arrays of a reply's model by float64 ones, in place: their own values, or (``hold``)
    the values of the global model the server sent."""
    record = content.array_records.get(protocol.ARRAYS_KEY)
    if record is None:
        return
    for key in list(record.keys()):
        if not _may_be_integer(record[key]):
            continue
        arr = record[key].numpy()
        if not np.issubdtype(arr.dtype, np.integer):
            continue
        source = arr if hold is None or key not in hold else hold[key].numpy()
        record[key] = Array(np.asarray(source, dtype=np.float64))


def _may_be_integer(array: Array) -> bool:
    """False where the array's declared dtype is a non-integer one: its bytes are then not decoded only to look
    at the dtype (a full copy and a header parse per array of every reply: ~0.1 s a round at 100 clients). An
    undeclared or unreadable dtype is decoded and checked."""
    try:
        return bool(np.issubdtype(np.dtype(array.dtype), np.integer))
    except (TypeError, ValueError):
        return True


class _FloatCounters:
    """Mixin for a Flower strategy: integer arrays of the replies become float64 before aggregation."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_content():
                for record in msg.content.array_records.values():  # Flower decodes each array: header cached
                    cache_headers(record)
                _integer_arrays_as_float(msg.content)
        return super().aggregate_train(server_round, replies)


class _UniformWeights:
    """Mixin for FedAvg: every reply weighs 1 (the unweighted mean of DP-FedAvg), whatever its example count."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_content() and self.weighted_by_key in msg.content.metric_records.get(protocol.METRICS_KEY, {}):
                msg.content[protocol.METRICS_KEY][self.weighted_by_key] = 1
        return super().aggregate_train(server_round, replies)


def _buffer_average(records: list[RecordDict], buffers: list[str], weight_key: str) -> dict[str, np.ndarray]:
    """FedAvg's example-weighted average of the replies' arrays named ``buffers``: float arrays by Flower's own
    ``aggregate_arrayrecords`` (the arithmetic of FedAvg, so equal to its result), integer arrays (BatchNorm's
    ``num_batches_tracked``) averaged in float64 and rounded to the nearest integer of their own dtype."""
    if not buffers:
        return {}
    first = records[0][protocol.ARRAYS_KEY]
    dtypes = {k: first[k].numpy().dtype for k in buffers}
    parts = []
    for content in records:
        arrays = content[protocol.ARRAYS_KEY]
        parts.append(RecordDict({
            protocol.ARRAYS_KEY: ArrayRecord({k: arrays[k] if dtypes[k].kind == "f"
                                              else Array(np.asarray(arrays[k].numpy(), dtype=np.float64))
                                              for k in buffers}),
            protocol.METRICS_KEY: content[protocol.METRICS_KEY]}))
    mean = aggregate_arrayrecords(parts, weight_key)
    return {k: np.asarray(mean[k].numpy() if dtypes[k].kind == "f" else np.rint(mean[k].numpy()), dtype=dtypes[k])
            for k in buffers}


class _TrainableOnly:
    """Mixin for Flower's server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi): the optimizer steps the
    arrays named in ``trainable`` (the model's parameters) only; every other array (BatchNorm buffers) becomes
    FedAvg's example-weighted average of the replies, as FL-bench aggregates them. ``trainable`` None: Flower's
    form, the optimizer steps every array.

    The replies reach the optimizer holding their trainable arrays alone, and the optimizer's copy of the global
    model (``current_arrays``: FedOpt refreshes it from what configure_train sends, FedAvgM keeps its own last
    output) is cut to the same keys, so its state (momentum, m_t, v_t) has no buffer entries at all. The stepped
    parameters keep the replies' dtype.
    """

    trainable: frozenset[str] | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        contents = [m.content for m in replies if m.has_content() and protocol.ARRAYS_KEY in m.content]
        if self.trainable is None or not contents:
            return super().aggregate_train(server_round, replies)
        order = list(contents[0][protocol.ARRAYS_KEY].keys())
        dtypes = {k: contents[0][protocol.ARRAYS_KEY][k].numpy().dtype for k in self.trainable}
        buffers = [k for k in order if k not in self.trainable]
        averaged = _buffer_average(contents, buffers, self.weighted_by_key)
        for content in contents:  # the optimizer sees the trainable arrays only
            arrays = content[protocol.ARRAYS_KEY]
            content[protocol.ARRAYS_KEY] = ArrayRecord({k: arrays[k] for k in order if k in self.trainable})
        current = getattr(self, "current_arrays", None)
        if current is not None:
            self.current_arrays = type(current)({k: v for k, v in current.items() if k in self.trainable})
        stepped, metrics = super().aggregate_train(server_round, replies)
        if stepped is None:
            return None, metrics
        # each parameter keeps its dtype: FedAdam's bias-corrected rate is a numpy float64, which would make the
        # float32 model float64 (twice the bytes sent down)
        return ArrayRecord({k: Array(np.asarray(stepped[k].numpy(), dtype=dtypes[k])) if k in self.trainable
                            else Array(averaged[k]) for k in order}), metrics


def _strategy_grid(ctx: ServerContext):  # noqa: ANN202
    """The grid Flower's strategy runs on: client-addressed where a node serves several clients (it samples
    clients, the paper's protocol, and pays Flower's per-message costs once per node; fedsim.engine.client_grid)."""
    if ctx.config.simulation.clients_per_node > 1 and getattr(ctx.grid, "clock", None) is None:
        from fedsim.engine.client_grid import ClientAddressedGrid

        return ClientAddressedGrid(ctx.grid)
    return ctx.grid


class _NodesView:
    """The grid as a Flower strategy's sampling sees it: exactly ``nodes``."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class _AvailableClients:
    """Mixin for a Flower strategy: with a ``[system]`` section the engine's clock draws the round's nodes among
    the online clients (over-selected by ``system.over_selection``, ``fedsim.engine.clock``); Flower's own
    ``configure_train`` then builds the messages for exactly those. Without one, Flower samples as always."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:  # noqa: ANN001
        clock = getattr(grid, "clock", None)
        if clock is None:
            return super().configure_train(server_round, arrays, config, grid)
        nodes = clock.sample_nodes(grid, self.fraction_train, server_round)
        if not nodes:  # nobody online any more
            return []
        saved = self.fraction_train, self.min_available_nodes
        self.fraction_train, self.min_available_nodes = 1.0, 0  # every node of the view, waiting for none
        try:
            return list(super().configure_train(server_round, arrays, config, _NodesView(nodes)))
        finally:
            self.fraction_train, self.min_available_nodes = saved


@functools.cache
def _fedsim_flavour(cls: type, uniform: bool = False, trainable_only: bool = False) -> type:
    """``cls`` with fedsim's float counters (and, for DP-FedAvg, uniform weights; for the server optimizers, the
    buffers kept out of the optimizer)."""
    bases = (_FloatCounters, _UniformWeights, cls) if uniform else (_FloatCounters, cls)
    if trainable_only:  # first: it sees the replies' integer counters before _FloatCounters turns them to float
        bases = (_TrainableOnly, *bases)
    return type(cls.__name__, (_AvailableClients, *bases), {"__doc__": cls.__doc__})  # clock's sampling first


@contextlib.contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """numpy's global RNG seeded for the duration (Flower's DP noise draws from it), then restored."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class _SeededNoise:
    """Mixin for Flower's DP wrappers: each round's Gaussian noise comes from a seed derived from the scenario."""

    noise_seed: int = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with _seeded_numpy(derive_seed(self.noise_seed, server_round, "dp-noise")):
            return super().aggregate_train(server_round, replies)


class _ClientSideDP(_SeededNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping wrapper with seeded noise."""


class _ServerSideDP(_SeededNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper with seeded noise; integer arrays held at the global model's."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_content():
                _integer_arrays_as_float(msg.content, hold=self.current_arrays)
        return super().aggregate_train(server_round, replies)


class _FromRound(Strategy):
    """Flower's ``strategy`` under Flower's own ``start`` loop, its rounds 1, 2, ... being rounds ``done + 1``,
    ... of the run (``done`` > 0: a run resumed from its checkpoint), noting the rounds that aggregated (Flower's
    ``train_metrics_clientapp`` keys)."""

    def __init__(self, strategy: Strategy, done: int = 0, aggregated: Iterable[int] = ()) -> None:
        self.strategy, self.done, self.aggregated = strategy, int(done), set(aggregated)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:  # noqa: ANN001
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round + self.done, replies)
        if metrics is not None:
            self.aggregated.add(server_round + self.done)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid) -> Iterable[Message]:  # noqa: ANN001
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)


def _flower_state(strategy: Strategy) -> dict[str, Any]:
    """A Flower strategy's state for a round checkpoint: its attributes but callables (FedAvgM's momentum, the
    FedOpt moments m_t / v_t, their ``current_arrays``, ...), a wrapped strategy's (DP) nested."""
    return {k: _flower_state(v) if isinstance(v, Strategy) else v for k, v in vars(strategy).items()
            if isinstance(v, Strategy) or not callable(v)}


def _restore_flower_state(strategy: Strategy, state: dict[str, Any]) -> None:
    for key, value in state.items():
        if isinstance(getattr(strategy, key, None), Strategy):
            _restore_flower_state(getattr(strategy, key), value)
        else:
            setattr(strategy, key, value)


class FedAvgServer:
    """Runs a Flower strategy for ``rounds`` rounds; evaluation and logging through the fedsim context.

    A family member sets ``flower_strategy`` and ``flower_params`` (the parameters passed to it under their own
    names) and may override ``context_options`` (keyword arguments derived from the scenario), ``train_config``
    (extra keys of the train ConfigRecord), ``wrap`` (a strategy wrapper) and ``summary_values``.
    """

    flower_strategy: type = FedAvg
    flower_params: tuple[str, ...] = ()
    trainable_only: bool = False  # a server optimizer: its Flower class takes the _TrainableOnly mixin
    resumes_mid_run = True  # --resume continues from the last finished round (``fedsim.engine.checkpoint``)

    def __init__(self, params: protocol.FedAvgParams) -> None:
        self.params = params

    def strategy_options(self) -> dict[str, Any]:
        """Keyword arguments of the Flower strategy taken from the parameters (FedProx: its mu)."""
        return {name: getattr(self.params, name) for name in self.flower_params}

    def context_options(self, ctx: ServerContext) -> dict[str, Any]:
        """Keyword arguments of the Flower strategy derived from the scenario."""
        return {}

    def train_config(self, ctx: ServerContext) -> dict[str, Any]:
        """Extra keys of the ConfigRecord every train message carries (beside the local training settings)."""
        return {}

    def wrap(self, strategy: Strategy, ctx: ServerContext) -> Strategy:
        """The strategy that runs (a wrapper around ``strategy``, or itself)."""
        return strategy

    def summary_values(self, ctx: ServerContext) -> dict[str, Any]:
        """Extra summary.json entries of this strategy."""
        return {}

    def _strategy(self, ctx: ServerContext, uniform: bool = False) -> Strategy:
        base = _fedsim_flavour(self.flower_strategy, uniform, self.trainable_only)(
            fraction_train=self.params.fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
            min_evaluate_nodes=0, min_available_nodes=ctx.config.num_nodes, arrayrecord_key=protocol.ARRAYS_KEY,
            configrecord_key=protocol.CONFIG_KEY, weighted_by_key=protocol.WEIGHT_KEY,
            train_metrics_aggr_fn=_train_metrics, **self.strategy_options(), **self.context_options(ctx),
        )
        return self.wrap(base, ctx)

    def run(self, ctx: ServerContext) -> None:
        test = ctx.test_data()
        model = ctx.initial_model()
        every, rounds = ctx.config.evaluation.every, ctx.config.rounds
        bs = ctx.config.evaluation.batch_size

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round % every and server_round != rounds:
                ctx.log(server_round)
                return None
            arrays_to_state(model, from_record(arrays))
            res = evaluate(model, test.x, test.y, batch_size=bs, device=ctx.device)
            ctx.log(server_round, accuracy=res["accuracy"], loss=res["loss"],
                    **ctx.client_accuracy(res["class_accuracy"], model=model))
            return MetricRecord({"accuracy": float(res["accuracy"]), "loss": float(res["loss"])})

        initial = to_record(state_to_arrays(model))
        strategy = self._strategy(ctx)
        resumed = ctx.checkpoint.resume()  # --resume: the state after the last round the interrupted run finished
        looped = _FromRound(strategy)
        if resumed is not None:
            initial = resumed["arrays"]
            _restore_flower_state(strategy, resumed["flower"])
            looped = _FromRound(strategy, resumed["round"], resumed["aggregated"])

        def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and looped.done:  # the resumed run's round 0 was evaluated before
                return None
            res = evaluate_fn(server_round + looped.done, arrays)
            if server_round:
                ctx.checkpoint.save(server_round + looped.done, {"arrays": arrays, "flower": _flower_state(strategy),
                                                                 "aggregated": sorted(looped.aggregated)})
            return res

        result = looped.start(
            grid=_strategy_grid(ctx), initial_arrays=initial, num_rounds=rounds - looped.done,
            timeout=ctx.config.simulation.timeout,
            train_config=ConfigRecord({**protocol.LocalTraining.from_settings(ctx.config.client).to_config(),
                                       **self.train_config(ctx)}),
            evaluate_fn=evaluate_and_checkpoint,
        )
        # Flower's result holds the last aggregate; none when every round skipped aggregation (DP with a failed
        # client, Bulyan with too few replies): the model stays the initial one
        arrays_to_state(model, from_record(result.arrays if len(result.arrays) else initial))
        ctx.save_model(model.cpu())
        skipped = [r for r in range(1, rounds + 1) if r not in looped.aggregated]
        ctx.summary(num_parameters=int(sum(p.numel() for p in model.parameters())),
                    **({"rounds_not_aggregated": skipped} if skipped else {}),
                    **byzantine_summary(ctx.config), **self.summary_values(ctx))


class FedProxServer(FedAvgServer):
    """FedAvg's server with Flower's FedProx, which sends ``proximal_mu`` to the clients."""

    flower_strategy = FedProx
    flower_params = ("proximal_mu",)


class _ServerOptimizerServer(FedAvgServer):
    """A Flower server optimizer stepping the model's trainable parameters only, the buffers averaged as FedAvg
    does (``strategy.optimize_buffers = true``: Flower's form, every array stepped)."""

    trainable_only = True

    def wrap(self, strategy: Strategy, ctx: ServerContext) -> Strategy:
        if not self.params.optimize_buffers:
            strategy.trainable = frozenset(name for name, _ in ctx.initial_model().named_parameters())
        return strategy


class FedAvgMServer(_ServerOptimizerServer):
    flower_strategy = FedAvgM
    flower_params = ("server_learning_rate", "server_momentum")


class FedAdagradServer(_ServerOptimizerServer):
    flower_strategy = FedAdagrad
    flower_params = ("eta", "tau")

    def context_options(self, ctx: ServerContext) -> dict[str, Any]:
        return {"eta_l": ctx.config.client.lr}  # Flower only logs it; the clients train with client.lr


class FedAdamServer(FedAdagradServer):
    flower_strategy = FedAdam
    flower_params = ("eta", "tau", "beta_1", "beta_2")


class FedYogiServer(FedAdamServer):
    flower_strategy = FedYogi


class FedMedianServer(FedAvgServer):
    flower_strategy = FedMedian


class FedTrimmedAvgServer(FedAvgServer):
    flower_strategy = FedTrimmedAvg
    flower_params = ("beta",)


class KrumServer(FedAvgServer):
    flower_strategy = Krum
    flower_params = ("num_malicious_nodes",)


class MultiKrumServer(KrumServer):
    flower_strategy = MultiKrum

    def context_options(self, ctx: ServerContext) -> dict[str, Any]:
        m = self.params.num_nodes_to_select
        if m is None:  # Blanchard et al.: m = n - f
            m = max(protocol.sampled_clients(ctx.config) - self.params.num_malicious_nodes, 1)
        return {"num_nodes_to_select": int(m)}


class BulyanServer(KrumServer):
    flower_strategy = Bulyan


class QFedAvgServer(FedAvgServer):
    flower_strategy = QFedAvg
    flower_params = ("q",)

    def context_options(self, ctx: ServerContext) -> dict[str, Any]:
        lr = self.params.client_learning_rate
        key = protocol.INITIAL_LOSS_KEY if self.params.loss == "global-model" else protocol.LOSS_KEY
        return {"client_learning_rate": float(ctx.config.client.lr if lr is None else lr), "train_loss_key": key}

    def train_config(self, ctx: ServerContext) -> dict[str, Any]:
        if self.params.loss != "global-model":
            return {}
        return {protocol.INITIAL_LOSS_FLAG: True, protocol.EVAL_BATCH_KEY: int(ctx.config.evaluation.batch_size)}


class _DPServer(FedAvgServer):
    """FedAvg inside one of Flower's fixed-clipping DP wrappers."""

    wrapper: type = _ServerSideDP

    def _strategy(self, ctx: ServerContext, uniform: bool = False) -> Strategy:
        return super()._strategy(ctx, uniform=self.params.weighting == "uniform")

    def wrap(self, strategy: Strategy, ctx: ServerContext) -> Strategy:
        p = self.params
        dp = self.wrapper(strategy, float(p.noise_multiplier), float(p.clipping_norm),
                          protocol.sampled_clients(ctx.config))
        dp.noise_seed = int(ctx.config.seed)
        return dp

    def summary_values(self, ctx: ServerContext) -> dict[str, Any]:
        m = protocol.sampled_clients(ctx.config)
        return {"dp_sampled_clients": m,
                "dp_noise_std": float(self.params.noise_multiplier * self.params.clipping_norm / m)}


class DPServerSideServer(_DPServer):
    wrapper = _ServerSideDP


class DPClientSideServer(_DPServer):
    wrapper = _ClientSideDP
