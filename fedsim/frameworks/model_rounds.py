"""The model-rounds framework: a public base class for strategies that train one global model over rounds.

``ModelRoundsServer`` owns the loop, as Flower's ``flwr.serverapp.strategy.Strategy`` owns ``start``: each round it
samples clients, sends them the global model (and what the algorithm adds), folds the answering replies into the
next global model, evaluates and logs; at the end it saves the model and writes the summary. A strategy subclasses
it and overrides the hooks it needs:

==================================  =================================================================================
hook                                default
==================================  =================================================================================
``setup(ctx, parameters)``          stores ``ctx``, the trainable parameter names and ``training`` (the round's
                                    ``LocalTraining``); override to create server state (SCAFFOLD's c, FedDyn's h)
``request(model, round_)``          the model and ``training`` in the ConfigRecord (``model_request``)
``aggregate(model, replies)``       **required**: the new global model from the answering replies' contents
``sample(ctx, round_)``             all clients, or max(int(N * fraction_train), 1) drawn from a per-round seed
                                    (with ``[system]``: among the online clients, by ``ctx.clock.sample``)
``round_metrics(round_)``           extra metrics of the round's metrics.csv row ({}; FedNova's tau_eff)
``summary_values()``                extra summary.json entries ({})
``evaluation_model(model)``         the model evaluated, logged and saved in place of the global one (``model``;
                                    FedExP's plugin: the mean of the last two)
``checkpoint_state()``              what a round checkpoint keeps of the server (every attribute but ``ctx``);
``restore_state(state)``            ``--resume`` puts it back after ``setup`` (``fedsim.engine.checkpoint``)
==================================  =================================================================================

The loop sets ``self.round`` (the round in progress, 0 before the first) before it calls ``request``, so later hooks
of the same round can read it. Evaluation is FedAvg's: round 0 is the initial model, then every ``evaluation.every`` rounds and the last
(on the test split, and with ``evaluation.mode`` "local" / "both" on every client's held-out data too); a round
in which no client answered keeps the model and is listed in ``rounds_not_aggregated``. After each round the loop
saves a round checkpoint (``ctx.checkpoint``), from which ``fedsim run --resume`` continues an interrupted run. Models travel as
``dict[str, np.ndarray]`` state dicts (parameters and buffers); the wire form is
``fedsim.frameworks.model_rounds_protocol``. SCAFFOLD, FedDyn and FedNova are built on it (``strategies/``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedsim.engine.node import byzantine_summary
from fedsim.engine.server import ServerContext
from fedsim.frameworks.model_rounds_protocol import LocalTraining, model_request
from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays

__all__ = ["ModelRoundsServer", "step_towards"]


class ModelRoundsServer:
    """Rounds of "send the global model (and what the algorithm adds) to the sampled clients, fold the replies".

    A ``ServerPart`` (``fedsim.engine.parts``): ``__init__(params)`` stores the parameters (which need a
    ``fraction_train`` for the default ``sample``), ``run(ctx)`` is the loop; subclasses override the hooks of the
    module docstring, at least ``aggregate``.
    """

    resumes_mid_run = True  # --resume continues from the last finished round (``fedsim.engine.checkpoint``)

    def __init__(self, params: Any) -> None:
        self.params = params

    # -- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, ctx: ServerContext, parameters: list[str]) -> None:
        """Called once before round 1: ``parameters`` names the trainable arrays of the model (the rest are
        buffers); ``self.training`` is the local training every request asks for (the scenario's ``[client]``)."""
        self.ctx = ctx
        self.parameters = parameters
        self.training = LocalTraining.from_settings(ctx.config.client)

    def request(self, model: dict[str, np.ndarray], round_: int) -> RecordDict:
        """The message of ``round_``: by default the model and the local training settings."""
        return model_request(model, self.training.to_config())

    def aggregate(self, model: dict[str, np.ndarray], replies: list[RecordDict]) -> dict[str, np.ndarray]:
        """The next global model from the current one and the contents of the replies that arrived (>= 1)."""
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate(model, replies)")

    def sample(self, ctx: ServerContext, round_: int) -> list[int] | None:
        """The clients of ``round_``: all (None), or max(int(N * fraction_train), 1) drawn from a per-round seed."""
        n = ctx.config.num_clients
        m = max(int(n * self.params.fraction_train), 1)
        if ctx.clock is not None:  # [system]: m among the clients online now, over-selected (fedsim.engine.clock)
            return ctx.clock.sample(m, round_)
        if m >= n:
            return None
        rng = np.random.default_rng(ctx.derive_seed(round_, "sample"))
        return sorted(int(i) for i in rng.choice(n, size=m, replace=False))

    def round_metrics(self, round_: int) -> dict[str, Any]:
        """Extra metrics of the metrics.csv row of ``round_`` (called after its aggregation; round 0 too)."""
        return {}

    def summary_values(self) -> dict[str, Any]:
        """Extra summary.json entries of this strategy."""
        return {}

    def evaluation_model(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model to evaluate, log and save for the global ``model`` (the model itself; a method that reports
        another iterate, such as an average of the last ones, returns it; the rounds continue from ``model``)."""
        return model

    def checkpoint_state(self) -> dict[str, Any]:
        """What a round checkpoint keeps of this server (``fedsim.engine.checkpoint``): every attribute but the
        context (SCAFFOLD's c, FedDyn's h, FedNova's and the plugins' own), picklable; override for attributes
        that are not."""
        return {k: v for k, v in vars(self).items() if k != "ctx"}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Back from ``checkpoint_state`` (after ``setup``, which set the context), for ``--resume``."""
        vars(self).update(state)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, ctx: ServerContext) -> None:
        test = ctx.test_data()
        net = ctx.initial_model()
        cfg = ctx.config
        every, rounds, bs = cfg.evaluation.every, cfg.rounds, cfg.evaluation.batch_size
        model = state_to_arrays(net)
        self.round = 0
        self.setup(ctx, [name for name, p in net.named_parameters() if p.requires_grad])

        def log(round_: int) -> None:
            extra = self.round_metrics(round_)
            if round_ % every and round_ != rounds:
                ctx.log(round_, **extra)
                return
            arrays_to_state(net, self.evaluation_model(model))
            res = evaluate(net, test.x, test.y, batch_size=bs, device=ctx.device)
            ctx.log(round_, accuracy=res["accuracy"], loss=res["loss"],
                    **ctx.client_accuracy(res["class_accuracy"], model=net), **extra)

        resumed = ctx.checkpoint.resume()  # --resume: the state after the last round the interrupted run finished
        if resumed is None:
            log(0)
            skipped, first = [], 1
        else:
            model, skipped, first = resumed["model"], list(resumed["skipped"]), resumed["round"] + 1
            self.restore_state(resumed["server"])
        for round_ in range(first, rounds + 1):
            self.round = round_
            replies = [r.content for r in ctx.send(self.request(model, round_), partitions=self.sample(ctx, round_),
                                                   round=round_) if r.ok]
            if replies:
                model = self.aggregate(model, replies)
            else:
                skipped.append(round_)
            log(round_)
            ctx.checkpoint.save(round_, {"model": model, "skipped": skipped, "server": self.checkpoint_state()})
        arrays_to_state(net, self.evaluation_model(model))
        ctx.save_model(net.cpu())
        ctx.summary(num_parameters=int(sum(p.numel() for p in net.parameters())),
                    **({"rounds_not_aggregated": skipped} if skipped else {}), **byzantine_summary(cfg),
                    **self.summary_values())


def step_towards(model: dict[str, np.ndarray], mean: dict[str, np.ndarray], parameters: list[str],
                 rate: float) -> dict[str, np.ndarray]:
    """x + rate * (mean - x) on the trainable parameters (float64, back in their dtype), the mean itself for
    buffers: a server learning rate on the clients' mean model (SCAFFOLD's eta_g)."""
    out = dict(mean)
    for key in parameters:
        x = np.asarray(model[key], dtype=np.float64)
        out[key] = (x + rate * (np.asarray(mean[key], dtype=np.float64) - x)).astype(np.asarray(model[key]).dtype)
    return out
