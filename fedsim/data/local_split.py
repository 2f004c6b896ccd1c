"""Local test splits: each client keeps a seeded share of its own data for testing (``partition.test_fraction``).

Personalized evaluation (PFLlib's and FL-bench's standard) measures the global model on every client's own held-out
data. With fraction f a client of n samples holds out ``ceil(f * n)`` of them (scikit-learn's rounding of a
fractional ``test_size``), but always keeps at least one sample to train on: a client with fewer than 2 samples holds
out nothing. The split is ``sklearn.model_selection.train_test_split`` over the client's indices with the client's
own seed, **stratified** by label where scikit-learn can stratify it (every class of the client has at least 2
samples, and both sides have at least as many samples as the client has classes); otherwise, for a client too small
or too skewed, a plain seeded split of the same sizes. The held-out indices are removed from what the client trains
on (``fedsim.scenario.partition_for`` returns the training side), so train and test never overlap.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["test_size", "split_client", "local_splits"]


def test_size(n: int, fraction: float) -> int:
    """How many of a client's ``n`` samples are held out: ceil(fraction * n), at most n - 1 (0 when n < 2)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(int(math.ceil(fraction * n)), n - 1)


test_size.__test__ = False  # not a pytest test when imported into a test module


def split_client(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train indices, test indices, stratified) of one client, both sorted; ``labels`` are the labels of the whole
    training split (``indices`` index into it)."""
    from sklearn.model_selection import train_test_split

    indices = np.sort(np.asarray(indices, dtype=np.int64))
    k = test_size(len(indices), fraction)
    if k == 0:
        return indices, np.empty(0, dtype=np.int64), False
    y = np.asarray(labels)[indices]
    classes, counts = np.unique(y, return_counts=True)
    stratify = counts.min() >= 2 and k >= len(classes) and len(indices) - k >= len(classes)
    train, test = train_test_split(indices, test_size=k, random_state=seed, shuffle=True,
                                   stratify=y if stratify else None)
    return np.sort(train), np.sort(test), bool(stratify)


def local_splits(partitions: list[np.ndarray], labels: np.ndarray, fraction: float, seeds: list[int]
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training parts, local test parts) of every client: client k split by ``split_client`` with ``seeds[k]``."""
    train, test = [], []
    for part, seed in zip(partitions, seeds, strict=True):
        tr, te, _ = split_client(part, labels, fraction, seed)
        train.append(tr)
        test.append(te)
    return train, test
