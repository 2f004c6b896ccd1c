"""Client part of the gradient baselines (every Flower strategy of ``fedsim.strategies.fedavg``): local SGD epochs.

The client loads the global model it received, trains the epochs the request names (``LocalTraining``: epochs,
batch size, learning rate, momentum, weight decay, optimizer; the server takes them from the scenario's ``[client]``
table) on its own partition and answers with the model and its example count. What the server asks travels in the
message, never in the scenario, so the client does what the server asked:
- FedProx's proximal weight mu (Flower's FedProx puts it into the train config);
- client-side DP clipping: Flower's ``DifferentialPrivacyClientSideFixedClipping`` puts ``clipping_norm`` into the
  train config and expects the client to clip its model update (what Flower's ``fixedclipping_mod`` does):
  the update w_k - w_t of the floating-point arrays is scaled by min(1, C / ||w_k - w_t||_2); integer arrays
  (BatchNorm's step counters) are sent back as received, so they neither leak the step count nor spend the budget;
- q-FedAvg's F_k(w_t): with ``report-initial-loss`` the client also reports the mean loss of the received model
  on its partition (evaluated before training, in batches of the request's ``eval-batch-size``).
Messages: ``fedsim.algorithms.fedavg.protocol``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import RecordDict

from fedsim.averaging import average_factors, weighted_average
from fedsim.engine import ClientEnv
from fedsim.algorithms.fedavg import protocol
from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays, train_epochs


def update_norm(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the floating-point part of the update ``local - global_`` (float64)."""
    total = 0.0
    for key, value in local.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            diff = np.asarray(value, dtype=np.float64) - np.asarray(global_[key], dtype=np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def clip_update(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray],
                clipping_norm: float) -> dict[str, np.ndarray]:
    """``global_ + min(1, C / ||local - global_||) (local - global_)`` on floating arrays (Flower's FlatClip,
    arXiv 1710.06963), in each array's dtype; integer arrays take the global model's value."""
    norm = update_norm(local, global_)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out = {}
    for key, value in local.items():
        value, ref = np.asarray(value), np.asarray(global_[key])
        if np.issubdtype(value.dtype, np.floating):
            g = ref.astype(np.float64)
            out[key] = (g + scale * (value.astype(np.float64) - g)).astype(value.dtype)
        else:
            out[key] = ref.astype(value.dtype, copy=True)
    return out


class SGDClient:
    """Receives the global model, trains the requested epochs of SGD on its partition, returns the model."""

    def __init__(self, params: protocol.FedAvgParams) -> None:
        self.params = params

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict:
        request = protocol.parse_request(content)
        mu = request.proximal_mu
        data = env.train_data()
        model = arrays_to_state(env.initial_model(), request.arrays)
        initial_loss = None
        if request.report_initial_loss:
            initial_loss = evaluate(model, data.x, data.y, batch_size=request.eval_batch_size,
                                    device=env.device)["loss"]
        stats = train_epochs(
            model, data.x, data.y, **request.training.train_kwargs(), seed=env.seed, device=env.device,
            proximal_mu=mu, global_params=[p.detach().clone() for p in model.parameters()] if mu > 0 else None,
        )
        arrays = state_to_arrays(model)
        if request.clipping_norm is not None:
            arrays = clip_update(arrays, request.arrays, request.clipping_norm)
        return protocol.reply(arrays, len(data), float(stats.get("loss", float("nan"))), initial_loss)

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict:
        """Example-weighted average of a group's models: FedAvg over the group gives the same global result."""
        parsed = [protocol.parse_reply(r) for r in replies]  # read-only views, no copies
        weights = [float(n) for _, n, _ in parsed]
        factors = average_factors(len(parsed), weights)
        loss = float(sum(f * loss for f, (_, _, loss) in zip(factors, parsed)))
        initial = [protocol.initial_loss_of(r) for r in replies]
        initial_loss = None if None in initial else float(sum(f * v for f, v in zip(factors, initial)))
        return protocol.reply(weighted_average([arrays for arrays, _, _ in parsed], weights), int(sum(weights)), loss,
                              initial_loss)


class PerClientSGDClient(SGDClient):
    """The same client for strategies that need every client's own reply (the robust rules, q-FedAvg, DP): no
    ``reduce``, so a node serves one client and each reply reaches the aggregation as the client sent it."""

    reduce = None
