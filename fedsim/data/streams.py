"""Continual-learning views of a dataset: class-incremental tasks and single-pass online streams.

Everything here works on label arrays and returns index arrays into the full dataset, so the same code serves a
centralized stream (``labels`` of the whole split) and one stream per federated client (``client_streams``,
from that client's partition). The class order is the one thing clients share: it is drawn once from the
seed, so "task t" or "the r-th class to arrive" means the same classes on every client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from fedsim.errors import ConfigError

__all__ = [
    "STREAMS",
    "IMBALANCES",
    "Task",
    "OnlineStream",
    "class_incremental",
    "generalized_class_incremental",
    "online_stream",
    "client_streams",
    "split_classes",
]

STREAMS: dict[str, str] = {
    "class-incremental": "disjoint groups of classes arrive task by task; each task holds all samples of its classes",
    "online": "one pass over mini-batches, each sample at most once, optionally long-tailed and with classes "
    "arriving over time",
}
IMBALANCES = ("none", "long-tail")


@dataclass(eq=False)
class Task:
    """One class-incremental task: its position, its classes and the indices (into the dataset) of their samples."""

    index: int
    classes: list[int]
    indices: np.ndarray
    #: classes with samples in this task (generalized streams: ``classes`` are the ones that first appear here,
    #: ``present`` also those that recur); empty = ``classes`` (the disjoint split)
    present: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(len(self.indices))


@dataclass(eq=False)
class OnlineStream:
    """A single pass of mini-batches (index arrays into the dataset; each sample appears at most once).

    ``classes`` is the class arrival order, ``class_counts`` how many samples of each class the stream keeps
    (0 for a class this stream lacks), ``phases`` the groups of classes that arrive together (empty when
    classes are not ordered over time).
    """

    batches: list[np.ndarray]
    classes: list[int]
    class_counts: dict[int, int]
    phases: list[list[int]] = field(default_factory=list)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return int(sum(len(b) for b in self.batches))

    @property
    def indices(self) -> np.ndarray:
        """All indices in stream order."""
        return np.concatenate(self.batches) if self.batches else np.empty(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------- validation
def _int(field_name: str, value: object, lo: int, hi: int | None = None, allowed: str | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if ok and value >= lo and (hi is None or value <= hi):
        return int(value)
    rng = allowed or (f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
    raise ConfigError(f"stream.{field_name}: got {value!r}; allowed: {rng}")


def _labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"stream: labels must be a 1-D array, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _class_order(labels: np.ndarray, seed: int, class_order: Sequence[int] | None) -> list[int]:
    """The given order (checked), or a seeded permutation of the classes present in ``labels``."""
    present = [int(c) for c in np.unique(labels)]
    if class_order is None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        return [present[i] for i in rng.permutation(len(present))]
    order = [int(c) for c in class_order]
    if len(set(order)) != len(order):
        raise ConfigError(f"stream.class_order: repeats a class: {order}; allowed: each class once")
    missing = sorted(set(present) - set(order))
    if missing:
        raise ConfigError(
            f"stream.class_order: leaves out classes {missing} that occur in the data; allowed: an order of all "
            f"classes {present} (it may also list classes absent from this data)"
        )
    return order


def split_classes(order: list[int], tasks: int, first_task_classes: int | None = None) -> list[list[int]]:
    """Cut a class order into ``tasks`` groups: the first has ``first_task_classes`` (default: an even share),
    the others split the remaining classes evenly. Raises ``ConfigError`` naming the field when impossible."""
    n = len(order)
    tasks = _int("tasks", tasks, 1, max(n, 1), allowed=f"an integer in [1, {n}] (the number of classes)")
    if first_task_classes is None:
        if n % tasks:
            divisors = [t for t in range(1, n + 1) if n % t == 0]
            raise ConfigError(
                f"stream.tasks: {n} classes do not split evenly into {tasks} tasks; allowed: one of {divisors}, "
                f"or set stream.first_task_classes so the rest splits evenly"
            )
        size = n // tasks
        return [order[i * size:(i + 1) * size] for i in range(tasks)]
    if tasks == 1:
        valid = [n]
    else:
        valid = [f for f in range(1, n - (tasks - 1) + 1) if (n - f) % (tasks - 1) == 0]
    if isinstance(first_task_classes, bool) or not isinstance(first_task_classes, (int, np.integer)) or first_task_classes not in valid:
        raise ConfigError(
            f"stream.first_task_classes: got {first_task_classes!r} for {n} classes in {tasks} tasks; allowed: "
            f"{valid if valid else 'none (too many tasks)'}"
        )
    f = int(first_task_classes)
    groups = [order[:f]]
    if tasks > 1:
        size = (n - f) // (tasks - 1)
        groups += [order[f + i * size:f + (i + 1) * size] for i in range(tasks - 1)]
    return groups


# ------------------------------------------------------------------------------------ class-incremental
def _tasks_for(labels: np.ndarray, idx: np.ndarray, groups: list[list[int]]) -> list[Task]:
    sub = labels[idx]
    return [
        Task(index=t, classes=list(g), indices=np.sort(idx[np.isin(sub, g)]).astype(np.int64))
        for t, g in enumerate(groups)
    ]


def class_incremental(
    labels: np.ndarray,
    tasks: int,
    seed: int,
    first_task_classes: int | None = None,
    class_order: list[int] | None = None,
) -> list[Task]:
    """Split the classes into ``tasks`` disjoint groups in a seeded (or given) order; task t holds every sample
    of its classes. ``first_task_classes`` makes the first task larger (a common "base session" setup)."""
    labels = _labels(labels)
    seed = _int("seed", seed, 0)
    order = _class_order(labels, seed, class_order)
    groups = split_classes(order, tasks, first_task_classes)
    return _tasks_for(labels, np.arange(labels.shape[0], dtype=np.int64), groups)


def _fraction(field_name: str, value: object, closed_low: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and np.isfinite(value)
    if ok and (0 <= value <= 1 if closed_low else 0 < value <= 1):
        return float(value)
    raise ConfigError(f"stream.{field_name}: got {value!r}; allowed: a number in {'[0, 1]' if closed_low else '(0, 1]'}")


def generalized_class_incremental(
    labels: np.ndarray,
    tasks: int,
    seed: int,
    disjoint_fraction: float = 0.5,
    blurry_fraction: float = 0.1,
    class_order: list[int] | None = None,
) -> list[Task]:
    """Generalized class-incremental tasks (classes recur across tasks): the Si-Blurry split of G-ACIL's setting.

    Si-Blurry (Moon et al., "Online Class Incremental Learning on Stochastic Blurry Task Boundary via Mask and Visual
    Prompt Tuning", ICCV 2023, ``OnlineSampler`` with fixed N and M), which G-ACIL (Zhuang et al., NeurIPS 2024,
    arXiv 2403.15706) evaluates on. In the seeded (or given) class order, the first ``round(C * disjoint_fraction)``
    classes (N%) are *disjoint*: split evenly over the tasks, each lives in one task only. The others are *blurry*:
    split evenly over the tasks too (their "home" task), and ``blurry_fraction`` (M%) of each blurry class's samples
    leave its home: pooled over all blurry classes, shuffled and dealt evenly to every task, so a blurry class
    recurs in several tasks, also before its home task. Every sample is in exactly one task. Differences from
    MVP's sampler: classes that do not divide evenly are not dropped (MVP leaves them out of the stream), the
    first disjoint classes go to the first tasks.

    ``Task.classes`` are the classes whose first sample falls in that task (disjoint over tasks, so the accuracy
    matrix keeps its meaning: column j = the classes first seen in task j), ``Task.present`` every class with
    samples in it. Needs at least one disjoint class per task (so every task brings a new class).
    """
    labels = _labels(labels)
    seed = _int("seed", seed, 0)
    order = _class_order(labels, seed, class_order)
    n = len(order)
    tasks = _int("tasks", tasks, 1, max(n, 1), allowed=f"an integer in [1, {n}] (the number of classes)")
    disjoint_fraction = _fraction("disjoint_fraction", disjoint_fraction, closed_low=False)
    blurry_fraction = _fraction("blurry_fraction", blurry_fraction, closed_low=True)
    n_disjoint = int(round(n * disjoint_fraction))
    if n_disjoint < tasks:
        raise ConfigError(f"stream.disjoint_fraction: {disjoint_fraction!r} of {n} classes gives {n_disjoint} "
                          f"disjoint classes for {tasks} tasks; allowed: at least {tasks / n:.3g} (one new class "
                          f"per task), or fewer stream.tasks")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    home = {}
    for t, group in enumerate(np.array_split(np.asarray(order[:n_disjoint], np.int64), tasks)):
        home.update({int(c): t for c in group})
    for t, group in enumerate(np.array_split(np.asarray(order[n_disjoint:], np.int64), tasks)):
        home.update({int(c): t for c in group})
    disjoint = set(order[:n_disjoint])
    assigned = np.full(labels.shape[0], -1, np.int64)
    moved = []
    for c in order:
        members = np.flatnonzero(labels == c)
        assigned[members] = home[c]
        if c not in disjoint and members.size:
            k = int(members.size * blurry_fraction)
            moved.append(rng.choice(members, size=k, replace=False))
    pool = rng.permutation(np.concatenate(moved)) if moved else np.empty(0, np.int64)
    for t, part in enumerate(np.array_split(pool, tasks)):
        assigned[part] = t
    out, seen = [], set()
    for t in range(tasks):
        idx = np.flatnonzero(assigned == t).astype(np.int64)
        present = [c for c in order if np.any(labels[idx] == c)]
        new = [c for c in present if c not in seen]
        seen.update(new)
        out.append(Task(index=t, classes=new, indices=idx, present=present))
    return out


# ------------------------------------------------------------------------------------------------ online
def _check_online(batch_size, imbalance, imbalance_ratio, phases, num_classes) -> tuple[int, float, int | None]:
    batch_size = _int("batch_size", batch_size, 1)
    if imbalance not in IMBALANCES:
        raise ConfigError(f"stream.imbalance: got {imbalance!r}; allowed: {', '.join(IMBALANCES)}")
    if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, (int, float, np.number)) or not (
        np.isfinite(imbalance_ratio) and imbalance_ratio >= 1
    ):
        raise ConfigError(f"stream.imbalance_ratio: got {imbalance_ratio!r}; allowed: a finite number >= 1")
    if phases is not None:
        phases = _int("phases", phases, 1, max(num_classes, 1))
    return batch_size, float(imbalance_ratio), phases


def long_tail_quotas(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Samples kept per class, ``counts`` given in arrival order: rank r keeps
    min(available, max(1, round(n_max * ratio ** (-r / (C - 1))))) with n_max the largest available count.
    On class-balanced data max/min == ratio up to rounding; on skewed data (a client's share) availability can
    cut a class further, so the ratio is then an upper bound. Absent classes keep 0."""
    counts = np.asarray(counts, dtype=np.int64)
    c = counts.shape[0]
    if c == 0 or counts.max() == 0:
        return np.zeros_like(counts)
    n_max = int(counts.max())
    ranks = np.arange(c, dtype=np.float64)
    profile = ratio ** (-ranks / (c - 1)) if c > 1 else np.ones(1)
    quotas = np.maximum(1, np.rint(n_max * profile)).astype(np.int64)
    return np.minimum(counts, quotas)


def _online(
    labels: np.ndarray,
    idx: np.ndarray,
    order: list[int],
    rng: np.random.Generator,
    batch_size: int,
    imbalance: str,
    ratio: float,
    classes_over_time: bool,
    phases: int | None,
) -> OnlineStream:
    sub = labels[idx]
    per_class = {c: idx[sub == c] for c in order}
    counts = np.asarray([len(per_class[c]) for c in order], dtype=np.int64)
    keep = long_tail_quotas(counts, ratio) if imbalance == "long-tail" else counts
    kept = {}
    for c, k in zip(order, keep):
        members = per_class[c]
        kept[c] = members if k == len(members) else np.sort(rng.choice(members, size=int(k), replace=False))
    if classes_over_time:
        sections = min(phases or len(order), len(order))
        groups = [list(map(int, g)) for g in np.array_split(np.asarray(order, dtype=np.int64), sections)] if order else []
        pieces = []
        for g in groups:
            chunk = np.concatenate([kept[c] for c in g]) if g else np.empty(0, dtype=np.int64)
            pieces.append(rng.permutation(chunk))
        stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    else:
        groups = []
        allkept = np.concatenate([kept[c] for c in order]) if order else np.empty(0, dtype=np.int64)
        stream = rng.permutation(allkept)
    stream = stream.astype(np.int64, copy=False)
    batches = [stream[i:i + batch_size] for i in range(0, stream.shape[0], batch_size)]
    return OnlineStream(
        batches=batches,
        classes=list(order),
        class_counts={int(c): int(len(kept[c])) for c in order},
        phases=groups,
    )


def online_stream(
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    imbalance: str = "none",
    imbalance_ratio: float = 100.0,
    classes_over_time: bool = True,
    class_order: list[int] | None = None,
    *,
    phases: int | None = None,
) -> OnlineStream:
    """A single pass over (a subsample of) the data in mini-batches of ``batch_size`` (the last may be smaller).

    ``imbalance="long-tail"``: the class at rank r of the (seeded or given) class order keeps
    n_max * imbalance_ratio ** (-r / (C - 1)) samples (see ``long_tail_quotas``), so the first classes to arrive
    are the frequent ones. ``classes_over_time=True``: the class order is cut into ``phases`` consecutive groups
    (default: one class per phase) and the stream runs phase by phase, shuffled within each phase, so new classes
    appear progressively and a class never returns once its phase is over (batches at a phase boundary mix the
    two phases). ``False``: all kept samples in one uniform shuffle.
    """
    labels = _labels(labels)
    seed = _int("seed", seed, 0)
    order = _class_order(labels, seed, class_order)
    batch_size, ratio, phases = _check_online(batch_size, imbalance, imbalance_ratio, phases, len(order))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    return _online(labels, np.arange(labels.shape[0], dtype=np.int64), order, rng, batch_size, imbalance, ratio,
                   bool(classes_over_time), phases)


# --------------------------------------------------------------------------------------------- federated
def client_streams(
    labels: np.ndarray,
    partitions: list[np.ndarray],
    kind: str,
    seed: int,
    *,
    tasks: int | None = None,
    first_task_classes: int | None = None,
    class_order: list[int] | None = None,
    batch_size: int = 10,
    imbalance: str = "none",
    imbalance_ratio: float = 100.0,
    classes_over_time: bool = True,
    phases: int | None = None,
    client_ids: Sequence[int] | None = None,
) -> list[list[Task]] | list[OnlineStream]:
    """One stream per client, built from its partition (indices into the full ``labels``).

    The class order (and so the task split / arrival order) is drawn once from the full labels with ``seed``,
    identical on every client and equal to what ``class_incremental``/``online_stream`` give for the whole data.
    Subsampling and shuffling are seeded per client (from ``seed`` and the client's position). A client lacking
    some classes gets empty tasks / zero counts for them; an empty client gets empty tasks or no batches.
    ``kind="class-incremental"`` returns ``list[list[Task]]`` (needs ``tasks``); ``"online"`` ``list[OnlineStream]``.
    ``client_ids`` names the clients the partitions belong to (default 0, 1, ...), so one client can build its own
    stream from its own partition alone and get exactly what the whole federation's call gives it.
    """
    if kind not in STREAMS:
        raise ConfigError(f"stream.kind: got {kind!r}; allowed: {', '.join(STREAMS)}")
    labels = _labels(labels)
    seed = _int("seed", seed, 0)
    order = _class_order(labels, seed, class_order)
    parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in partitions]
    if kind == "class-incremental":
        if tasks is None:
            raise ConfigError("stream.tasks: required for class-incremental streams; allowed: an integer >= 1")
        groups = split_classes(order, tasks, first_task_classes)
        return [_tasks_for(labels, p, groups) for p in parts]
    batch_size, ratio, phases = _check_online(batch_size, imbalance, imbalance_ratio, phases, len(order))
    return [
        _online(labels, p, order, np.random.default_rng(np.random.SeedSequence([seed, 2, cid])), batch_size,
                imbalance, ratio, bool(classes_over_time), phases)
        for cid, p in zip(range(len(parts)) if client_ids is None else client_ids, parts)
    ]
