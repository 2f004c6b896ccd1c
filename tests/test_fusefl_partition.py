"""The paper's partition as an option: FuseFL's official Dirichlet sampler (clients capped at N / K, at least 10
each), i.e. flwr-datasets' DirichletPartitioner with self_balancing=True and min_partition_size, in [partition]."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.config import config_from_dict
from fedsim.errors import ConfigError
from fedsim.data.partition import partition_indices


def _labels(n_per_class=600, classes=10, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), n_per_class))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_self_balancing_gives_no_later_class_to_a_client_above_the_average(seed):
    labels = _labels()
    n, k = len(labels), 5
    parts = partition_indices(labels, "dirichlet", k, seed, alpha=0.1, self_balancing=True, min_partition_size=10)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))  # disjoint, covering
    assert min(len(p) for p in parts) >= 10
    # replay the rule class by class (flwr-datasets deals classes in sorted order): a client that held more than
    # N / K samples before class c received none of class c (at most 1: flwr-datasets' cumulative split in floats
    # can leave one rounding sample to the last client)
    for p in parts:
        held = 0
        for c in range(10):
            got = int((labels[p] == c).sum())
            if held > n / k:
                assert got <= 1
            held += got
    # hence no client exceeds N / K by more than one class's share
    assert max(len(p) for p in parts) <= n / k + 600


def test_self_balancing_evens_out_client_sizes_at_alpha_0_1():
    labels = _labels()
    spread = {}
    for balanced in (False, True):
        sizes = [np.std([len(p) for p in partition_indices(labels, "dirichlet", 5, s, alpha=0.1,
                                                              self_balancing=balanced)]) for s in range(8)]
        spread[balanced] = float(np.mean(sizes))
    assert spread[True] < 0.7 * spread[False]


def test_self_balancing_is_a_partition_setting_and_only_for_dirichlet():
    tree = {"data": {"name": "digits"}, "strategy": {"name": "fusefl"},
            "partition": {"kind": "dirichlet", "num_clients": 5, "alpha": 0.1, "self_balancing": True,
                          "min_partition_size": 10}}
    config = config_from_dict(tree)
    assert config.partition.self_balancing and config.partition.min_partition_size == 10
    assert not config_from_dict({**tree, "partition": {"kind": "dirichlet"}}).partition.self_balancing
    with pytest.raises(ConfigError, match=r"^partition\.self_balancing: .*dirichlet"):
        config_from_dict({**tree, "partition": {"kind": "iid", "self_balancing": True}})
    with pytest.raises(ConfigError, match=r"^partition\.self_balancing: "):
        config_from_dict({**tree, "partition": {"kind": "dirichlet", "self_balancing": "yes"}})
    with pytest.raises(ConfigError, match=r"^partition\.self_balancing: .*dirichlet"):
        partition_indices(_labels(), "shards", 5, 0, self_balancing=True)


def test_scenario_partition_uses_the_option():
    from fedsim.scenario import partition_for

    base = {"seed": 0, "data": {"name": "digits"}, "strategy": {"name": "fusefl"}}
    plain = partition_for(config_from_dict({**base, "partition": {"kind": "dirichlet", "num_clients": 5,
                                                                  "alpha": 0.1}}))
    paper = partition_for(config_from_dict({**base, "partition": {"kind": "dirichlet", "num_clients": 5,
                                                                  "alpha": 0.1, "self_balancing": True}}))
    assert [len(p) for p in plain] != [len(p) for p in paper]
