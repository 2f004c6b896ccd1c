"""SCAFFOLD's server part (Karimireddy et al., ICML 2020, arXiv 1910.06378, Algorithm 1).

Each round: sample S (``fraction_train``, seeded), send (x, c), receive the clients' local models y_i and control
updates dc_i = c_i^+ - c_i, then

    x <- x + eta_g * (1/|S|) sum_{i in S} (y_i - x)     (trainable parameters; BatchNorm buffers: the mean)
    c <- c + (1/N) sum_{i in S} dc_i                    (N: all clients)

over the clients that answered. ``ModelRoundsServer`` is the loop (sampling, evaluation, logging, saving) that
FedDyn's server part shares. Messages: ``fedsim.algorithms.scaffold.protocol``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedsim.engine import ServerContext
from fedsim.engine.node import byzantine_summary
from fedsim.algorithms.scaffold import protocol
from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays


class ModelRoundsServer:
    """Rounds of "send the global model (and what the algorithm adds) to the sampled clients, fold the replies".

    Subclasses implement ``setup(ctx, model)`` (server state), ``request(model, round)`` and ``aggregate(model,
    replies)`` (the new global model from the answering replies' contents); evaluation as FedAvg's (round 0 = the
    initial model, then every ``evaluation.every`` rounds and the last).
    """

    def __init__(self, params: Any) -> None:
        self.params = params

    def setup(self, ctx: ServerContext, parameters: list[str]) -> None:
        self.ctx = ctx
        self.parameters = parameters  # names of the trainable parameters (the rest are buffers)

    def request(self, model: dict[str, np.ndarray], round_: int) -> RecordDict:
        raise NotImplementedError

    def aggregate(self, model: dict[str, np.ndarray], replies: list[RecordDict]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def sample(self, ctx: ServerContext, round_: int) -> list[int] | None:
        """The clients of ``round_``: all (None), or max(int(N * fraction_train), 1) drawn from a per-round seed."""
        n = ctx.config.num_clients
        m = max(int(n * self.params.fraction_train), 1)
        if m >= n:
            return None
        rng = np.random.default_rng(ctx.derive_seed(round_, "sample"))
        return sorted(int(i) for i in rng.choice(n, size=m, replace=False))

    def run(self, ctx: ServerContext) -> None:
        test = ctx.test_data()
        net = ctx.initial_model()
        cfg = ctx.config
        every, rounds, bs = cfg.evaluation.every, cfg.rounds, cfg.evaluation.batch_size
        model = state_to_arrays(net)
        self.setup(ctx, [name for name, p in net.named_parameters() if p.requires_grad])

        def log(round_: int) -> None:
            if round_ % every and round_ != rounds:
                ctx.log(round_)
                return
            arrays_to_state(net, model)
            res = evaluate(net, test.x, test.y, batch_size=bs, device=ctx.device)
            ctx.log(round_, accuracy=res["accuracy"], loss=res["loss"], **ctx.client_accuracy(res["class_accuracy"]))

        log(0)
        skipped = []
        for round_ in range(1, rounds + 1):
            replies = [r.content for r in ctx.send(self.request(model, round_), partitions=self.sample(ctx, round_),
                                                   round=round_) if r.ok]
            if replies:
                model = self.aggregate(model, replies)
            else:
                skipped.append(round_)
            log(round_)
        arrays_to_state(net, model)
        ctx.save_model(net.cpu())
        ctx.summary(num_parameters=int(sum(p.numel() for p in net.parameters())),
                    **({"rounds_not_aggregated": skipped} if skipped else {}), **byzantine_summary(cfg))


def step_towards(model: dict[str, np.ndarray], mean: dict[str, np.ndarray], parameters: list[str],
                 rate: float) -> dict[str, np.ndarray]:
    """x + rate * (mean - x) on the trainable parameters (in their dtype), the mean itself for buffers."""
    out = dict(mean)
    for key in parameters:
        x = np.asarray(model[key], dtype=np.float64)
        out[key] = (x + rate * (np.asarray(mean[key], dtype=np.float64) - x)).astype(np.asarray(model[key]).dtype)
    return out


class ScaffoldServer(ModelRoundsServer):
    """SCAFFOLD: the server control variate c (float64) lives here, each client's c_i in its own state."""

    def setup(self, ctx: ServerContext, parameters: list[str]) -> None:
        super().setup(ctx, parameters)
        self.control: dict[str, np.ndarray] | None = None

    def request(self, model: dict[str, np.ndarray], round_: int) -> RecordDict:
        if self.control is None:
            self.control = {k: np.zeros(np.shape(model[k]), dtype=np.float64) for k in self.parameters}
        dtype = {k: np.asarray(model[k]).dtype for k in self.parameters}
        return protocol.request(model, {k: v.astype(dtype[k]) for k, v in self.control.items()})

    def aggregate(self, model: dict[str, np.ndarray], replies: list[RecordDict]) -> dict[str, np.ndarray]:
        merged = protocol.merge([protocol.parse_reply(r) for r in replies])
        n = self.ctx.config.num_clients
        for key, value in self.control.items():
            value += np.asarray(merged.control[key], dtype=np.float64) / n
        return step_towards(model, merged.model, self.parameters, self.params.server_learning_rate)
