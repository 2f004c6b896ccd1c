"""FedExP's protocol (Jhunjhunwala, Wang and Joshi, "FedExP: Speeding Up Federated Averaging via Extrapolation",
ICLR 2023, arXiv 2301.09604): FedAvg whose server step size adapts to how much the clients' updates agree.

    down  ARRAYS_KEY   ArrayRecord: the global model x (parameters and BatchNorm buffers)
          CONFIG_KEY   ConfigRecord: the round's local training (``LocalTraining``: epochs, lr, momentum, ...)
    up    UPDATE_KEY   ArrayRecord: sum_i p_i Delta_i over the clients the reply covers, Delta_i = y_i - x client
                       i's update (trainable parameters, in the model's dtype)
          BUFFERS_KEY  ArrayRecord: the example-weighted mean of the clients' buffers (BatchNorm statistics)
          METRICS_KEY  MetricRecord {num-examples, clients, train_loss, sq_norm}: n, the number of clients, and the
                       example-weighted means of the loss and of ||Delta_i||^2 (float64 on the client)

The server (p_i = n_i / sum n over the answering clients; p_i = 1/M for equal clients, as in the paper):

    Delta  = sum_i p_i Delta_i
    eta_g  = max(1, sum_i p_i ||Delta_i||^2 / (2 (||Delta||^2 + epsilon)))
    x     <- x + eta_g * Delta

With p_i = 1/M the step is the paper's eta_g = max(1, sum_i ||Delta_i||^2 / (2 M (||Delta||^2 + epsilon)))
(Algorithm 1). eta_g = 1 is FedAvg; the more the clients' updates cancel (||Delta|| small against their own
lengths), the further the server extrapolates. Every reply field is an example-weighted mean, so a node serving
several clients combines them exactly (``combine``). The server part is ``fedsim_fedexp.server``, the client part
``fedsim_fedexp.client``; this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.algorithms.fedavg.protocol import FedAvgParams
from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import (
    BUFFERS_KEY,
    UPDATE_KEY,
    UpdateReply,
    combine_update_replies,
    merge_update_replies,
    parse_training_request,
    parse_update_reply,
    training_request,
    update_reply,
)
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

__all__ = ["UPDATE_KEY", "BUFFERS_KEY", "SQ_NORM_KEY", "FedExPParams", "request", "parse_request", "reply",
           "parse_reply", "merge", "combine", "squared_norm", "server_step_size", "UpdateReply"]

SQ_NORM_KEY = "sq_norm"  # ||Delta_i||^2 (example-weighted mean over the reply's clients)


@dataclass
class FedExPParams(FedAvgParams):
    """FedExP's server: FedAvg's client sampling (``fraction_train``) and

    - ``epsilon``: the paper's epsilon, which keeps eta_g finite when the mean update vanishes (the paper tunes it
      in {1e-3, 1e-2, 1e-1}; the official code writes the denominator ||Delta||^2 + M * epsilon, i.e. its epsilon
      is this one divided by the number of sampled clients M);
    - ``average_last_two``: evaluate (and save) the mean of the last two global models, as the paper does to damp
      the oscillation extrapolation causes (Section 5; the official code's ``w_vec_avg``); False: the last one.
    """

    epsilon: float = 1e-3
    average_last_two: bool = True

    _parameter_constraints = {"epsilon": [Interval(0, None, closed="neither")],
                              "average_last_two": [Options((True, False))]}


request = training_request  # the global model x and the round's local training
parse_request = parse_training_request  # (x as read-only views, the local training to run)


def reply(update: dict[str, np.ndarray], buffers: dict[str, np.ndarray], num_examples: int, clients: int,
          loss: float, sq_norm: float) -> RecordDict:
    return update_reply(update, buffers, num_examples, loss, clients=clients, extra={SQ_NORM_KEY: sq_norm})


def parse_reply(content: RecordDict) -> UpdateReply:
    """The reply; ``extra[SQ_NORM_KEY]`` is the example-weighted mean of ||Delta_i||^2."""
    return parse_update_reply(content, (SQ_NORM_KEY,))


merge = merge_update_replies  # replies as one: every field the example-weighted mean, so merging is exact


def combine(replies: list[RecordDict]) -> RecordDict:
    """A node's ``reduce``: its clients' replies as one reply."""
    return combine_update_replies(replies, (SQ_NORM_KEY,))


def squared_norm(arrays: dict[str, np.ndarray], keys: Sequence[str]) -> float:
    """sum over ``keys`` of ||arrays[key]||^2, in float64."""
    return float(sum(np.sum(np.square(np.asarray(arrays[k], dtype=np.float64))) for k in keys))


def server_step_size(mean_sq_norm: float, update_sq_norm: float, epsilon: float) -> float:
    """eta_g = max(1, sum_i p_i ||Delta_i||^2 / (2 (||Delta||^2 + epsilon)))."""
    return max(1.0, float(mean_sq_norm) / (2.0 * (float(update_sq_norm) + float(epsilon))))


def _check(config) -> None:  # noqa: ANN001
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for fedexp")


register_strategy(StrategySpec(
    name="fedexp", params=FedExPParams, server="fedsim_fedexp.server:FedExPServer",
    client="fedsim_fedexp.client:FedExPClient", check=_check, reducible=True,
    description="FedExP (Jhunjhunwala et al. 2023): FedAvg with an extrapolated server step "
                "eta_g = max(1, sum_i p_i ||Delta_i||^2 / (2 (||Delta||^2 + eps))) [plugin: fedsim-fedexp]",
))
