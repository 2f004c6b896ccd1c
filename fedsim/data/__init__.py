"""Datasets: one registry, one loader, in-memory ``LabeledData`` cached per process.

Every node of a simulation and the server load the same split independently, so loading is cached per process
(``functools.lru_cache``) and deterministic.

    from fedsim.data import load_dataset
    train = load_dataset("fashion-mnist", split="train")      # LabeledData, x (N, C, H, W) float32 in [0, 1]
    toy = load_dataset("synthetic", num_classes=5, dim=16)    # dataset options as keyword arguments
    describe_dataset("fashion-mnist", split="train")           # SplitSummary: labels, input shape, classes

Importing this package does not import torch: the readers produce numpy arrays, and ``load_dataset`` makes the
tensors. ``describe_dataset`` never does, so the checks before a run (``fedsim validate``) stay light.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from fedsim.catalog import DATASETS as DESCRIPTIONS
from fedsim.catalog import HF_PREFIX
from fedsim.errors import ConfigError

from . import hf, npz, sources
from .base import DatasetInfo, LabeledData, SplitArrays, SplitSummary, default_cache_dir
from .idx import read_idx, write_idx

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "LabeledData",
    "SPLITS",
    "SplitArrays",
    "SplitSummary",
    "clear_cache",
    "dataset_names",
    "default_cache_dir",
    "describe_dataset",
    "load_dataset",
    "register_dataset",
    "register_partition",
    "slice_indices",
    "read_idx",
    "write_idx",
]

SPLITS = ("train", "test")

_DOWNLOAD = {"download": True}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("fashion-mnist", DESCRIPTIONS["fashion-mnist"], sources.load_fashion_mnist, dict(_DOWNLOAD),
                    describe=sources.describe_fashion_mnist),
        DatasetInfo("mnist", DESCRIPTIONS["mnist"], sources.load_mnist, dict(_DOWNLOAD),
                    describe=sources.describe_mnist),
        DatasetInfo("digits", DESCRIPTIONS["digits"], sources.load_digits, {}),
        DatasetInfo("synthetic", DESCRIPTIONS["synthetic"], sources.load_synthetic,
                    dict(num_classes=10, dim=64, num_train=10000, num_test=2000, separation=2.0, seed=0)),
        DatasetInfo("cifar10", DESCRIPTIONS["cifar10"], sources.load_cifar10, dict(_DOWNLOAD)),
        DatasetInfo("cifar100", DESCRIPTIONS["cifar100"], sources.load_cifar100, dict(_DOWNLOAD)),
        DatasetInfo("svhn", DESCRIPTIONS["svhn"], sources.load_svhn, dict(_DOWNLOAD)),
        DatasetInfo("imagefolder", DESCRIPTIONS["imagefolder"], sources.load_imagefolder, {}),
        DatasetInfo("npz", DESCRIPTIONS["npz"], npz.load_npz, dict(npz.NPZ_OPTIONS), describe=npz.describe_npz),
        DatasetInfo("hf", DESCRIPTIONS["hf"], hf.load_hf, dict(hf.HF_OPTIONS), describe=hf.describe_hf),
    ]
}


def register_dataset(name: str, loader, description: str, options: dict[str, Any] | None = None,  # noqa: ANN001
                     describe=None) -> DatasetInfo:  # noqa: ANN001
    """Make ``name`` a ``data.name`` (a plugin's dataset): ``loader(split, root, **options)`` returns
    ``SplitArrays`` (numpy: ``fedsim validate`` stays torch-free) or ``LabeledData``; ``options`` holds the defaults
    of the options it accepts (``data.options``, and ``path`` for ``data.path``); ``describe``, where given, returns
    the split's ``SplitSummary`` without the images. A name already taken (a built-in or another plugin's) is
    refused."""
    from fedsim import catalog

    if not isinstance(name, str) or not name or name.startswith(HF_PREFIX) or ":" in name:
        raise ValueError(f"a dataset name must be a non-empty string without ':', got {name!r}")
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    if not callable(loader) or (describe is not None and not callable(describe)):
        raise TypeError(f"dataset {name!r}: loader (and describe) must be callables (split, root, **options)")
    info = DatasetInfo(name, description, loader, dict(options or {}), describe=describe)
    DATASETS[name] = info
    register = getattr(catalog, "register_name", None)
    if register is not None:
        register("datasets", name, description)
    else:  # pragma: no cover - a catalog without live names
        catalog.DATASETS[name] = description
    clear_cache()
    return info


def register_partition(name: str, fn, description: str) -> None:  # noqa: ANN001
    """Make ``name`` a ``partition.kind`` (a plugin's partition): ``fn(labels, num_clients=N, seed=S, **params)``
    returns N disjoint index arrays; ``fedsim.data.partition.register_partition`` (imported here on use)."""
    from .partition import register_partition as register

    register(name, fn, description)


def dataset_names() -> list[str]:
    """Names accepted by ``load_dataset`` (and by the scenario's ``data.name``)."""
    return sorted(DATASETS)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, **options: Any) -> LabeledData:
    """Load one split of a registered dataset (cached per process; treat the result as read-only).

    ``root`` is searched first for the files (and receives downloads); ``options`` are the dataset's own
    settings (see ``DATASETS[name].options``), e.g. ``download=False`` or the synthetic generator's.
    Raises ``ConfigError`` for an unknown name/split/option and ``DataUnavailableError`` when files are missing.
    """
    root_s, key = _resolve(name, split, root, options)
    return _load_cached(name, split, root_s, key, os.environ.get("FEDSIM_DATA"))


def describe_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                     **options: Any) -> SplitSummary:
    """``load_dataset``'s split without its images: labels, input shape, classes and source (cached per process).

    The same arguments and errors as ``load_dataset``, without torch; the IDX datasets read only their labels and
    the images' header, the others read their files into numpy.
    """
    root_s, key = _resolve(name, split, root, options)
    return _describe_cached(name, split, root_s, key, os.environ.get("FEDSIM_DATA"))


def slice_indices(n: int, max_n: int | None, seed: int) -> np.ndarray | None:
    """The samples a slice of ``max_n`` out of ``n`` keeps (``data.max_train`` / ``max_test``): drawn with ``seed``,
    sorted, the same in every process; None when it keeps them all."""
    if max_n is None or max_n >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_n])


def _resolve(name: str, split: str, root: str | os.PathLike | None, options: dict[str, Any]) -> tuple[str | None, tuple]:
    """Check the name, split and options; the cache key parts (root as a string, the merged options)."""
    info = DATASETS.get(name)
    if info is None and isinstance(name, str) and name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        info, options = DATASETS["hf"], {**options, "id": name[len(HF_PREFIX):]}  # "hf:<id>"
    if info is None:
        raise ConfigError(f"data.name: unknown dataset {name!r}; allowed: {', '.join(dataset_names())}, or "
                          "'hf:<dataset id>'")
    if split not in SPLITS:
        raise ConfigError(f"data.split: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        allowed = ", ".join(sorted(info.options)) or "none"
        raise ConfigError(
            f"data.{unknown[0]}: not an option of dataset {name!r} (got {options[unknown[0]]!r}); allowed options: {allowed}"
        )
    merged = {**info.options, **options}
    try:
        key = tuple(sorted(merged.items()))
        hash(key)
    except TypeError as err:
        raise ConfigError(f"data: dataset options must be plain values (numbers, strings, booleans), got {merged!r}") from err
    root_s = os.path.expanduser(os.fspath(root)) if root is not None else None
    return root_s, key


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, split: str, root: str | None, options: tuple, _env: str | None) -> LabeledData:
    # _env ($FEDSIM_DATA) is part of the key only: changing it must not return data found under the old value.
    data = _info(name).loader(split, root, **dict(options))
    return data.to_labeled() if isinstance(data, SplitArrays) else data


@functools.lru_cache(maxsize=16)
def _describe_cached(name: str, split: str, root: str | None, options: tuple, _env: str | None) -> SplitSummary:
    info = _info(name)
    if info.describe is not None:
        return info.describe(split, root, **dict(options))
    return info.loader(split, root, **dict(options)).summary()


def _info(name: str) -> DatasetInfo:
    return DATASETS["hf"] if name.startswith(HF_PREFIX) and name not in DATASETS else DATASETS[name]


def clear_cache() -> None:
    """Forget every cached dataset (frees memory; tests use it after changing files or $FEDSIM_DATA)."""
    _load_cached.cache_clear()
    _describe_cached.cache_clear()
    hf._open.cache_clear()
    npz._labels_and_columns.cache_clear()
