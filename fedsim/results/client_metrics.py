"""How one global model serves each client: test accuracy re-weighted to every client's own label mix.

Under label skew a single test accuracy hides who is served badly. With a_c the model's test accuracy on class c
and p_k(c) the share of class c in client k's training partition, client k's accuracy on data drawn like its own
is  acc_k = sum_c p_k(c) a_c  (the expected accuracy on its label distribution; exact for label skew, where the
class-conditional inputs are shared). It needs one evaluation on the common test set, not a test split per client,
so it is cheap at thousands of clients. Reported per round as the mean, the worst client and the spread
(standard deviation) over clients with data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["label_counts", "client_accuracies", "client_accuracy_summary"]


def label_counts(partitions: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(clients, classes) matrix of example counts: partition k holds indices into `labels`."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros((len(partitions), num_classes), dtype=np.int64)
    for k, idx in enumerate(partitions):
        if len(idx):
            out[k] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)[:num_classes]
    return out


def client_accuracies(class_accuracy: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """acc_k = sum_c p_k(c) a_c for every client with data (NaN for empty clients).

    Classes the test set lacks (a_c NaN) are left out and the client's remaining shares renormalized; a client whose
    classes are all absent from the test set gets NaN.
    """
    acc = np.asarray(class_accuracy, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    width = min(acc.shape[0], counts.shape[1])
    acc, counts = acc[:width], counts[:, :width]
    known = ~np.isnan(acc)
    weights = counts * known
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights @ np.where(known, acc, 0.0) / total, np.nan)


def client_accuracy_summary(class_accuracy: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """{"client_acc_mean", "client_acc_min", "client_acc_std"} over clients with data; {} when there are none."""
    acc = client_accuracies(class_accuracy, counts)
    acc = acc[~np.isnan(acc)]
    if acc.size == 0:
        return {}
    return {"client_acc_mean": float(acc.mean()), "client_acc_min": float(acc.min()),
            "client_acc_std": float(acc.std())}
