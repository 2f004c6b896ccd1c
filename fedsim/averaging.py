"""The one weighted model average (FedAvg's rule), for every place that averages model states.

    w = sum_m (f_m w_m),  f_m = weights_m / sum(weights)   (uniform when no weights are given or all are 0)

Floating entries are accumulated in float64 and returned in their own dtype. Integer entries (BatchNorm's
``num_batches_tracked``) are averaged the same way and returned as float64, as Flower's own FedAvg aggregation
does, so a node that pre-averages its clients (``reduce``) gives the global result FedAvg would; BatchNorm does not
read that counter when its momentum is set (torch's default), so it changes no prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["weighted_average", "average_factors"]


def average_factors(count: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """The normalized factors f_m of ``weighted_average``."""
    if count < 1:
        raise ValueError("nothing to average")
    w = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != count:
        raise ValueError(f"{len(w)} weights for {count} states")
    total = w.sum()
    return w / total if total > 0 else np.full(count, 1.0 / count)


def weighted_average(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | None = None
                     ) -> dict[str, np.ndarray]:
    """Weighted mean of state dicts with equal keys (see the module docstring for the dtype rule)."""
    factors = average_factors(len(states), weights)
    out = {}
    for key in states[0]:
        first = np.asarray(states[0][key])
        acc = np.zeros(first.shape, dtype=np.float64)
        for f, state in zip(factors, states):
            acc += f * np.asarray(state[key], dtype=np.float64)
        out[key] = acc.astype(first.dtype) if np.issubdtype(first.dtype, np.floating) else acc
    return out
