"""Datasets: one registry, one loader, in-memory ``LabeledData`` cached per process.

Every node of a simulation and the server load the same split independently, so loading is cached per process
(``functools.lru_cache``) and deterministic.

    from fedsim.data import load_dataset
    train = load_dataset("fashion-mnist", split="train")      # LabeledData, x (N, C, H, W) float32 in [0, 1]
    toy = load_dataset("synthetic", num_classes=5, dim=16)    # dataset options as keyword arguments
"""

from __future__ import annotations

import functools
import os
from typing import Any

from fedsim.catalog import DATASETS as DESCRIPTIONS
from fedsim.errors import ConfigError

from . import sources
from .base import DatasetInfo, LabeledData, default_cache_dir
from .idx import read_idx, write_idx

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "LabeledData",
    "SPLITS",
    "clear_cache",
    "dataset_names",
    "default_cache_dir",
    "load_dataset",
    "read_idx",
    "write_idx",
]

SPLITS = ("train", "test")

_DOWNLOAD = {"download": True}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("fashion-mnist", DESCRIPTIONS["fashion-mnist"], sources.load_fashion_mnist, dict(_DOWNLOAD)),
        DatasetInfo("mnist", DESCRIPTIONS["mnist"], sources.load_mnist, dict(_DOWNLOAD)),
        DatasetInfo("digits", DESCRIPTIONS["digits"], sources.load_digits, {}),
        DatasetInfo("synthetic", DESCRIPTIONS["synthetic"], sources.load_synthetic,
                    dict(num_classes=10, dim=64, num_train=10000, num_test=2000, separation=2.0, seed=0)),
        DatasetInfo("cifar10", DESCRIPTIONS["cifar10"], sources.load_cifar10, dict(_DOWNLOAD)),
        DatasetInfo("cifar100", DESCRIPTIONS["cifar100"], sources.load_cifar100, dict(_DOWNLOAD)),
        DatasetInfo("svhn", DESCRIPTIONS["svhn"], sources.load_svhn, dict(_DOWNLOAD)),
        DatasetInfo("imagefolder", DESCRIPTIONS["imagefolder"], sources.load_imagefolder, {}),
    ]
}


def dataset_names() -> list[str]:
    """Names accepted by ``load_dataset`` (and by the scenario's ``data.name``)."""
    return sorted(DATASETS)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, **options: Any) -> LabeledData:
    """Load one split of a registered dataset (cached per process; treat the result as read-only).

    ``root`` is searched first for the files (and receives downloads); ``options`` are the dataset's own
    settings (see ``DATASETS[name].options``), e.g. ``download=False`` or the synthetic generator's.
    Raises ``ConfigError`` for an unknown name/split/option and ``DataUnavailableError`` when files are missing.
    """
    info = DATASETS.get(name)
    if info is None:
        raise ConfigError(f"data.name: unknown dataset {name!r}; allowed: {', '.join(dataset_names())}")
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
    return _load_cached(name, split, root_s, key, os.environ.get("FEDSIM_DATA"))


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, split: str, root: str | None, options: tuple, _env: str | None) -> LabeledData:
    # _env ($FEDSIM_DATA) is part of the key only: changing it must not return data found under the old value.
    return DATASETS[name].loader(split, root, **dict(options))


def clear_cache() -> None:
    """Forget every cached dataset (frees memory; tests use it after changing files or $FEDSIM_DATA)."""
    _load_cached.cache_clear()
