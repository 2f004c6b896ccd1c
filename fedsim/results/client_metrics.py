"""How one global model serves each client: the per-client table (clients.csv) and the per-client accuracies.

Two accuracies per client, named apart so they cannot be confused:

- ``local_accuracy``: the global model on the client's own held-out data (``partition.test_fraction``,
  ``evaluation.mode = "local"`` or ``"both"``; ``fedsim.data.local_split``), an exact count of correct predictions;
- ``label_mix_accuracy``: the common test set's accuracy re-weighted to the client's label mix (below), the
  estimate fedsim makes without local test data (``evaluation.mode = "global"`` or ``"both"``).

The label-mix estimate:

Under label skew a single test accuracy hides who is served badly. With a_c the model's test accuracy on class c
and p_k(c) the share of class c in client k's training partition, client k's accuracy on data drawn like its own
is  acc_k = sum_c p_k(c) a_c  (the expected accuracy on its label distribution; exact for label skew, where the
class-conditional inputs are shared). It needs one evaluation on the common test set, not a test split per client,
so it is cheap at thousands of clients. Reported per round as the mean, the worst client and the spread
(standard deviation) over clients with data.
"""

from __future__ import annotations

import numpy as np

from typing import Any

import pandas as pd

__all__ = ["label_counts", "client_accuracies", "client_accuracy_summary", "accuracy_spread", "local_accuracies",
           "predict_classes", "ClientLedger", "CLIENT_COLUMNS", "LOCAL_ACCURACY", "LABEL_MIX_ACCURACY"]

LOCAL_ACCURACY = "local_accuracy"  # clients.csv: the global model on the client's own held-out data
LABEL_MIX_ACCURACY = "label_mix_accuracy"  # clients.csv: the test accuracy re-weighted to the client's label mix
#: clients.csv's columns (then test_samples where local test splits exist, then the accuracies measured)
CLIENT_COLUMNS = ["round", "client", "selected", "samples", "train_loss", "bytes_up", "bytes_down", "failed",
                  "silent"]


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
    return accuracy_spread(client_accuracies(class_accuracy, counts), "client_acc")


def accuracy_spread(acc: np.ndarray, prefix: str) -> dict[str, float]:
    """{prefix_mean, prefix_min, prefix_std} (population std) over the non-NaN entries; {} when there are none."""
    acc = np.asarray(acc, dtype=np.float64)
    acc = acc[~np.isnan(acc)]
    if acc.size == 0:
        return {}
    return {f"{prefix}_mean": float(acc.mean()), f"{prefix}_min": float(acc.min()), f"{prefix}_std": float(acc.std())}


def local_accuracies(pred: np.ndarray, labels: np.ndarray, owner: np.ndarray, num_clients: int) -> np.ndarray:
    """Client k's accuracy on its own test rows (``owner == k``): correct / held out, exact counts; NaN for a
    client that holds out nothing."""
    owner = np.asarray(owner, dtype=np.int64)
    held = np.bincount(owner, minlength=num_clients)[:num_clients].astype(np.float64)
    right = np.bincount(owner[np.asarray(pred) == np.asarray(labels)], minlength=num_clients)[:num_clients]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(held > 0, right / np.maximum(held, 1), np.nan)


def predict_classes(model: Any, x: Any, batch_size: int, device: str = "cpu") -> np.ndarray:
    """argmax of ``model(x)`` (a module mapping inputs to class scores, as ``ctx.save_model`` takes), in eval
    mode, ``batch_size`` rows at a time; inputs in float64 where the module's first floating tensor is (as the
    conformance suite reloads model.pt). The module is left on the device it was on."""
    import torch

    from fedsim.nn.training import predict_logits

    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    where = tensors[0].device if tensors else torch.device("cpu")
    x = torch.as_tensor(x)
    if tensors and tensors[0].dtype == torch.float64:
        x = x.double()
    try:
        return predict_logits(model, x, batch_size=batch_size, device=device).argmax(1).numpy()
    finally:
        model.to(where)


class ClientLedger:
    """The rows of clients.csv: one per (round, client) that was sent a message or whose accuracy was measured.

    Filled by the engine, not by the strategies: the accounting grid records what each client was sent and what it
    answered (``sent`` / ``replied`` / ``lost``: bytes, the examples and train loss its reply reported, failures,
    silence), the server context the accuracies it measured (``measured``). ``round`` is the round the message
    carried (Flower's ``group_id``; the metrics.csv step for the models' rounds); a client's several messages of
    one round add their bytes, and samples / train_loss are those of the last reply that reported them.
    """

    def __init__(self) -> None:
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}
        self._text: dict[int, str] = {}  # clients.csv lines of each round, rendered once (see ``csv``)
        self._text_columns: list[str] = []

    def _row(self, round_: int, pid: int) -> dict[str, Any]:
        key = (int(round_), int(pid))
        self._text.pop(key[0], None)  # the round changes: render it again
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = {"round": key[0], "client": key[1], "selected": False, "samples": np.nan,
                                    "train_loss": np.nan, "bytes_up": 0, "bytes_down": 0, "failed": False,
                                    "silent": False}
        return row

    def sent(self, round_: int, pids: list[int], nbytes: int) -> None:
        for pid in pids:
            row = self._row(round_, pid)
            row["selected"] = True
            row["bytes_down"] += int(nbytes)

    def replied(self, round_: int, accounting: dict[str, list]) -> None:
        """A reply's per-client accounting (``fedsim.engine.server.accounting_of``)."""
        examples = accounting.get("client_examples") or []
        losses = accounting.get("client_train_loss") or []
        for i, (pid, size) in enumerate(zip(accounting["partition_ids"], accounting["client_bytes"])):
            row = self._row(round_, pid)
            row["bytes_up"] += int(size)
            if i < len(examples) and examples[i] >= 0:
                row["samples"] = int(examples[i])
            if i < len(losses) and losses[i] == losses[i]:
                row["train_loss"] = float(losses[i])
        self.lost(round_, accounting["failed_ids"])

    def lost(self, round_: int, pids: list[int], silent: bool = False) -> None:
        """Clients of ``round_`` without a usable reply: failed (injected, crashed) or, ``silent``, timed out."""
        for pid in pids:
            row = self._row(round_, pid)
            row["failed"] = True
            row["silent"] = row["silent"] or silent

    def measured(self, round_: int, column: str, values: np.ndarray, only_missing: bool = False) -> None:
        """Accuracy ``column`` of every client (``values[k]``; NaN entries skipped) at ``round_``."""
        for pid, value in enumerate(np.asarray(values, dtype=np.float64)):
            if value == value:
                row = self._row(round_, pid)
                if not (only_missing and row.get(column, np.nan) == row.get(column, np.nan)):
                    row[column] = float(value)

    def _columns(self, test_samples: list[int] | None) -> list[str]:
        rows = self.rows.values()
        measured = [c for c in (LOCAL_ACCURACY, LABEL_MIX_ACCURACY) if any(c in r for r in rows)]
        return CLIENT_COLUMNS + (["test_samples"] if test_samples is not None else []) + measured

    def frame(self, test_samples: list[int] | None = None, keys: list[tuple[int, int]] | None = None
              ) -> pd.DataFrame:
        """clients.csv, sorted by round and client (or the rows ``keys``); ``test_samples``: each client's local
        test size, where local test splits exist."""
        keys = sorted(self.rows) if keys is None else keys
        table = pd.DataFrame([self.rows[k] for k in keys], columns=self._columns(test_samples))
        table["samples"] = table["samples"].astype("Int64")
        if test_samples is not None:
            table["test_samples"] = [test_samples[c] if c < len(test_samples) else 0 for c in table["client"]]
        return table

    def csv(self, test_samples: list[int] | None = None) -> str:
        """``frame(...).to_csv(index=False)``, re-rendering only the rounds that changed since the last call (the
        server rewrites clients.csv at every metrics row, as metrics.csv)."""
        columns = self._columns(test_samples)
        if columns != self._text_columns:
            self._text, self._text_columns = {}, columns
        by_round: dict[int, list[tuple[int, int]]] = {}
        for key in sorted(self.rows):
            by_round.setdefault(key[0], []).append(key)
        for round_, keys in by_round.items():
            if round_ not in self._text:
                self._text[round_] = self.frame(test_samples, keys).to_csv(index=False, header=False)
        return ",".join(columns) + "\n" + "".join(self._text[r] for r in sorted(by_round))
