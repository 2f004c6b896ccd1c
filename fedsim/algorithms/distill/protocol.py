"""Server-side distillation of the one-shot uploads: FedDF, DENSE and Co-Boosting (parameters and registrations).

All three are one-shot: every client trains the common initial model once on its own data and uploads it, exactly
as the one-shot baselines do (the same client part, ``fedsim.clients.oneshot:LocalModelClient``, and the same
messages, ``fedsim.frameworks.oneshot_protocol``: the same partitions, seeds, local training budget and bytes). They differ only
in what the server does with the M uploaded models:

- ``feddf``        (Lin et al., NeurIPS 2020) distills the ensemble's averaged logits into one model on unlabeled
                   server data: a held-out part of the training set that no client holds (``data.server_holdout``)
                   or another dataset, starting from the uniform average of the local models.
- ``dense``        (Zhang et al., NeurIPS 2022) is data-free: a generator trained against the ensemble (BatchNorm
                   statistics, cross-entropy on sampled labels, adversarial disagreement with the student)
                   synthesizes the distillation data, one batch per epoch, and the student distills on all of it.
- ``co-boosting``  (Dai et al., ICLR 2024) is DENSE's loop with hard-sample synthesis (focal-weighted
                   cross-entropy, adversarial term on every sample), per-client ensemble weights re-fitted on the
                   synthetic data every epoch, and output-diversified perturbations of the distillation inputs.

The torch side lives in ``fedsim.frameworks.distill`` (KD loop, generator, BatchNorm-statistics hooks, the server framework);
the server parts in ``fedsim.strategies.feddf`` / ``dense`` / ``coboosting``. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim import catalog
from fedsim.errors import ConfigError
from fedsim.frameworks.oneshot_protocol import WEIGHTINGS, check_one_shot
from fedsim.params import Interval, Options
from fedsim.registry import StrategySpec, register_strategy

POSITIVE = Interval(0, None, closed="neither")
NON_NEGATIVE = Interval(0, None)
AT_LEAST_1 = Interval(1, None, integer=True)

DISTILL_DATA = ("holdout", "dataset")  # FedDF: a held-out part of the training split, or another dataset
SPLITS = ("train", "test")
INITS = ("average", "initial")  # the student starts from the uniform average of the local models / from w_0
# WEIGHTINGS (of the initial average): the one-shot family's, fedsim.frameworks.oneshot_protocol
SCHEDULES = ("cosine", "constant")
LABELS = ("balanced", "random")  # labels of a synthesized batch: classes in turn, or drawn uniformly (official)

FEDDF_HOLDOUT = 0.1  # FedDF's server data when the scenario sets no data.server_holdout


@dataclass
class FedDFParams:
    """FedDF's server-side ensemble distillation; defaults are the official code's (epfml/federated-learning-public-
    code, FedDF-code: ``update_student_scheme=avg_logits``, Adam 1e-3 with cosine annealing over 10^4 batches of
    128, gradient norm clipped at 5, temperature 1)."""

    distill_data: str = "holdout"  # "holdout": data.server_holdout of the training split | "dataset": see below
    dataset: str | None = None  # distill_data = "dataset": a dataset name (the images' shape must be the scenario's)
    dataset_split: str = "train"
    dataset_size: int | None = None  # at most this many of its images (a seeded draw); unset: all
    dataset_resize: bool = False  # bring that dataset's images to the scenario's shape (bilinear; 1 <-> C channels)
    steps: int = 10000  # distillation batches (official total_n_server_pseudo_batches)
    batch_size: int = 128
    lr: float = 1e-3  # Adam
    schedule: str = "cosine"  # cosine annealing over `steps` (official) | constant
    temperature: float = 1.0  # KL(softmax(t / T) || softmax(s / T)) * T^2
    clip_norm: float | None = 5.0  # gradient-norm clipping (official); unset: none
    init: str = "average"  # the student starts from the uniform average of the local models (the paper)
    init_weighting: str = "uniform"  # of that average: 1 / M (official) | n_k / n

    _parameter_constraints = {
        "distill_data": [Options(DISTILL_DATA)], "dataset": [Options(catalog.DATASETS), None],
        "dataset_split": [Options(SPLITS)], "dataset_size": [AT_LEAST_1, None], "steps": [AT_LEAST_1],
        "batch_size": [AT_LEAST_1], "lr": [POSITIVE], "schedule": [Options(SCHEDULES)],
        "temperature": [POSITIVE], "clip_norm": [POSITIVE, None], "init": [Options(INITS)],
        "init_weighting": [Options(WEIGHTINGS)],
    }

    def check(self, path: str) -> None:
        if self.distill_data == "dataset" and self.dataset is None:
            raise ConfigError(f"{path}.dataset: unset, but distill_data = 'dataset' needs one; name a dataset "
                              f"whose images have the scenario's shape (e.g. 'mnist' for 'fashion-mnist')")

    def server_holdout_default(self) -> float:
        """The server's share of the training split when ``data.server_holdout`` is unset (fedsim.scenario)."""
        return FEDDF_HOLDOUT if self.distill_data == "holdout" else 0.0


@dataclass
class DenseParams:
    """DENSE's data-free distillation; defaults are the official code's KD command (github zj-jayzhang/DENSE,
    README: ``--epochs 200 --g_steps 30 --lr_g 1e-3 --synthesis_batch_size 256 --batch_size 256 --lr 0.005 --T 20
    --bn 1 --oh 1 --adv 1``, nz 256, generator width 64). Differences: docs/results-oneshot.md."""

    epochs: int = 200  # synthesis + distillation rounds (one synthesized batch each)
    g_steps: int = 30  # generator steps per synthesized batch
    lr_g: float = 1e-3  # Adam (betas 0.5, 0.999) over the generator and its latent codes
    synthesis_batch_size: int = 256
    nz: int = 256  # latent dimension
    ngf: int = 64  # generator width
    bn: float = 1.0  # weight of the BatchNorm-statistics term
    oh: float = 1.0  # weight of the cross-entropy term on the sampled labels
    adv: float = 1.0  # weight of the adversarial (student-ensemble disagreement) term
    labels: str = "balanced"  # sampled labels: every class in turn | "random": uniform draws (official)
    augment: bool = True  # random crop (zero padding H / 8) and horizontal flip of what the ensemble sees (official)
    batch_size: int = 256  # distillation batch
    lr: float = 0.005  # student SGD
    momentum: float = 0.9
    temperature: float = 20.0
    student_init: str = "initial"  # a fresh network (the common w_0; official) | "average" of the local models

    _parameter_constraints = {
        "epochs": [AT_LEAST_1], "g_steps": [AT_LEAST_1], "lr_g": [POSITIVE], "synthesis_batch_size": [AT_LEAST_1],
        "nz": [AT_LEAST_1], "ngf": [AT_LEAST_1], "bn": [NON_NEGATIVE], "oh": [NON_NEGATIVE], "adv": [NON_NEGATIVE],
        "labels": [Options(LABELS)], "batch_size": [AT_LEAST_1], "lr": [POSITIVE],
        "momentum": [Interval(0, 1, closed="left")], "temperature": [POSITIVE], "student_init": [Options(INITS)],
    }

    def check(self, path: str) -> None:
        if self.synthesis_batch_size < 2:
            raise ConfigError(f"{path}.synthesis_batch_size: {self.synthesis_batch_size} is too small; the "
                              "generator's BatchNorm needs at least 2 images per batch")


@dataclass
class CoBoostingParams:
    """Co-Boosting's synthesis and distillation; defaults are the official code's (github rong-dai/Co-Boosting,
    ``co_boosting.sh`` and ``datafree_kd.py``: 200 epochs, 30 generator steps at 1e-3, batches of 128, bn 0, oh 1,
    adv 1 at T 3, hs 1, ODS eta 8/255, re-weighting mu 0.01 with decay 0.99 and one pass, KD SGD 0.01 with weight
    decay 1e-4 and cosine annealing, T 4, clipped at 10). Differences: docs/results-oneshot.md."""

    epochs: int = 200
    g_steps: int = 30
    lr_g: float = 1e-3
    synthesis_batch_size: int = 128
    nz: int = 256
    ngf: int = 64
    bn: float = 0.0  # the official default leaves the BatchNorm-statistics term out
    oh: float = 1.0  # weight of the hard-sample (focal) cross-entropy
    hs: float = 1.0  # its exponent: (1 - p)^hs
    adv: float = 1.0
    adv_temperature: float = 3.0
    labels: str = "balanced"  # | "random": uniform draws (official)
    mu: float = 0.01  # ensemble re-weighting step, decayed by wdc per epoch
    wdc: float = 0.99
    wa_steps: int = 1  # re-weighting passes over the pool per epoch
    ods_eta: float = 4 / 255  # ODS step on distillation inputs in [0, 1] (official 8/255 on inputs scaled to [-1, 1])
    ods_temperature: float = 4.0
    batch_size: int = 128  # distillation batch
    lr: float = 0.01  # student SGD, cosine-annealed over the epochs
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 4.0
    clip_norm: float | None = 10.0  # student and generator gradient norms
    student_init: str = "initial"

    _parameter_constraints = {
        "epochs": [AT_LEAST_1], "g_steps": [AT_LEAST_1], "lr_g": [POSITIVE], "synthesis_batch_size": [AT_LEAST_1],
        "nz": [AT_LEAST_1], "ngf": [AT_LEAST_1], "bn": [NON_NEGATIVE], "oh": [NON_NEGATIVE], "hs": [NON_NEGATIVE],
        "adv": [NON_NEGATIVE], "adv_temperature": [POSITIVE], "labels": [Options(LABELS)], "mu": [NON_NEGATIVE],
        "wdc": [Interval(0, 1, closed="right")], "wa_steps": [Interval(0, None, integer=True)],
        "ods_eta": [NON_NEGATIVE], "ods_temperature": [POSITIVE], "batch_size": [AT_LEAST_1], "lr": [POSITIVE],
        "momentum": [Interval(0, 1, closed="left")], "weight_decay": [NON_NEGATIVE], "temperature": [POSITIVE],
        "clip_norm": [POSITIVE, None], "student_init": [Options(INITS)],
    }

    def check(self, path: str) -> None:
        if self.synthesis_batch_size < 2:
            raise ConfigError(f"{path}.synthesis_batch_size: {self.synthesis_batch_size} is too small; the "
                              "generator's BatchNorm needs at least 2 images per batch")


def _check_feddf(config) -> None:  # noqa: ANN001
    check_one_shot(config)
    p = config.strategy.params
    if p.distill_data == "holdout" and config.data.server_holdout == 0:
        raise ConfigError("data.server_holdout: 0 leaves FedDF no distillation data (strategy.distill_data = "
                          "'holdout'); set a fraction in (0, 1) or strategy.distill_data = 'dataset'")


def _one_round(params) -> int:  # noqa: ANN001
    return 1


_CLIENT = "fedsim.clients.oneshot:LocalModelClient"

register_strategy(StrategySpec(
    name="feddf", params=FedDFParams, server="fedsim.strategies.feddf:FedDFServer", client=_CLIENT,
    check=_check_feddf, fixed_rounds=_one_round, reducible=True, server_holdout=FedDFParams.server_holdout_default,
    description="FedDF (Lin et al. 2020), one-shot: the local models' ensemble distilled into one model on "
                "unlabeled server data (held-out training images or another dataset)",
))
register_strategy(StrategySpec(
    name="dense", params=DenseParams, server="fedsim.strategies.dense:DenseServer", client=_CLIENT,
    check=check_one_shot, fixed_rounds=_one_round, reducible=True,
    description="DENSE (Zhang et al. 2022): data-free one-shot FL, a generator trained against the ensemble "
                "synthesizes the distillation data",
))
register_strategy(StrategySpec(
    name="co-boosting", params=CoBoostingParams, server="fedsim.strategies.coboosting:CoBoostingServer",
    client=_CLIENT, check=check_one_shot, fixed_rounds=_one_round, reducible=True,
    description="Co-Boosting (Dai et al. 2024): data-free one-shot FL, hard-sample synthesis and ensemble "
                "re-weighting boost each other",
))
