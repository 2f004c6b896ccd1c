"""In-memory labeled data, the one type every dataset loader returns.

Datasets here are small enough (MNIST/CIFAR scale) to live in memory as one float tensor, which keeps
partitioning, subsetting and shipping a client's share to a Ray actor simple and fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["LabeledData", "DatasetInfo", "default_cache_dir", "from_uint8"]


@dataclass(eq=False)
class LabeledData:
    """Images ``x`` (float32, (N, C, H, W), values in [0, 1]) with integer labels ``y`` (int64, (N,)).

    Loaded datasets are cached per process and shared: treat ``x`` and ``y`` as read-only
    (``subset`` copies, so a subset may be modified freely).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str] = field(default_factory=list)
    source: str = ""  # where the split was read from (files, directory, or how it was generated); for config.json

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(f"LabeledData.x must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"LabeledData.y must be (N,) with N == {self.x.shape[0]}, got shape {tuple(self.y.shape)}"
            )
        if self.x.dtype != torch.float32 or self.y.dtype != torch.int64:
            raise ValueError(f"LabeledData needs float32 x and int64 y, got {self.x.dtype} and {self.y.dtype}")

    @property
    def labels(self) -> np.ndarray:
        """The labels as a numpy int64 array (shares memory with ``y``)."""
        return self.y.numpy()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray | list[int]) -> "LabeledData":
        """The samples at ``indices`` (a copy; empty indices give an empty (0, C, H, W) set)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        return LabeledData(x=self.x.index_select(0, idx), y=self.y.index_select(0, idx), classes=list(self.classes),
                           source=self.source)

    def __repr__(self) -> str:
        return f"LabeledData(n={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes})"


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: ``loader(split, root, **options) -> LabeledData``; ``options`` holds the defaults
    of the options it accepts (anything else is a config error)."""

    name: str
    description: str
    loader: Callable[..., LabeledData]
    options: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """Where downloads go when neither ``root`` nor ``$FEDSIM_DATA`` is given (``~/.cache/fedsim``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedsim"


def from_uint8(images: np.ndarray, labels: np.ndarray, classes: list[str], channels_last: bool,
               source: str = "") -> LabeledData:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) -> LabeledData scaled to [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif channels_last:
        arr = arr.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return LabeledData(x=x, y=y, classes=list(classes), source=source)
