"""The gradient baselines' protocol: Flower's own Message-API strategies and the messages they send.

    down  ARRAYS_KEY   ArrayRecord: the global model (parameters and BatchNorm buffers)
          CONFIG_KEY   ConfigRecord {server-round, local-epochs, local-batch-size, local-lr, local-momentum,
                       local-weight-decay, local-optimizer[, proximal-mu][, clipping_norm][, report-initial-loss,
                       eval-batch-size]}: the round's local training (``LocalTraining``) travels here, as do
                       FedProx's mu and the client-side DP clipping norm, as Flower sends them; q-FedAvg asks for
                       the loss of the received model with ``report-initial-loss``
    up    ARRAYS_KEY   ArrayRecord: the locally trained model
          METRICS_KEY  MetricRecord {num-examples, train_loss[, initial_loss]}

The wire form is the shared one of ``fedsim.frameworks.model_rounds_protocol`` (Flower FedAvg's default keys), so
Flower's own strategies run the server side unchanged: FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad,
FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, QFedAvg and the fixed-clipping differential-privacy wrappers
around FedAvg. Each strategy's parameters carry Flower's own names. The server part is ``fedsim.strategies.fedavg``,
the client part ``fedsim.clients.sgd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedsim.errors import ConfigError
from fedsim.frameworks.model_rounds_protocol import (  # noqa: F401  (re-exported: the SGD family's wire form)
    ARRAYS_KEY,
    CONFIG_KEY,
    LOSS_KEY,
    METRICS_KEY,
    WEIGHT_KEY,
    LocalTraining,
    finite,
    model_reply,
    parse_model_reply,
    parse_model_request,
    reply_weight,
)
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

MU_KEY = "proximal-mu"  # what Flower's FedProx.configure_train puts into the train ConfigRecord
CLIP_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM, set by the client-side DP wrapper
INITIAL_LOSS_FLAG = "report-initial-loss"  # train config: the server wants the loss of the model it sent
EVAL_BATCH_KEY = "eval-batch-size"  # train config, with INITIAL_LOSS_FLAG: the batch size of that evaluation
INITIAL_LOSS_KEY = "initial_loss"  # reply metric: mean loss of the received model on the client's data
MODEL_CODEC = "fedsim.frameworks.model_rounds_protocol:MODEL_CODEC"  # the model of a reply, for the engine


@dataclass
class FedAvgParams:
    fraction_train: float = 1.0  # fraction of nodes sampled per round (seeded)

    _parameter_constraints = {"fraction_train": [Interval(0, 1)]}

    def check(self, path: str) -> None:
        if self.fraction_train == 0:
            raise ConfigError(f"{path}.fraction_train: 0.0 trains nobody; it must lie in (0, 1]")


@dataclass
class FedProxParams(FedAvgParams):
    proximal_mu: float = 0.01  # weight of (mu / 2) ||w - w_global||^2; sent to the clients in the train config

    _parameter_constraints = {"proximal_mu": [Interval(0, None)]}


@dataclass
class ServerOptimizerParams(FedAvgParams):
    """What FedAvgM, FedAdagrad, FedAdam and FedYogi share: which arrays the server optimizer steps."""

    # false: the optimizer steps the trainable parameters (the model's named_parameters()) and the buffers
    # (BatchNorm running mean / var, num_batches_tracked) are FedAvg's example-weighted average of the clients'
    # (FL-bench's rule); true: the optimizer steps every array, buffers included (Flower's strategies on a state
    # dict; fedsim before issue #22: running variances go negative, NaN outputs)
    optimize_buffers: bool = False


@dataclass
class FedAvgMParams(ServerOptimizerParams):
    """FedAvgM (Hsu et al. 2019, arXiv 1909.06335): server SGD with momentum on the pseudo-gradient."""

    server_learning_rate: float = 1.0
    server_momentum: float = 0.9  # Flower's default 0.0 is plain FedAvg; the paper's method uses momentum (0.9)

    _parameter_constraints = {"server_learning_rate": [Interval(0, None, closed="neither")],
                              "server_momentum": [Interval(0, 1, closed="left")]}


_ETA = [Interval(0, None, closed="neither")]
_BETA = [Interval(0, 1, closed="left")]


@dataclass
class FedAdagradParams(ServerOptimizerParams):
    """FedAdagrad (Reddi et al. 2021, arXiv 2003.00295); Flower's defaults. The client rate is ``client.lr``."""

    eta: float = 0.1  # server learning rate
    tau: float = 1e-3  # adaptivity: the larger, the closer to server SGD

    _parameter_constraints = {"eta": _ETA, "tau": _ETA}


@dataclass
class FedAdamParams(FedAdagradParams):
    """FedAdam (Reddi et al. 2021); Flower's defaults except eta (docs/results-fedopt.md)."""

    # 10^-1.5, not Flower's 0.1: at 0.1 the default CNN on a 10-client Fashion-MNIST slice reaches 0.386 against
    # FedAvg's 0.725 (10^-1.5: 0.721); on 20 clients Dirichlet(0.1), width 16, 0.1 is 2.5 points above 10^-1.5
    eta: float = 10 ** -1.5
    beta_1: float = 0.9
    beta_2: float = 0.99

    _parameter_constraints = {"beta_1": _BETA, "beta_2": _BETA}


@dataclass
class FedYogiParams(FedAdamParams):
    """FedYogi (Reddi et al. 2021); Flower's defaults (a smaller server rate than FedAdam's)."""

    eta: float = 1e-2


@dataclass
class FedTrimmedAvgParams(FedAvgParams):
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv 1803.01498): drop the ``beta`` fraction at each end."""

    beta: float = 0.2

    _parameter_constraints = {"beta": [Interval(0, 0.5, closed="left")]}


@dataclass
class KrumParams(FedAvgParams):
    """Krum (Blanchard et al. 2017): keep the reply closest to its n - f - 2 nearest neighbours."""

    num_malicious_nodes: int = 0  # f, the number of byzantine clients the rule must tolerate

    _parameter_constraints = {"num_malicious_nodes": [Interval(0, None, integer=True)]}


@dataclass
class MultiKrumParams(KrumParams):
    """Multi-Krum (Blanchard et al. 2017): FedAvg over the m best-scored replies."""

    num_nodes_to_select: int | None = None  # m; unset: n - f, the paper's choice (Flower's default 1 is Krum)

    _parameter_constraints = {"num_nodes_to_select": [Interval(1, None, integer=True), None]}


@dataclass
class BulyanParams(KrumParams):
    """Bulyan (El Mhamdi et al. 2018): Multi-Krum selection of n - 2f, then a trimmed mean around the median."""


QFEDAVG_LOSSES = ("global-model", "training")


@dataclass
class QFedAvgParams(FedAvgParams):
    """q-FedAvg (Li et al. 2020, arXiv 1905.10497): fair aggregation that up-weights clients with higher loss."""

    q: float = 0.1  # fairness: 0 is FedAvg-like, larger q favours the worst clients
    client_learning_rate: float | None = None  # the paper's 1/L; unset: client.lr
    # global-model: F_k(w^t), the loss of the received model on the client's data (the paper's algorithm);
    # training: the mean loss of the last local epoch (what Flower's QFedAvg reads from a reply's train_loss)
    loss: str = "global-model"

    _parameter_constraints = {"q": [Interval(0, None)], "client_learning_rate": [Interval(0, None, closed="neither"),
                                                                                  None],
                              "loss": [Options(QFEDAVG_LOSSES)]}


DP_WEIGHTINGS = ("uniform", "examples")


@dataclass
class DPFixedClippingParams(FedAvgParams):
    """Central DP with fixed clipping (McMahan et al. 2018, arXiv 1710.06963) around FedAvg."""

    noise_multiplier: float = 1.0  # z: Gaussian noise std = z * clipping_norm / sampled clients
    clipping_norm: float = 1.0  # C: bound on the L2 norm of each client's model update
    # uniform: every client's clipped update counts 1/m, the average the noise std z C / m is calibrated for (the
    # papers' and Flower's accountant's setting); examples: FedAvg's n_k / n (Flower's wrapper around its FedAvg)
    weighting: str = "uniform"

    _parameter_constraints = {"noise_multiplier": [Interval(0, None)],
                              "clipping_norm": [Interval(0, None, closed="neither")],
                              "weighting": [Options(DP_WEIGHTINGS)]}


@dataclass
class TrainRequest:
    """What a train message asks of the client (``parse_request``)."""

    arrays: dict[str, np.ndarray]  # the global model, read-only views
    training: LocalTraining  # the round's local SGD (epochs, batch size, learning rate, ...)
    proximal_mu: float = 0.0  # FedProx
    clipping_norm: float | None = None  # client-side DP: clip the model update to this L2 norm
    report_initial_loss: bool = False  # q-FedAvg: also report the loss of the received model
    eval_batch_size: int | None = None  # q-FedAvg: the batch size of that evaluation (sent with the flag)


def parse_request(content: RecordDict) -> TrainRequest:
    """Everything a train message of a gradient strategy asks for."""
    arrays, config = parse_model_request(content)
    clip, initial = config.get(CLIP_KEY), bool(config.get(INITIAL_LOSS_FLAG, False))
    if initial and EVAL_BATCH_KEY not in config:
        raise KeyError(f"{INITIAL_LOSS_FLAG} comes without {EVAL_BATCH_KEY}: the server must send both")
    return TrainRequest(arrays, LocalTraining.from_config(config), float(config.get(MU_KEY, 0.0)),
                        None if clip is None else float(clip), initial,
                        int(config[EVAL_BATCH_KEY]) if initial else None)


def parse_train(content: RecordDict) -> tuple[dict[str, np.ndarray], float]:
    """(global model arrays as read-only views, proximal mu) of a train message; mu is 0 where none was sent."""
    arrays, config = parse_model_request(content)
    return arrays, float(config.get(MU_KEY, 0.0))


def reply(arrays: dict[str, np.ndarray], num_examples: int, train_loss: float,
          initial_loss: float | None = None) -> RecordDict:
    """A client's answer: its model, its example count (FedAvg's weight) and its mean training loss (0 if none);
    ``initial_loss`` (the received model's loss, for q-FedAvg) only where the server asked for it."""
    extra = None if initial_loss is None else {INITIAL_LOSS_KEY: finite(initial_loss)}
    return model_reply(arrays, num_examples, train_loss, metrics=extra)


def parse_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], int, float]:
    """(model arrays as read-only views, number of examples, training loss) of a client's reply."""
    r = parse_model_reply(content)
    return r.arrays, r.num_examples, r.loss


def initial_loss_of(content: RecordDict) -> float | None:
    """The reply's loss of the received model (q-FedAvg), None where it carries none."""
    value = content[METRICS_KEY].get(INITIAL_LOSS_KEY)
    return None if value is None else float(value)


def _check_trainable(config) -> None:  # noqa: ANN001
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs: {config.client.epochs} trains nothing; it must be >= 1 for "
                          f"{config.strategy.name}")


def sampled_clients(config) -> int:  # noqa: ANN001
    """Clients a round samples, as Flower's FedAvg.configure_train counts them: max(int(N * fraction), 1) over
    the grid's N node ids, one per client also where a node serves several (fedsim.engine.client_grid)."""
    return max(int(config.num_clients * config.strategy.params.fraction_train), 1)


def _check_krum(config) -> None:  # noqa: ANN001
    _check_trainable(config)
    params, n = config.strategy.params, sampled_clients(config)
    f = params.num_malicious_nodes
    if f > 0 and n <= 2 * f + 2:
        raise ConfigError(f"strategy.num_malicious_nodes: {f} needs more than 2f + 2 = {2 * f + 2} clients per "
                          f"round (Blanchard et al. 2017); this scenario samples {n}")
    m = params.num_nodes_to_select if isinstance(params, MultiKrumParams) else None
    if m is not None and m > n:
        raise ConfigError(f"strategy.num_nodes_to_select: {m} is more than the {n} clients sampled per round")


def _check_bulyan(config) -> None:  # noqa: ANN001
    _check_trainable(config)
    f, n = config.strategy.params.num_malicious_nodes, sampled_clients(config)
    if n < 4 * f + 3:
        raise ConfigError(f"strategy.num_malicious_nodes: {f} needs at least 4f + 3 = {4 * f + 3} clients per "
                          f"round (El Mhamdi et al. 2018); this scenario samples {n}, so every round would skip "
                          "aggregation")


_SERVERS = "fedsim.strategies.fedavg"


def _register(name: str, params: type, server: str, description: str, *, reducible: bool,
              check=_check_trainable, **extra) -> None:  # noqa: ANN001
    client = "fedsim.clients.sgd:" + ("SGDClient" if reducible else "PerClientSGDClient")
    # client_addressed: FedAvgServer runs Flower's strategy on the client-addressed grid wherever a node serves
    # several clients (strategies/fedavg.py, _strategy_grid), so the non-reducible rules group clients too
    register_strategy(StrategySpec(name=name, params=params, server=f"{_SERVERS}:{server}", client=client,
                                   check=check, reducible=reducible, client_addressed=True, model_codec=MODEL_CODEC,
                                   description=description,
                                   **extra))


_register("fedavg", FedAvgParams, "FedAvgServer", reducible=True,
          description="FedAvg (McMahan et al. 2017): local SGD epochs, example-weighted model averaging")
_register("fedprox", FedProxParams, "FedProxServer", reducible=True,
          description="FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 on clients")
_register("centralized", FedAvgParams, "FedAvgServer", reducible=True, single_client=True,
          description="Centralized training: one client with all the data (upper bound); partition forced to 1 "
                      "client")
# server optimizers act on FedAvg's average, so a node may pre-average its clients (reducible)
_register("fedavgm", FedAvgMParams, "FedAvgMServer", reducible=True,
          description="FedAvgM (Hsu et al. 2019): server momentum on FedAvg's pseudo-gradient (Flower's FedAvgM)")
_register("fedadagrad", FedAdagradParams, "FedAdagradServer", reducible=True,
          description="FedAdagrad (Reddi et al. 2021): adaptive server optimizer on FedAvg's pseudo-gradient")
_register("fedadam", FedAdamParams, "FedAdamServer", reducible=True,
          description="FedAdam (Reddi et al. 2021): Adam on the server over FedAvg's pseudo-gradient")
_register("fedyogi", FedYogiParams, "FedYogiServer", reducible=True,
          description="FedYogi (Reddi et al. 2021): Yogi on the server over FedAvg's pseudo-gradient")
# the robust rules, q-FedAvg and DP need every client's own reply (a pre-averaged group would change the result)
_register("fedmedian", FedAvgParams, "FedMedianServer", reducible=False,
          description="FedMedian (Yin et al. 2018): coordinate-wise median of the clients' models")
_register("fedtrimmedavg", FedTrimmedAvgParams, "FedTrimmedAvgServer", reducible=False,
          description="FedTrimmedAvg (Yin et al. 2018): coordinate-wise mean without the beta fraction at each end")
_register("krum", KrumParams, "KrumServer", reducible=False, check=_check_krum,
          description="Krum (Blanchard et al. 2017): the one model closest to its n - f - 2 nearest neighbours")
_register("multikrum", MultiKrumParams, "MultiKrumServer", reducible=False, check=_check_krum,
          description="Multi-Krum (Blanchard et al. 2017): FedAvg over the m models with the best Krum scores")
_register("bulyan", BulyanParams, "BulyanServer", reducible=False, check=_check_bulyan,
          description="Bulyan (El Mhamdi et al. 2018): Multi-Krum selection, then a trimmed mean around the median")
_register("qfedavg", QFedAvgParams, "QFedAvgServer", reducible=False,
          description="q-FedAvg (Li et al. 2020): fair aggregation weighting clients by loss^q")
_register("fedavg-dp-server", DPFixedClippingParams, "DPServerSideServer", reducible=False,
          description="FedAvg with central DP, server-side fixed clipping of each update, Gaussian noise on the "
                      "average (Flower's DifferentialPrivacyServerSideFixedClipping)")
_register("fedavg-dp-client", DPFixedClippingParams, "DPClientSideServer", reducible=False,
          description="FedAvg with central DP, clients clip their own updates (the norm travels in the train "
                      "config), Gaussian noise on the average (Flower's DifferentialPrivacyClientSideFixedClipping)")
