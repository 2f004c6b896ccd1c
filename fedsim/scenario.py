"""What a scenario derives, computed in one place and shared by the server and the client parts.

Everything here is a pure function of the validated config (and cached per process), so the driver, every Ray
actor and every SuperNode of the deployment engine derive identical objects independently: the data splits (after
``data.max_train`` / ``max_test``), the partition, the streams, the frozen feature map, the initial model, and the
seeds. ``ScenarioView`` is the part of it both sides may use; ``ClientEnv`` (a client: its own partition only)
and ``ServerContext`` (the server: all partitions, the test split) extend it.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np

from fedsim.config import ScenarioConfig
from fedsim.errors import ConfigError
from fedsim.registry import get_strategy

__all__ = ["ScenarioView", "derive_seed", "train_split", "test_split", "partition_for", "local_test_partition",
           "server_holdout",
           "server_holdout_fraction", "scenario_streams",
           "client_stream", "scenario_feature_map", "scenario_model", "resolve_device"]


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (scenario seed, round, partition id, purpose)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def resolve_device(setting: str) -> str:
    """``simulation.device``: "auto" is cuda where torch sees a GPU, else cpu."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=8)
def _split_cached(name: str, split: str, root: str | None, max_n: int | None, seed: int, options: tuple):
    from fedsim.data import load_dataset, slice_indices

    data = load_dataset(name, split=split, root=root, **dict(options))
    keep = slice_indices(len(data), max_n, derive_seed(seed, f"{split}-slice"))  # the same in every process
    return data if keep is None else data.subset(keep)


def data_options(config: ScenarioConfig) -> dict[str, Any]:
    """The dataset's options as ``fedsim.data.load_dataset`` takes them: ``data.options``, plus ``data.path``."""
    d = config.data
    options = dict(d.options)
    if d.path is not None:
        options["path"] = d.path
    return options


def _split(config: ScenarioConfig, split: str):  # noqa: ANN202
    d = config.data
    max_n = d.max_train if split == "train" else d.max_test
    return _split_cached(d.name, split, d.root, max_n, config.seed, tuple(sorted(data_options(config).items())))


def train_split(config: ScenarioConfig):  # noqa: ANN201
    """The scenario's training set (after ``data.max_train``), cached per process."""
    return _split(config, "train")


def test_split(config: ScenarioConfig):  # noqa: ANN201
    """The scenario's test set (after ``data.max_test``), cached per process."""
    return _split(config, "test")


test_split.__test__ = False  # not a pytest test when imported into a test module


def server_holdout_fraction(config: ScenarioConfig) -> float:
    """``data.server_holdout``, or where unset what the strategy's spec declares (``StrategySpec.server_holdout``,
    FedDF: 0.1 when it distills on held-out training data), else 0."""
    if config.data.server_holdout is not None:
        return float(config.data.server_holdout)
    default = get_strategy(config.strategy.name).server_holdout
    return float(default(config.strategy.params)) if default is not None else 0.0


def server_holdout(config: ScenarioConfig) -> np.ndarray:
    """Sorted training-split indices that the server keeps and no client holds (empty when the fraction is 0).

    A seeded uniform draw of ``round(fraction * n)`` indices, the same in every process, taken before the partition:
    ``partition_for`` splits only the remaining indices, so the clients' data is disjoint from it.
    """
    fraction = server_holdout_fraction(config)
    n = len(train_split(config))
    k = int(round(fraction * n))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    order = np.random.default_rng(derive_seed(config.seed, "server-holdout")).permutation(n)
    return np.sort(order[:k]).astype(np.int64)


def partition_for(config: ScenarioConfig) -> list[np.ndarray]:
    """What each client trains on: the scenario's partition of the training set (deterministic from the seed),
    without the server's holdout and without the client's local test data (``partition.test_fraction``)."""
    if config.partition.test_fraction > 0:
        return _local_splits(config)[0]
    return _client_partition(config)


def local_test_partition(config: ScenarioConfig) -> list[np.ndarray]:
    """Each client's held-out local test indices into the training split (``partition.test_fraction`` of its
    partition, ``fedsim.data.local_split``); empty arrays when the fraction is 0."""
    if config.partition.test_fraction > 0:
        return _local_splits(config)[1]
    return [np.empty(0, dtype=np.int64) for _ in range(config.num_clients)]


_LOCAL_SPLITS: dict[tuple, tuple] = {}


def _local_splits(config: ScenarioConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training parts, local test parts), cached per process (the driver, the server and the nodes all ask)."""
    from fedsim.data.local_split import local_splits

    key = (config.seed, repr(config.data), repr(config.partition), server_holdout_fraction(config))
    if key not in _LOCAL_SPLITS:
        _LOCAL_SPLITS.clear()
        parts = _client_partition(config)
        seeds = [derive_seed(config.seed, "local-test", pid) for pid in range(len(parts))]
        _LOCAL_SPLITS[key] = local_splits(parts, train_split(config).labels, config.partition.test_fraction, seeds)
    return _LOCAL_SPLITS[key]


def _client_partition(config: ScenarioConfig) -> list[np.ndarray]:
    """The partition of the training set over the clients, without the server's holdout."""
    from fedsim.data.partition import partition_indices

    p = config.partition
    if p.kind == "natural":  # one client per value, over the whole split; the server's holdout removed after
        train = train_split(config)
        parts = partition_indices(train.labels, kind="natural", num_clients=p.num_clients, seed=config.seed,
                                  groups=natural_groups(train, p.by, config.data.name), sample_groups=p.sample_groups)
        held = server_holdout(config)
        return [np.setdiff1d(part, held) for part in parts] if held.size else parts
    labels = train_split(config).labels
    held = server_holdout(config)
    keep = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held) if held.size else None
    parts = partition_indices(
        labels if keep is None else labels[keep], kind=p.kind, num_clients=p.num_clients, seed=config.seed,
        alpha=p.alpha, classes_per_client=p.classes_per_client, quantity_alpha=p.quantity_alpha,
        min_partition_size=p.min_partition_size, self_balancing=p.self_balancing, params=p.params,
    )
    return parts if keep is None else [keep[part] for part in parts]


def natural_groups(split: Any, by: str, dataset: str) -> np.ndarray:
    """The column ``by`` of a split (``LabeledData`` or ``SplitSummary``): each sample's natural client."""
    columns = getattr(split, "columns", None) or {}
    if by not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise ConfigError(f"partition.by: {by!r} is not a column of dataset {dataset!r} (its columns: {have}); "
                          "npz: store an array named <column>_train; hf: name a column of the training split")
    return columns[by]


def _stream_kwargs(config: ScenarioConfig) -> dict[str, Any]:
    s = config.stream
    if s.kind == "class-incremental":
        return dict(kind=s.kind, tasks=s.tasks, first_task_classes=s.first_task_classes)
    if s.kind == "online":
        return dict(kind=s.kind, batch_size=s.batch_size, imbalance=s.imbalance, imbalance_ratio=s.imbalance_ratio,
                    classes_over_time=s.classes_over_time)
    raise RuntimeError("stream.kind is 'none': this scenario has no stream")


_STREAM_CACHE: dict[tuple, list] = {}


def scenario_streams(config: ScenarioConfig, partitions: list[np.ndarray]) -> list:
    """Every client's stream as the scenario's ``[stream]`` table describes (cached per process).

    The class order is drawn once from the full labels, shuffling is seeded per client, so
    ``scenario_streams(config, parts)[k] == client_stream(config, k, parts[k])``.
    """
    from fedsim.data.streams import client_streams

    key = (id(partitions), config.seed, repr(config.stream), repr(config.data))
    if key not in _STREAM_CACHE:
        _STREAM_CACHE.clear()
        _STREAM_CACHE[key] = client_streams(train_split(config).labels, partitions, seed=config.seed,
                                            **_stream_kwargs(config))
    return _STREAM_CACHE[key]


def client_stream(config: ScenarioConfig, partition_id: int, indices: np.ndarray):  # noqa: ANN201
    """One client's stream, built from its own partition only (equal to ``scenario_streams(...)[partition_id]``)."""
    from fedsim.data.streams import client_streams

    return client_streams(train_split(config).labels, [indices], seed=config.seed, client_ids=[partition_id],
                          **_stream_kwargs(config))[0]


# ------------------------------------------------------------------------------------------- models, features
@functools.lru_cache(maxsize=4)
def _feature_map_cached(name: str, input_shape: tuple, dim: int, seed: int, weights: str | None, device: str):
    from fedsim.nn.features import build_feature_map

    return build_feature_map(name, input_shape=input_shape, dim=dim, seed=seed, weights=weights, device=device)


def scenario_feature_map(config: ScenarioConfig, device: str = "cpu"):  # noqa: ANN201
    """The scenario's frozen feature map: the same map (same seed) on every node and on the server."""
    m = config.model
    shape = tuple(train_split(config).input_shape)
    return _feature_map_cached(m.feature_map, shape, m.feature_dim, derive_seed(config.seed, "feature-map"),
                               m.weights, device)


def block_form_needed(config: ScenarioConfig) -> tuple[str, int] | None:
    """(who, fewest blocks) where the strategy cuts the model into blocks or reads its head and embedding
    (``fedsim.nn.models.as_block_net``): FuseFL (``strategy.stages`` blocks), the recalibrated ensemble and the
    class-incremental strategies; None where the model's ``forward`` is all the strategy uses."""
    name = config.strategy.name
    if name == "fusefl":
        stages = int(config.strategy.params.stages)
        return f"FuseFL (strategy.stages = {stages})", stages
    if name == "ensemble-recalibrated":
        return "ensemble-recalibrated (head recalibration)", 1
    if get_strategy(name).stream == "class-incremental":
        return f"the class-incremental strategy {name!r} (embeddings, classifier head)", 1
    return None


def scenario_model(config: ScenarioConfig, num_classes: int, input_shape: tuple, width: int | None = None):  # noqa: ANN201
    """The scenario's trainable network, initialized identically on the server and every client.

    A factory model (``model.name = "package.module:function"``) is built with ``model.params``; where the strategy
    needs the block form (``block_form_needed``) it is returned as a ``BlockNet`` (``as_block_net``: a
    ``ConfigError`` naming ``model.name`` and what is missing when the model does not state its blocks).
    """
    from fedsim import catalog
    from fedsim.nn.models import as_block_net, build_model

    m = config.model
    if catalog.is_factory_name(m.name):
        model = build_model(m.name, input_shape=tuple(input_shape), num_classes=num_classes,
                            seed=derive_seed(config.seed, "model"), params=m.params)
        need = block_form_needed(config)
        return model if need is None else as_block_net(model, m.name, *need)
    return build_model(m.name, input_shape=tuple(input_shape), num_classes=num_classes,
                       width=m.width if width is None else width, seed=derive_seed(config.seed, "model"))


class ScenarioView:
    """What both sides of a strategy may know about the scenario: settings, dataset shape, shared factories."""

    def __init__(self, config: ScenarioConfig, device: str = "cpu") -> None:
        self.config = config
        self.params = config.strategy.params
        self.device = device

    @property
    def num_clients(self) -> int:
        return self.config.num_clients

    @property
    def num_classes(self) -> int:
        return train_split(self.config).num_classes

    @property
    def input_shape(self) -> tuple:
        return tuple(train_split(self.config).input_shape)

    def feature_map(self):  # noqa: ANN201
        """The scenario's frozen feature map (cached per process, identical on every node and on the server)."""
        return scenario_feature_map(self.config, self.device)

    def initial_model(self, width: int | None = None):  # noqa: ANN201
        """A fresh copy of the common initial model (``model.name``; ``width`` overrides ``model.width``)."""
        return scenario_model(self.config, self.num_classes, self.input_shape, width)

    def derive_seed(self, *parts: Any) -> int:
        """A seed derived from the scenario seed and ``parts``: equal in every process."""
        return derive_seed(self.config.seed, *parts)
