"""Streams: task/class bookkeeping, long-tail ratios, single pass, arrival over time, per-client streams."""

import numpy as np
import pytest

from fedsim.errors import ConfigError
from fedsim.data.partition import partition_indices
from fedsim.data.streams import OnlineStream, class_incremental, client_streams, online_stream, split_classes

C = 10
PER_CLASS = 500


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    y = np.repeat(np.arange(C), PER_CLASS)
    np.random.default_rng(0).shuffle(y)
    return y


# ------------------------------------------------------------------------------------ class-incremental
def _check_tasks(tasks, labels, classes_expected=None):
    seen = [c for t in tasks for c in t.classes]
    assert len(seen) == len(set(seen)), "task classes must be disjoint"
    assert sorted(seen) == (classes_expected if classes_expected is not None else list(range(C)))
    for i, t in enumerate(tasks):
        assert t.index == i
        np.testing.assert_array_equal(t.indices, np.flatnonzero(np.isin(labels, t.classes)))


def test_class_incremental_even_split(labels):
    tasks = class_incremental(labels, tasks=5, seed=0)
    assert [len(t.classes) for t in tasks] == [2] * 5
    _check_tasks(tasks, labels)
    assert sum(len(t) for t in tasks) == labels.shape[0]


def test_class_incremental_first_task_larger(labels):
    tasks = class_incremental(labels, tasks=4, seed=0, first_task_classes=4)
    assert [len(t.classes) for t in tasks] == [4, 2, 2, 2]
    _check_tasks(tasks, labels)
    one = class_incremental(labels, tasks=1, seed=0, first_task_classes=10)
    assert len(one) == 1 and len(one[0]) == labels.shape[0]


def test_class_incremental_seeds_and_given_order(labels):
    a = class_incremental(labels, tasks=5, seed=1)
    b = class_incremental(labels, tasks=5, seed=1)
    c = class_incremental(labels, tasks=5, seed=2)
    assert [t.classes for t in a] == [t.classes for t in b]
    assert [t.classes for t in a] != [t.classes for t in c]
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    given = class_incremental(labels, tasks=2, seed=0, class_order=order)
    assert [t.classes for t in given] == [order[:5], order[5:]]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tasks=3), "stream.tasks"),  # 10 classes do not split into 3
        (dict(tasks=11), "stream.tasks"),
        (dict(tasks=0), "stream.tasks"),
        (dict(tasks=4, first_task_classes=3), "stream.first_task_classes"),  # 7 left for 3 tasks
        (dict(tasks=4, first_task_classes=10), "stream.first_task_classes"),
        (dict(tasks=1, first_task_classes=4), "stream.first_task_classes"),
        (dict(tasks=2, class_order=[0, 1, 2]), "stream.class_order"),
        (dict(tasks=2, class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), "stream.class_order"),
    ],
)
def test_class_incremental_errors_name_the_field(labels, kwargs, field):
    with pytest.raises(ConfigError) as info:
        class_incremental(labels, seed=0, **kwargs)
    assert str(info.value).startswith(field)


def test_split_classes_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"allowed: one of \[1, 2, 5, 10\]"):
        split_classes(list(range(10)), 3)
    with pytest.raises(ConfigError, match=r"allowed: \[1, 4, 7\]"):
        split_classes(list(range(10)), 4, first_task_classes=2)


# ------------------------------------------------------------------------------------------------ online
def _stream_labels(stream: OnlineStream, labels):
    return labels[stream.indices]


def _check_single_pass(stream: OnlineStream, labels, batch_size):
    idx = stream.indices
    assert idx.dtype == np.int64
    assert len(np.unique(idx)) == idx.shape[0], "each sample at most once"
    assert stream.num_samples == idx.shape[0] == sum(stream.class_counts.values())
    got = np.bincount(labels[idx], minlength=C)
    assert {c: int(got[c]) for c in stream.class_counts} == stream.class_counts
    sizes = [len(b) for b in stream.batches]
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    assert len(stream) == len(stream.batches) == len(list(iter(stream)))


def test_online_balanced_keeps_everything_shuffled(labels):
    s = online_stream(labels, batch_size=32, seed=0, classes_over_time=False)
    _check_single_pass(s, labels, 32)
    assert s.num_samples == labels.shape[0]
    first = _stream_labels(s, labels)[:200]
    assert len(np.unique(first)) == C, "a uniform shuffle mixes all classes early"


@pytest.mark.parametrize("ratio", [10.0, 50.0, 100.0])
def test_online_long_tail_ratio(labels, ratio):
    s = online_stream(labels, batch_size=16, seed=3, imbalance="long-tail", imbalance_ratio=ratio)
    _check_single_pass(s, labels, 16)
    counts = [s.class_counts[c] for c in s.classes]
    assert counts[0] == PER_CLASS
    assert all(a >= b for a, b in zip(counts, counts[1:])), "rank r keeps n_max * ratio^(-r/(C-1))"
    assert max(counts) / min(counts) == pytest.approx(ratio, rel=0.05)
    expected = [round(PER_CLASS * ratio ** (-r / (C - 1))) for r in range(C)]
    assert all(abs(a - b) <= 1 for a, b in zip(counts, expected))


def test_online_classes_arrive_over_time(labels):
    s = online_stream(labels, batch_size=10, seed=0, imbalance="long-tail", imbalance_ratio=20)
    rank = {c: r for r, c in enumerate(s.classes)}
    ranks = np.array([rank[c] for c in _stream_labels(s, labels)])
    assert np.all(np.diff(ranks) >= 0), "default: one class per phase, in class order"
    phased = online_stream(labels, batch_size=10, seed=0, phases=2)
    assert [len(p) for p in phased.phases] == [5, 5]
    phase_of = {c: i for i, p in enumerate(phased.phases) for c in p}
    ph = np.array([phase_of[c] for c in _stream_labels(phased, labels)])
    assert np.all(np.diff(ph) >= 0)
    first_half = _stream_labels(phased, labels)[: phased.num_samples // 2]
    assert set(first_half.tolist()) == set(phased.phases[0])
    head = _stream_labels(phased, labels)[:100]
    assert len(np.unique(head)) == 5, "the classes of a phase are shuffled together, not one after another"


def test_online_seeds(labels):
    a = online_stream(labels, 8, seed=5, imbalance="long-tail")
    b = online_stream(labels, 8, seed=5, imbalance="long-tail")
    c = online_stream(labels, 8, seed=6, imbalance="long-tail")
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.classes == b.classes and a.class_counts == b.class_counts
    assert a.classes != c.classes
    assert not (a.indices.shape == c.indices.shape and np.array_equal(a.indices, c.indices))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(batch_size=0), "stream.batch_size"),
        (dict(imbalance="zipf"), "stream.imbalance"),
        (dict(imbalance_ratio=0.5), "stream.imbalance_ratio"),
        (dict(phases=0), "stream.phases"),
        (dict(phases=11), "stream.phases"),
        (dict(class_order=[1, 2]), "stream.class_order"),
    ],
)
def test_online_errors_name_the_field(labels, kwargs, field):
    args = dict(batch_size=4, seed=0)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        online_stream(labels, **args)
    assert str(info.value).startswith(field)


def test_online_empty_labels():
    s = online_stream(np.empty(0, dtype=np.int64), batch_size=4, seed=0, imbalance="long-tail")
    assert len(s) == 0 and s.num_samples == 0 and list(s) == []


# --------------------------------------------------------------------------------------------- federated
def test_client_streams_online(labels):
    parts = partition_indices(labels, "dirichlet", 30, seed=0, alpha=0.05)
    assert any(len(p) == 0 for p in parts), "fixture should contain an empty client"
    streams = client_streams(labels, parts, "online", seed=4, batch_size=8, imbalance="long-tail",
                             imbalance_ratio=10)
    whole = online_stream(labels, 8, seed=4)
    assert len(streams) == len(parts)
    for p, s in zip(parts, streams):
        assert s.classes == whole.classes, "one class order shared by every client"
        assert set(s.indices.tolist()) <= set(p.tolist())
        assert len(np.unique(s.indices)) == s.num_samples == sum(s.class_counts.values())
        if len(p) == 0:
            assert len(s) == 0 and s.num_samples == 0
        else:
            assert s.num_samples > 0
    again = client_streams(labels, parts, "online", seed=4, batch_size=8, imbalance="long-tail",
                           imbalance_ratio=10)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(streams, again))
    twins = client_streams(labels, [np.arange(1000), np.arange(1000)], "online", seed=4, classes_over_time=False)
    assert not np.array_equal(twins[0].indices, twins[1].indices), "shuffling is seeded per client"
    np.testing.assert_array_equal(np.sort(twins[0].indices), np.arange(1000))


def test_client_streams_class_incremental(labels):
    parts = partition_indices(labels, "dirichlet", 12, seed=1, alpha=0.1)
    per_client = client_streams(labels, parts, "class-incremental", seed=2, tasks=5)
    global_tasks = class_incremental(labels, tasks=5, seed=2)
    for p, tasks in zip(parts, per_client):
        assert [t.classes for t in tasks] == [t.classes for t in global_tasks]
        got = np.concatenate([t.indices for t in tasks])
        np.testing.assert_array_equal(np.sort(got), p)  # the client's data, split by task, nothing lost
        for t in tasks:
            assert np.all(np.isin(labels[t.indices], t.classes))


def test_client_streams_errors(labels):
    parts = [np.arange(10)]
    with pytest.raises(ConfigError, match="^stream.kind"):
        client_streams(labels, parts, "none", seed=0)
    with pytest.raises(ConfigError, match="^stream.tasks"):
        client_streams(labels, parts, "class-incremental", seed=0)
