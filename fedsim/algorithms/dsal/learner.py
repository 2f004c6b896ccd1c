"""DS-AL's learner: a main analytic stream and a compensation stream fitted to its residual.

DS-AL (Zhuang et al., "DS-AL: A Dual-Stream Analytic Learning for Exemplar-Free Class-Incremental Learning",
AAAI 2024); official code github ZHUANGHP/Analytic-continual-learning, ``analytic/DSAL.py``. On ACIL's frozen
backbone (``fedsim.algorithms.acil``) one linear buffer z = f(x) B (no activation) feeds two ridge classifiers:

    main stream          H_m = relu(z),  W_m = (sum_t H_m,t^T H_m,t + gamma_main I)^-1 sum_t H_m,t^T Y_t
    residual (PLC)       Y~_t = (Y_t - H_m,t W_m) with every column but task t's new classes set to 0
                         ("previous label cleansing": only the new classes' residual is compensated)
    compensation stream  H_c = tanh(z),  W_c = (sum_t H_c,t^T H_c,t + gamma_comp I)^-1 sum_t H_c,t^T Y~_t
    prediction           argmax( H_m W_m + C H_c W_c ),  C = the compensation ratio

The official ``DSAL.fit`` runs this per mini-batch of ``--IL-batch-size`` (4096 in its README commands): the main
stream absorbs the batch by recursive least squares, then the residual of that batch is taken under the updated
W_m. fedsim takes the residual of a whole task under the task's final W_m (its statistics form: the same when a
task fits in one batch, as every task of fedsim's Fashion-MNIST scenarios does at 4,000 images; different, and
not weight-invariant, when a task spans several official batches). Both streams are sums of per-sample
statistics given W_m, so federated DS-AL takes two exchanges per task: the clients' main statistics and
compensation Gram (summed, W_m solved), then W_m down and the clients' H_c^T Y~ up; the server's W_m and W_c
equal the centralized ones on the union of the clients' data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.algorithms.acil.learner import ACIL, masked_argmax
from fedsim.analytic import RidgeStatistics, one_hot
from fedsim.estimator import BaseLearner
from fedsim.nn.features import ACTIVATIONS

__all__ = ["DSAL", "residual_targets", "stream_features"]


def stream_features(z: np.ndarray, activation: str) -> np.ndarray:
    """act(z) of the linear buffer output z (float64 numpy), by the name of a ``fedsim.nn.features`` activation."""
    import torch

    with torch.inference_mode():
        return ACTIVATIONS[activation](torch.as_tensor(np.asarray(z, np.float64))).numpy()


def residual_targets(h_main: np.ndarray, labels: Any, w_main: np.ndarray, new_classes: Any,
                     num_classes: int) -> np.ndarray:
    """Y~ = Y - H_m W_m, every column outside ``new_classes`` zeroed (the official PLC: ``Y_comp[:, :-k] = 0``
    keeps the last k = ``increase_size`` label columns, which are the task's new classes in its label order)."""
    y = one_hot(np.asarray(labels, np.int64), num_classes)
    out = y - np.asarray(h_main, np.float64) @ np.asarray(w_main, np.float64)[:, :num_classes]
    keep = np.zeros(num_classes, bool)
    keep[np.asarray(new_classes, np.int64)] = True
    out[:, ~keep] = 0.0
    return out


class DSAL(BaseLearner):
    """The two streams as ridge classifiers on accumulated statistics (see the module docstring).

    ``add_main(stats)`` then ``add_compensation(stats)`` per task (the server's form, for summed client statistics);
    ``partial_fit(z, y, new_classes, num_classes)`` does one task from its linear buffer features at once.
    Learned state: ``main_`` and ``comp_`` (``fedsim.algorithms.acil.learner.ACIL``), ``coef_main_``, ``coef_comp_``.
    """

    _fitted_attribute = "main_"
    _fit_hint = "call add_main or partial_fit"

    def __init__(self, gamma_main: float = 0.1, gamma_comp: float = 0.1, compensation: float = 1.0,
                 activation_main: str = "relu", activation_comp: str = "tanh") -> None:
        self.gamma_main = gamma_main
        self.gamma_comp = gamma_comp
        self.compensation = compensation
        self.activation_main = activation_main
        self.activation_comp = activation_comp

    @property
    def coef_main_(self) -> np.ndarray:
        self._check_fitted()
        return self.main_.coef_

    @property
    def coef_comp_(self) -> np.ndarray:
        self._check_fitted()
        return self.comp_.coef_ if hasattr(self.comp_, "coef_") else np.zeros_like(self.main_.coef_)

    def add_main(self, stats: RidgeStatistics) -> "DSAL":
        """The main stream's statistics of a task (relu features, one-hot targets); re-solves W_m."""
        if not self.is_fitted:
            self.main_ = ACIL(self.gamma_main)
            self.comp_ = ACIL(self.gamma_comp)
        self.main_.add_statistics(stats)
        return self

    def add_compensation(self, stats: RidgeStatistics) -> "DSAL":
        """The compensation stream's statistics of a task (tanh features, residual targets); re-solves W_c."""
        self._check_fitted()
        self.comp_.add_statistics(stats)
        return self

    def partial_fit(self, z: Any, labels: Any, new_classes: Any, num_classes: int) -> "DSAL":
        """One task from its linear buffer features z (n, d): main stream, residual under the new W_m, compensation."""
        z = np.asarray(z, np.float64)
        h_main, h_comp = stream_features(z, self.activation_main), stream_features(z, self.activation_comp)
        self.add_main(RidgeStatistics.from_data(h_main, labels, num_classes))
        targets = residual_targets(h_main, labels, self.coef_main_, new_classes, num_classes)
        return self.add_compensation(RidgeStatistics.from_data(h_comp, targets, num_classes))

    def decision_function(self, z: Any) -> np.ndarray:
        """H_m W_m + C H_c W_c on linear buffer features z."""
        z = np.asarray(z, np.float64)
        return (stream_features(z, self.activation_main) @ self.coef_main_
                + self.compensation * stream_features(z, self.activation_comp) @ self.coef_comp_)

    def predict(self, z: Any, classes: Any) -> np.ndarray:
        return masked_argmax(self.decision_function(z), classes)
