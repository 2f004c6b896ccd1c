"""In-memory labeled data: what the format readers produce (numpy), and the one tensor type every run uses.

Datasets here are small enough (MNIST/CIFAR scale) to live in memory as one float tensor, which keeps
partitioning, subsetting and shipping a client's share to a Ray actor simple and fast.

The readers (``fedsim.data.sources``) return ``SplitArrays``: numpy only, so that ``fedsim validate`` can learn a
split's size, shape and labels (``SplitSummary``) without importing torch; tensors are made in one place,
``SplitArrays.to_labeled``, and torch is imported there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DatasetInfo", "LabeledData", "SplitArrays", "SplitSummary", "default_cache_dir", "from_uint8",
           "uint8_arrays"]


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
    # per-sample values besides the label, one (N,) numpy array each (a writer, a user id): what
    # partition.kind = "natural" reads (partition.by); empty for the built-in datasets
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        if self.x.dim() != 4:
            raise ValueError(f"LabeledData.x must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"LabeledData.y must be (N,) with N == {self.x.shape[0]}, got shape {tuple(self.y.shape)}"
            )
        if self.x.dtype != torch.float32 or self.y.dtype != torch.int64:
            raise ValueError(f"LabeledData needs float32 x and int64 y, got {self.x.dtype} and {self.y.dtype}")
        _check_columns(self.columns, int(self.y.shape[0]))

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

    def subset(self, indices: np.ndarray | list[int]) -> LabeledData:
        """The samples at ``indices`` (a copy; empty indices give an empty (0, C, H, W) set)."""
        import torch

        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = torch.as_tensor(rows)
        return LabeledData(x=self.x.index_select(0, idx), y=self.y.index_select(0, idx), classes=list(self.classes),
                           source=self.source, columns={k: v[rows] for k, v in self.columns.items()})

    def summary(self) -> SplitSummary:
        return SplitSummary(self.labels, self.input_shape, list(self.classes), self.source, dict(self.columns))

    def __repr__(self) -> str:
        return f"LabeledData(n={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes})"


@dataclass(frozen=True, eq=False)
class SplitSummary:
    """A split without its images: its labels, the shape of one input and the class names. What the checks
    before a run need (``fedsim.preflight``), read without torch and, for IDX files, without the images."""

    labels: np.ndarray  # int64 (N,)
    input_shape: tuple[int, int, int]
    classes: list[str]
    source: str = ""
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # as LabeledData.columns

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> SplitSummary:
        """The rows at ``indices`` (labels and columns)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        return SplitSummary(self.labels[rows], self.input_shape, self.classes, self.source,
                            {k: v[rows] for k, v in self.columns.items()})


@dataclass(eq=False)
class SplitArrays:
    """One split as the readers produce it: ``images`` (N, C, H, W), uint8 (scaled to [0, 1] when made a tensor)
    or float32 already in [0, 1], and int64 ``labels`` (N,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str = ""
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # as LabeledData.columns

    def to_labeled(self) -> LabeledData:
        """The tensors a run uses (the one place torch is imported for data)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(self.images))
        if self.images.dtype == np.uint8:
            x = x.to(torch.float32).div_(255.0)
        return LabeledData(x=x, y=torch.from_numpy(self.labels), classes=list(self.classes), source=self.source,
                           columns=dict(self.columns))

    def summary(self) -> SplitSummary:
        return SplitSummary(self.labels, tuple(int(s) for s in self.images.shape[1:]),  # type: ignore[arg-type]
                            list(self.classes), self.source, dict(self.columns))


def _check_columns(columns: dict[str, np.ndarray], n: int) -> None:
    for key, value in columns.items():
        if not isinstance(value, np.ndarray) or value.shape != (n,):
            raise ValueError(f"column {key!r} must be a numpy array of shape ({n},), got "
                             f"{getattr(value, 'shape', type(value).__name__)}")


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: ``loader(split, root, **options)`` returns ``SplitArrays`` (or a ``LabeledData``);
    ``options`` holds the defaults of the options it accepts (anything else is a config error). ``describe``,
    where given, returns the split's ``SplitSummary`` faster than loading it (same arguments, same errors)."""

    name: str
    description: str
    loader: Callable[..., SplitArrays | LabeledData]
    options: dict[str, Any] = field(default_factory=dict)
    describe: Callable[..., SplitSummary] | None = None


def default_cache_dir() -> Path:
    """Where downloads go when neither ``root`` nor ``$FEDSIM_DATA`` is given (``~/.cache/fedsim``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedsim"


def uint8_arrays(images: np.ndarray, labels: np.ndarray, classes: list[str], channels_last: bool,
                 source: str = "") -> SplitArrays:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) -> ``SplitArrays`` with (N, C, H, W) images."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif channels_last:
        arr = arr.transpose(0, 3, 1, 2)
    return SplitArrays(arr, np.asarray(labels, dtype=np.int64).copy(), list(classes), source)


def from_uint8(images: np.ndarray, labels: np.ndarray, classes: list[str], channels_last: bool,
               source: str = "") -> LabeledData:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) -> LabeledData scaled to [0, 1]."""
    return uint8_arrays(images, labels, classes, channels_last, source).to_labeled()
