"""Partitions: exact bookkeeping, the skew each kind promises, seeding, empty clients, config errors."""

import warnings

import numpy as np
import pytest

from fedsim.errors import ConfigError
from fedsim.data.partition import PARTITIONS, describe_partition, partition_indices, partition_table

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    y = np.repeat(np.arange(NUM_CLASSES), 600)
    np.random.default_rng(123).shuffle(y)
    return y


def _check_exact_cover(parts, n):
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique within a client"
    allidx = np.concatenate(parts)
    assert allidx.shape[0] == n, "every sample assigned exactly once"
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def majority_fraction(parts, labels):
    fr = [np.bincount(labels[p], minlength=NUM_CLASSES).max() / len(p) for p in parts if len(p)]
    return float(np.mean(fr))


@pytest.mark.parametrize("kind", sorted(PARTITIONS))
def test_every_kind_covers_all_indices_once(labels, kind):
    parts = partition_indices(labels, kind, 20, seed=0, alpha=0.3, classes_per_client=2)
    assert len(parts) == 20
    _check_exact_cover(parts, labels.shape[0])
    table = partition_table(parts, labels, NUM_CLASSES)
    assert table["size"].sum() == labels.shape[0]
    np.testing.assert_array_equal(table.drop(columns="size").sum(axis=0).to_numpy(), np.bincount(labels))


@pytest.mark.parametrize("kind", sorted(PARTITIONS))
def test_seed_reproduces_and_changes(labels, kind):
    a = partition_indices(labels, kind, 15, seed=7, alpha=0.3)
    b = partition_indices(labels, kind, 15, seed=7, alpha=0.3)
    c = partition_indices(labels, kind, 15, seed=8, alpha=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_is_balanced(labels):
    parts = partition_indices(labels, "iid", 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert majority_fraction(parts, labels) < 0.2  # ~0.1 for 10 balanced classes


def test_iid_matches_flwr_iid_partitioner():
    """Our direct computation must equal flwr-datasets' IidPartitioner over the same (shuffled) rows."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    order = np.random.default_rng(0).permutation(103)
    p = IidPartitioner(num_partitions=6)
    p.dataset = Dataset.from_dict({"idx": order})
    flwr = [np.asarray(p.load_partition(i)["idx"]) for i in range(6)]
    ours = np.array_split(order, 6)
    for a, b in zip(flwr, ours):
        np.testing.assert_array_equal(a, b)


def test_fast_index_read_matches_public_api(labels):
    """The shortcut through the partitioner's index dict must give what load_partition gives."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    from fedsim.data.partition import _from_partitioner

    order = np.random.default_rng(1).permutation(labels.shape[0])
    ds = Dataset.from_dict({"label": labels[order], "idx": order})
    kw = dict(num_partitions=12, partition_by="label", alpha=0.3, min_partition_size=0, seed=5)
    fast = _from_partitioner(DirichletPartitioner(**kw), ds, order, 12)
    public = DirichletPartitioner(**kw)
    public.dataset = ds
    for i in range(12):
        np.testing.assert_array_equal(fast[i], np.sort(np.asarray(public.load_partition(i)["idx"], dtype=np.int64)))


def test_dirichlet_small_alpha_is_skewed(labels):
    skewed = partition_indices(labels, "dirichlet", 20, seed=0, alpha=0.05)
    iid = partition_indices(labels, "iid", 20, seed=0)
    mf_skew, mf_iid = majority_fraction(skewed, labels), majority_fraction(iid, labels)
    assert mf_iid < 0.25
    assert mf_skew > 0.7 and mf_skew > 3 * mf_iid
    big = partition_indices(labels, "dirichlet", 20, seed=0, alpha=100.0)
    assert majority_fraction(big, labels) < 0.3


def test_dirichlet_empty_clients_are_legal(labels):
    parts = partition_indices(labels, "dirichlet", 300, seed=0, alpha=0.01)
    _check_exact_cover(parts, labels.shape[0])
    sizes = np.array([len(p) for p in parts])
    assert (sizes == 0).sum() > 0, "alpha=0.01 over 300 clients should leave some clients empty"
    table = partition_table(parts, labels, NUM_CLASSES)
    assert list(table.index) == list(range(300)) and table.index.name == "client"
    assert list(table.columns) == [f"class_{c}" for c in range(NUM_CLASSES)] + ["size"]
    assert (table["size"] == 0).sum() == (sizes == 0).sum()
    text = describe_partition(table)
    assert "300 clients" in text and f"{(sizes == 0).sum()} empty" in text and "\n" not in text


def test_dirichlet_min_partition_size(labels):
    parts = partition_indices(labels, "dirichlet", 10, seed=0, alpha=0.5, min_partition_size=50)
    assert min(len(p) for p in parts) >= 50
    _check_exact_cover(parts, labels.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="partition.min_partition_size"):
            partition_indices(labels, "dirichlet", 50, seed=0, alpha=0.01, min_partition_size=500)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_k_classes_per_client(labels, k):
    parts = partition_indices(labels, "shards", 20, seed=3, classes_per_client=k)
    _check_exact_cover(parts, labels.shape[0])  # num_clients >= num_classes: every class is used
    for p in parts:
        assert len(np.unique(labels[p])) == k


def test_shards_cover_every_class_when_clients_suffice(labels):
    # one class per client and as many clients as classes: every client must get a different class
    parts = partition_indices(labels, "shards", NUM_CLASSES, seed=11, classes_per_client=1)
    _check_exact_cover(parts, labels.shape[0])
    assert sorted(int(np.unique(labels[p])[0]) for p in parts) == list(range(NUM_CLASSES))


def test_shards_with_few_clients_leave_unheld_classes_out(labels):
    """Real flwr-datasets behaviour: classes no client draws are dropped (with a warning)."""
    with pytest.warns(UserWarning, match="held by no client"):
        parts = partition_indices(labels, "shards", 2, seed=0, classes_per_client=2)
    held = np.concatenate(parts)
    assert len(np.unique(held)) == held.shape[0]  # still disjoint
    held_classes = np.unique(labels[held])
    assert 2 <= len(held_classes) <= 4 < NUM_CLASSES
    assert held.shape[0] == 600 * len(held_classes)  # every sample of a held class is kept, the rest dropped
    for p in parts:
        assert len(np.unique(labels[p])) == 2


def test_quantity_skews_sizes_not_labels(labels):
    parts = partition_indices(labels, "quantity", 20, seed=0, quantity_alpha=0.3, min_partition_size=5)
    _check_exact_cover(parts, labels.shape[0])
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5
    assert sizes.max() > 5 * np.median(sizes) or sizes.max() > 10 * sizes.min()
    big = [p for p in parts if len(p) >= 300]
    assert big and majority_fraction(big, labels) < 0.25  # content stays IID
    even = partition_indices(labels, "quantity", 20, seed=0, quantity_alpha=1000.0)
    even_sizes = np.array([len(p) for p in even])
    assert even_sizes.max() < 1.3 * even_sizes.min()


def test_many_clients_scale():
    y = np.repeat(np.arange(10), 6000)
    parts = partition_indices(y, "dirichlet", 1000, seed=0, alpha=0.1)
    _check_exact_cover(parts, y.shape[0])
    assert len(partition_table(parts, y, 10)) == 1000


def test_empty_labels_give_empty_clients():
    parts = partition_indices(np.empty(0, dtype=np.int64), "dirichlet", 3, seed=0)
    assert [len(p) for p in parts] == [0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="nope"), "partition.kind"),
        (dict(num_clients=0), "partition.num_clients"),
        (dict(alpha=0.0), "partition.alpha"),
        (dict(alpha=-1.0), "partition.alpha"),
        (dict(kind="shards", classes_per_client=0), "partition.classes_per_client"),
        (dict(kind="shards", classes_per_client=11), "partition.classes_per_client"),
        (dict(kind="quantity", quantity_alpha=0.0), "partition.quantity_alpha"),
        (dict(kind="quantity", min_partition_size=10_000), "partition.min_partition_size"),
        (dict(num_clients=100_000), "partition.num_clients"),
    ],
)
def test_bad_arguments_name_the_field(labels, kwargs, field):
    args = dict(kind="dirichlet", num_clients=5, seed=0)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, **args)
    msg = str(info.value)
    assert msg.startswith(field)
    bad = [v for k, v in kwargs.items()][-1]
    assert str(bad) in msg
    if field == "partition.kind":
        assert all(k in msg for k in PARTITIONS)
    if field == "partition.classes_per_client":
        assert "[1, 10]" in msg
