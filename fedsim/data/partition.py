"""Split a dataset's sample indices among clients (label skew, quantity skew, IID), via flwr-datasets.

flwr-datasets' partitioners are the reference implementations users compare against, so fedsim runs them over
an in-memory ``datasets.Dataset`` holding only the labels, after a seeded shuffle of the sample order (their
splits are contiguous within a class or within the dataset, so without it a partition would depend on how the
files happen to be ordered). Results are plain index arrays into the full dataset: sorted, disjoint, and
together covering every index (see ``shards`` for the one exception flwr-datasets makes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from fedsim.errors import ConfigError

__all__ = ["ALL_PARTITIONS", "PARTITIONS", "PARTITIONERS", "natural_partition", "partition_indices", "partition_table",
           "describe_partition", "register_partition"]

from fedsim.catalog import PARTITIONS as ALL_PARTITIONS  # noqa: E402  (names and descriptions live in the catalog)

#: the kinds drawn from the labels and the seed alone; "natural" (ALL_PARTITIONS) reads a column instead
PARTITIONS: dict[str, str] = {k: v for k, v in ALL_PARTITIONS.items() if k != "natural"}

#: the partitions plugins registered (``register_partition``): name -> fn(labels, num_clients, seed, **params)
PARTITIONERS: dict[str, Callable[..., Sequence[np.ndarray]]] = {}


def register_partition(name: str, fn: Callable[..., Sequence[np.ndarray]], description: str) -> None:
    """Make ``name`` a ``partition.kind`` (a plugin's partition): ``fn(labels, num_clients=N, seed=S, **params)``
    returns N integer index arrays into ``labels`` (the training labels the clients share, the server's holdout
    removed), disjoint; ``params`` is the scenario's ``partition.params`` table. fedsim checks what ``fn`` returns
    (``fedsim validate`` runs it on the training labels) and sorts each array. A name already taken (a built-in or
    another plugin's) is refused with ``ValueError``; a non-callable ``fn`` with ``TypeError``."""
    from fedsim import catalog

    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"a partition name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in ALL_PARTITIONS:
        raise ValueError(f"partition {name!r} is already registered")
    if not callable(fn):
        raise TypeError(f"partition {name!r}: fn must be a callable (labels, num_clients, seed, **params)")
    PARTITIONERS[name] = fn
    catalog.register_name("partitions", name, description)


def _plugin_partition(kind: str, labels: np.ndarray, num_clients: int, seed: int, params: dict) -> list[np.ndarray]:
    """``PARTITIONERS[kind]``'s result, checked: ``num_clients`` disjoint integer arrays of indices into labels."""
    where = f"partition.kind: {kind!r} (a plugin's partition, {getattr(PARTITIONERS[kind], '__module__', '?')})"
    try:
        parts = PARTITIONERS[kind](labels, num_clients=num_clients, seed=seed, **params)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(f"{where} cannot be called with partition.params {params!r}: {err}") from err
    parts = list(parts) if isinstance(parts, (list, tuple)) else None
    if parts is None or len(parts) != num_clients:
        got = "not a list" if parts is None else f"{len(parts)} arrays"
        raise ConfigError(f"{where} must return a list of partition.num_clients = {num_clients} index arrays, "
                          f"got {got}")
    n = labels.shape[0]
    held = np.zeros(n, dtype=bool)
    out = []
    for k, part in enumerate(parts):
        part = np.asarray(part)
        if part.ndim != 1 or (part.size and part.dtype.kind not in "iu"):
            raise ConfigError(f"{where}: client {k}'s indices must be a 1-D integer array, got dtype {part.dtype} "
                              f"and shape {part.shape}")
        part = np.sort(part.astype(np.int64, copy=False))
        if part.size and (part[0] < 0 or part[-1] >= n):
            raise ConfigError(f"{where}: client {k} holds index {int(part[0] if part[0] < 0 else part[-1])}, outside "
                              f"the {n} training samples")
        if part.size and (np.any(part[1:] == part[:-1]) or held[part].any()):
            raise ConfigError(f"{where}: client {k} holds a sample twice or one another client holds; the parts must "
                              "be disjoint")
        held[part] = True
        out.append(part)
    return out


def _check_positive_int(field: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"partition.{field}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value <= 0:
        raise ConfigError(f"partition.{field}: must be a finite number > 0, got {value!r}")
    return float(value)


def _from_partitioner(partitioner, ds, order: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Run a flwr-datasets partitioner and map its row positions back to original dataset indices.

    Reads the partitioner's computed index lists directly (one dict lookup per client) because going through
    ``load_partition`` costs a few ms per client (seconds at 1000 clients); falls back to the public API if a
    future flwr-datasets renames the attribute.
    """
    partitioner.dataset = ds
    _ = partitioner.num_partitions  # triggers the assignment (and flwr-datasets' own checks)
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    parts = []
    for pid in range(num_clients):
        if isinstance(mapping, dict) and pid in mapping:
            rows = np.asarray(mapping[pid], dtype=np.int64)
            parts.append(np.sort(order[rows]))
        else:
            rows = np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)
            parts.append(np.sort(rows))
    return parts


def _quantity_sizes(n: int, num_clients: int, quantity_alpha: float, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """Client sizes summing to n: min_size each, the rest split by Dirichlet(quantity_alpha) proportions."""
    spare = n - num_clients * min_size
    if spare < 0:
        raise ConfigError(
            f"partition.min_partition_size: {min_size} per client x {num_clients} clients exceeds the "
            f"{n} samples; allowed: at most {n // num_clients}"
        )
    props = rng.dirichlet(np.full(num_clients, quantity_alpha))
    raw = props * spare
    sizes = np.floor(raw).astype(np.int64)
    rest = spare - int(sizes.sum())
    if rest > 0:  # largest remainders get the leftover samples, so the sizes sum exactly to n
        sizes[np.argsort(-(raw - sizes), kind="stable")[:rest]] += 1
    return sizes + min_size


def partition_indices(
    labels: np.ndarray,
    kind: str,
    num_clients: int,
    seed: int,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    quantity_alpha: float = 1.0,
    min_partition_size: int = 0,
    self_balancing: bool = False,
    groups: np.ndarray | None = None,
    sample_groups: bool = False,
    params: dict | None = None,
) -> list[np.ndarray]:
    """Assign every sample index to one of ``num_clients`` clients; returns sorted int64 index arrays.

    Kinds (see ``PARTITIONS``): ``iid``, ``dirichlet`` (``alpha``, ``min_partition_size`` — flwr-datasets
    resamples up to 10 times to meet it), ``shards`` (``classes_per_client``), ``quantity`` (``quantity_alpha``,
    ``min_partition_size``). Empty clients are legal (``dirichlet`` with small alpha, ``quantity``).
    Same arguments -> identical result.

    ``self_balancing`` (dirichlet only): flwr-datasets' DirichletPartitioner ``self_balancing=True``, the sampler
    of FuseFL's official code (and of Li et al.'s NIID-Bench): classes are dealt in turn and a client that already
    holds more than N / num_clients samples gets no share of the later classes. With ``min_partition_size = 10``
    it is the paper's partition (the official code redraws until every client has at least 10; flwr-datasets
    tries 10 times, then the error names ``partition.min_partition_size``). The cap is checked before each class,
    so a client may end above N / num_clients by at most one class's share.

    ``natural`` (``groups``: each sample's natural client id, e.g. its writer; ``partition.by``): one client per
    distinct value, client k holding exactly the samples of the k-th value in sorted order (flwr-datasets'
    NaturalIdPartitioner, computed directly; tests check the equivalence); ``num_clients`` must equal the number
    of distinct values, or, with ``sample_groups``, be at most it: a seeded draw of ``num_clients`` values is kept
    (client k the k-th kept value in sorted order) and the other values' samples belong to no client.

    A plugin's kind (``register_partition``) calls its function with ``params`` (``partition.params``) and checks
    the result.

    ``shards`` caveat (flwr-datasets' PathologicalPartitioner): a class that no client draws is left out, so its
    samples are assigned to nobody. With num_clients >= number of classes every class is drawn (the first class
    of client i is class i mod C); with fewer clients some classes may be unused, and a warning says which.
    """
    if kind not in ALL_PARTITIONS:
        raise ConfigError(f"partition.kind: unknown kind {kind!r}; allowed: {', '.join(ALL_PARTITIONS)}")
    num_clients = _check_positive_int("num_clients", num_clients)
    seed = _check_positive_int("seed", seed, minimum=0)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"partition: labels must be a 1-D array, got shape {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    n = labels.shape[0]
    if kind == "natural":
        return natural_partition(groups, num_clients, n, sample_groups=sample_groups, seed=seed)
    if kind in PARTITIONERS:
        return _plugin_partition(kind, labels, num_clients, seed, dict(params or {}))
    if params:
        raise ConfigError(f"partition.params: {params!r} is passed to a plugin's partition only; the built-in kind "
                          f"{kind!r} takes its settings as partition fields")
    classes = np.unique(labels)
    alpha = _check_positive_float("alpha", alpha)
    quantity_alpha = _check_positive_float("quantity_alpha", quantity_alpha)
    min_partition_size = _check_positive_int("min_partition_size", min_partition_size, minimum=0)
    if not isinstance(self_balancing, (bool, np.bool_)):
        raise ConfigError(f"partition.self_balancing: must be true or false, got {self_balancing!r}")
    if self_balancing and kind != "dirichlet":
        raise ConfigError(f"partition.self_balancing: only the dirichlet partition balances itself, got kind "
                          f"{kind!r}; set kind = \"dirichlet\" or self_balancing = false")
    if kind == "shards":
        if isinstance(classes_per_client, bool) or not isinstance(classes_per_client, (int, np.integer)) or not (
            1 <= classes_per_client <= max(len(classes), 1)
        ):
            raise ConfigError(
                f"partition.classes_per_client: got {classes_per_client!r}; allowed: an integer in "
                f"[1, {len(classes)}] (the number of classes present)"
            )
        classes_per_client = int(classes_per_client)
    if n == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(num_clients)]

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    order = rng.permutation(n).astype(np.int64)  # row r of the flwr dataset is sample order[r]
    part_seed = int(rng.integers(0, 2**31 - 1))

    if kind == "iid":
        # IidPartitioner == Dataset.shard(contiguous=True) == np.array_split of the (shuffled) rows; computed
        # directly because building 1000 shards through `datasets` takes seconds (tests check the equivalence).
        return [np.sort(chunk) for chunk in np.array_split(order, num_clients)]

    if kind == "quantity":
        sizes = _quantity_sizes(n, num_clients, quantity_alpha, min_partition_size, rng)
        return _quantity_parts(order, sizes)

    if num_clients > n:
        raise ConfigError(f"partition.num_clients: {num_clients} clients for {n} samples; allowed: at most {n}")

    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    ds = Dataset.from_dict({"label": labels[order], "idx": order})
    if kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha, min_partition_size=min_partition_size,
            self_balancing=bool(self_balancing), shuffle=True, seed=part_seed,
        )
    else:  # shards
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label", num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic", shuffle=True, seed=part_seed,
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parts = _from_partitioner(partitioner, ds, order, num_clients)
    except ValueError as err:
        field = "min_partition_size" if kind == "dirichlet" else "num_clients"
        raise ConfigError(f"partition.{field}: flwr-datasets cannot build this {kind} partition: {err}") from err
    for w in caught:
        text = str(w.message)
        if "min_partition_size" in text or "will NOT be used" in text:
            continue  # resampling chatter is expected; unused shard classes are reported below in our terms
        warnings.warn(f"partition ({kind}): {text}", stacklevel=2)
    if kind == "shards":
        held = np.zeros(n, dtype=bool)
        for p in parts:
            held[p] = True
        if not held.all():
            left = sorted(int(c) for c in np.unique(labels[~held]))
            warnings.warn(
                f"partition (shards): classes {left} are held by no client ({num_clients} clients x "
                f"{classes_per_client} classes each, first class round-robin, the rest drawn at random), so their "
                f"{int((~held).sum())} samples are left out; use num_clients >= {len(classes)} to cover every class",
                stacklevel=2,
            )
    return parts


def natural_partition(groups: np.ndarray | None, num_clients: int, n: int | None = None, *,
                      sample_groups: bool = False, seed: int = 0) -> list[np.ndarray]:
    """One sorted index array per distinct value of ``groups`` (sorted values, as NaturalIdPartitioner numbers
    them); ``num_clients`` must be their number, or with ``sample_groups`` at most it: then ``num_clients`` values
    drawn uniformly without replacement (seeded by ``seed``) are kept, in sorted order."""
    if groups is None:
        raise ConfigError("partition.by: the natural partition needs each sample's group (the column partition.by)")
    groups = np.asarray(groups)
    if groups.ndim != 1 or (n is not None and groups.shape[0] != n):
        raise ConfigError(f"partition.by: the column must hold one value per training sample ({n}), got shape "
                          f"{groups.shape}")
    if groups.dtype == object:
        raise ConfigError("partition.by: the column must hold numbers or strings, not Python objects")
    if groups.dtype.kind == "f" and not np.isfinite(groups).all():
        raise ConfigError("partition.by: the column holds NaN or infinite values; every sample needs a group")
    values, inverse = np.unique(groups, return_inverse=True)
    if sample_groups and num_clients > len(values):
        raise ConfigError(f"partition.num_clients: {num_clients} clients, but partition.by has only {len(values)} "
                          f"distinct values in the training data; allowed: at most {len(values)}")
    if not sample_groups and len(values) != num_clients:
        raise ConfigError(f"partition.num_clients: {num_clients}, but the natural partition makes one client per "
                          f"distinct value of partition.by, and the training data has {len(values)}; set "
                          f"partition.num_clients = {len(values)}, or keep a seeded sample of {num_clients} of them "
                          "with partition.sample_groups = true")
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    bounds = np.cumsum(np.bincount(inverse.reshape(-1), minlength=len(values)))[:-1]
    parts = [np.sort(part) for part in np.split(order, bounds)]
    if sample_groups and num_clients < len(values):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6A7C]))
        parts = [parts[k] for k in np.sort(rng.choice(len(values), size=num_clients, replace=False))]
    return parts


def _quantity_parts(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """SizePartitioner over the shuffled rows for the non-empty clients (it rejects size 0); empty ones get []."""
    from datasets import Dataset
    from flwr_datasets.partitioner import SizePartitioner

    nonzero = [int(s) for s in sizes if s > 0]
    partitioner = SizePartitioner(partition_sizes=nonzero)
    got = iter(_from_partitioner(partitioner, Dataset.from_dict({"idx": order}), order, len(nonzero)))
    return [next(got) if s > 0 else np.empty(0, dtype=np.int64) for s in sizes]


def partition_table(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> pd.DataFrame:
    """Per-client class counts: index ``client`` (0..N-1), columns ``class_0``.. ``class_{C-1}`` and ``size``."""
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.asarray([len(p) for p in parts], dtype=np.int64)
    if len(parts):
        all_idx = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        owner = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
        counts = np.bincount(owner * num_classes + labels[all_idx], minlength=len(parts) * num_classes)
        counts = counts.reshape(len(parts), num_classes)
    else:
        counts = np.zeros((0, num_classes), dtype=np.int64)
    table = pd.DataFrame(counts, columns=[f"class_{c}" for c in range(num_classes)])
    table["size"] = sizes
    table.index = pd.RangeIndex(len(parts), name="client")
    return table


def describe_partition(table: pd.DataFrame) -> str:
    """One paragraph: clients, empty clients, min/median/max size, mean number of classes per client."""
    n = len(table)
    if n == 0:
        return "0 clients."
    size = table["size"].to_numpy()
    class_cols = [c for c in table.columns if str(c).startswith("class_")]
    present = (table[class_cols].to_numpy() > 0).sum(axis=1)
    nonempty = present[size > 0]
    mean_classes = float(nonempty.mean()) if nonempty.size else 0.0
    return (
        f"{n} clients holding {int(size.sum())} samples of {len(class_cols)} classes; {int((size == 0).sum())} empty "
        f"clients; client size min {int(size.min())}, median {float(np.median(size)):g}, max {int(size.max())}; "
        f"{mean_classes:.2f} classes per non-empty client on average."
    )
