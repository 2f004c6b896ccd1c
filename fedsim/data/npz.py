"""Arrays of one's own: ``data.name = "npz"``, ``data.path`` = a ``.npz`` file (``numpy.savez``), read with
``allow_pickle=False``.

The file holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally

- ``classes``: the class names (strings), one per label value;
- ``<column>_train`` / ``<column>_test``: one value per sample (integers or strings), e.g. ``groups_train`` or
  ``writer_train``; ``partition.kind = "natural"`` with ``partition.by = "<column>"`` reads them.

Images: ``(N, C, H, W)``, ``(N, H, W, C)`` (channels last: told by ``data.options.channels_last``, or guessed
when the last axis is 1, 3 or 4 and the second is not), ``(N, H, W)`` (one channel) or ``(N, D)`` (flat
features, shape ``(1, 1, D)``). ``uint8`` (or other integers within 0..255) are scaled to [0, 1]; floating-point
values are used as they are (float32). Labels: non-negative integers, or strings (numbered in sorted order over
both splits). Every problem is a ``ConfigError`` naming ``data.path`` and the array.

The helpers that turn arrays into ``SplitArrays`` (``image_array``, ``label_array``) are shared with the
Hugging Face reader (``fedsim.data.hf``). Nothing here imports torch: ``describe_npz`` reads the image array's
header only, so ``fedsim validate`` stays light.
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import ConfigError

from .base import SplitArrays, SplitSummary

__all__ = ["NPZ_OPTIONS", "describe_npz", "image_array", "label_array", "load_npz"]

NPZ_OPTIONS: dict[str, Any] = {"path": None, "channels_last": None}
REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def _path(path: str | None) -> Path:
    if path is None:
        raise ConfigError("data.path: dataset 'npz' needs data.path, a .npz file holding x_train, y_train, x_test, "
                          "y_test")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ConfigError(f"data.path: {str(path)!r} is not a file (looked at {p.resolve()}); give a .npz file "
                          "written by numpy.savez holding x_train, y_train, x_test, y_test")
    return p


def _stamp(p: Path) -> tuple[str, int, int]:
    st = p.stat()
    return str(p.resolve()), int(st.st_mtime_ns), int(st.st_size)


def _headers(p: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in the file, from the .npy headers (nothing decompressed beyond them)."""
    out = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                out[info.filename[:-4]] = (tuple(int(s) for s in shape), dtype)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ConfigError(f"data.path: {str(p)!r} is not a readable .npz file ({type(err).__name__}: {err}); write "
                          "it with numpy.savez or numpy.savez_compressed") from err
    for key, (_, dtype) in out.items():
        if dtype.hasobject:
            raise ConfigError(f"data.path: {key} in {str(p)!r} is an object array, which fedsim does not load "
                              "(allow_pickle=False); store numbers or fixed-width strings")
    missing = [k for k in REQUIRED if k not in out]
    if missing:
        raise ConfigError(f"data.path: {str(p)!r} lacks {', '.join(missing)}; an npz dataset holds x_train, y_train, "
                          f"x_test, y_test (it holds: {', '.join(sorted(out)) or 'nothing'})")
    return out


def _read(p: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in keys}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"data.path: cannot read {str(p)!r} ({type(err).__name__}: {err})") from err


def channel_layout(shape: tuple[int, ...], channels_last: bool | None) -> bool:
    """Whether 4-D images of ``shape`` are (N, H, W, C): as told, or guessed from where a 1/3/4 axis is."""
    if channels_last is not None:
        return bool(channels_last)
    return shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4)


def image_shape(shape: tuple[int, ...], channels_last: bool | None, where: str) -> tuple[int, int, int]:
    """(C, H, W) of one input, from the array's shape."""
    if len(shape) == 2:
        return 1, 1, shape[1]
    if len(shape) == 3:
        return 1, shape[1], shape[2]
    if len(shape) == 4:
        if channel_layout(shape, channels_last):
            return shape[3], shape[1], shape[2]
        return shape[1], shape[2], shape[3]
    raise ConfigError(f"{where} has shape {shape}; images must be (N, C, H, W), (N, H, W, C), (N, H, W) or flat "
                      "features (N, D)")


def image_array(x: np.ndarray, channels_last: bool | None, where: str) -> np.ndarray:
    """(N, C, H, W) uint8 or float32 from the accepted layouts and dtypes."""
    shape = tuple(x.shape)
    c, h, w = image_shape(shape, channels_last, where)
    if x.ndim == 4 and channel_layout(shape, channels_last):
        x = x.transpose(0, 3, 1, 2)
    x = x.reshape(shape[0], c, h, w)
    if x.dtype == np.bool_ or x.dtype.kind not in "uif":
        raise ConfigError(f"{where} has dtype {x.dtype}; images must be uint8 (0..255) or floating point")
    if x.dtype.kind in "ui" and x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ConfigError(f"{where} holds integers outside 0..255 (dtype {x.dtype}); store uint8 pixels or "
                              "floats")
        x = x.astype(np.uint8)
    elif x.dtype.kind == "f":
        x = x.astype(np.float32, copy=False)
        if x.size and not np.isfinite(x).all():
            raise ConfigError(f"{where} holds NaN or infinite values")
    return np.ascontiguousarray(x)


def label_array(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """A 1-D label array of length ``n`` (integers >= 0 or strings), checked; returned as it is."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise ConfigError(f"{where} has shape {tuple(y.shape)}; labels must be one per sample, shape ({n},)")
    if y.dtype.kind in "US":
        return y
    if y.dtype == np.bool_ or y.dtype.kind not in "ui":
        raise ConfigError(f"{where} has dtype {y.dtype}; labels must be integers >= 0 or strings")
    if y.size and y.min() < 0:
        raise ConfigError(f"{where} holds the negative label {int(y.min())}; labels must be integers >= 0")
    return y


def number_labels(train: np.ndarray, test: np.ndarray, names: list[str] | None, where: str
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """int64 labels of both splits and the class names (given ones, the sorted strings, or "0".."K-1")."""
    if (train.dtype.kind in "US") != (test.dtype.kind in "US"):
        raise ConfigError(f"{where}: the training labels are {train.dtype} and the test labels {test.dtype}; use "
                          "strings in both or integers in both")
    if train.dtype.kind in "US":
        values = np.unique(np.concatenate([train.astype(str), test.astype(str)]))
        codes = {v: i for i, v in enumerate(values.tolist())}
        if names is not None:
            raise ConfigError(f"{where}: string labels name their classes themselves; leave out the class names")
        return (np.searchsorted(values, train.astype(str)).astype(np.int64),
                np.searchsorted(values, test.astype(str)).astype(np.int64), list(codes))
    top = max(int(train.max()) if train.size else -1, int(test.max()) if test.size else -1)
    if names is not None:
        if len(names) <= top:
            raise ConfigError(f"{where}: {len(names)} class names, but a label is {top}; give one name per label "
                              "value")
    else:
        names = [str(i) for i in range(top + 1)]
    return train.astype(np.int64), test.astype(np.int64), list(names)


def _column_keys(headers: dict, split: str) -> list[str]:
    suffix = f"_{split}"
    return sorted(k for k in headers if k.endswith(suffix) and k not in REQUIRED and len(k) > len(suffix))


@functools.lru_cache(maxsize=4)
def _labels_and_columns(stamp: tuple[str, int, int]) -> tuple[dict, dict[str, np.ndarray], dict[str, list[str]]]:
    """(headers, {split: int64 labels}, classes) and the columns of both splits, checked; cached per file version."""
    p = Path(stamp[0])
    headers = _headers(p)
    names_key = ("classes",) if "classes" in headers else ()
    col_keys = {s: _column_keys(headers, s) for s in ("train", "test")}
    arrays = _read(p, ("y_train", "y_test", *names_key, *col_keys["train"], *col_keys["test"]))
    where = f"data.path: {str(p)!r}"
    n = {s: headers[f"x_{s}"][0][0] if headers[f"x_{s}"][0] else 0 for s in ("train", "test")}
    for s in ("train", "test"):
        if len(headers[f"x_{s}"][0]) < 2:
            raise ConfigError(f"{where}: x_{s} has shape {headers[f'x_{s}'][0]}; images must be (N, C, H, W), "
                              "(N, H, W, C), (N, H, W) or flat features (N, D)")
        if n[s] == 0:
            raise ConfigError(f"{where}: x_{s} holds no samples")
    y = {s: label_array(arrays[f"y_{s}"], n[s], f"{where}: y_{s}") for s in ("train", "test")}
    names = None
    if names_key:
        raw = arrays["classes"]
        if raw.ndim != 1 or raw.dtype.kind not in "US":
            raise ConfigError(f"{where}: classes must be a 1-D array of strings, got {raw.dtype} {raw.shape}")
        names = [str(v) for v in raw.tolist()]
    y_train, y_test, classes = number_labels(y["train"], y["test"], names, where)
    columns: dict[str, dict[str, np.ndarray]] = {}
    for s in ("train", "test"):
        columns[s] = {}
        for key in col_keys[s]:
            value = arrays[key]
            if value.ndim != 1 or value.shape[0] != n[s] or value.dtype.kind not in "uifUSb":
                raise ConfigError(f"{where}: {key} is {value.dtype} of shape {value.shape}; a column beside x_{s} "
                                  f"and y_{s} holds one number or string per sample, shape ({n[s]},)")
            columns[s][key[: -len(s) - 1]] = value
    return headers, {"train": y_train, "test": y_test}, {"classes": classes, "columns": columns}


def _shape(headers: dict, split: str, channels_last: bool | None, where: str) -> tuple[int, int, int]:
    train = image_shape(headers["x_train"][0], channels_last, f"{where}: x_train")
    test = image_shape(headers["x_test"][0], channels_last, f"{where}: x_test")
    if train != test:
        raise ConfigError(f"{where}: x_train holds inputs of shape {train} but x_test {test}; both splits need "
                          "the same shape")
    return train if split == "train" else test


def describe_npz(split: str, root: str | None, path: str | None = None,
                 channels_last: bool | None = None) -> SplitSummary:
    """The split's labels, input shape, classes and columns, reading the images' header only."""
    p = _path(path)
    headers, labels, extra = _labels_and_columns(_stamp(p))
    shape = _shape(headers, split, channels_last, f"data.path: {str(p)!r}")
    return SplitSummary(labels[split], shape, list(extra["classes"]), f"{p.resolve()}[x_{split}]",
                        dict(extra["columns"][split]))


def load_npz(split: str, root: str | None, path: str | None = None, channels_last: bool | None = None) -> SplitArrays:
    """One split of the npz file as ``SplitArrays`` (numpy; ``load_dataset`` makes the tensors)."""
    p = _path(path)
    headers, labels, extra = _labels_and_columns(_stamp(p))
    where = f"data.path: {str(p)!r}"
    _shape(headers, split, channels_last, where)
    x = image_array(_read(p, (f"x_{split}",))[f"x_{split}"], channels_last, f"{where}: x_{split}")
    return SplitArrays(x, labels[split].copy(), list(extra["classes"]), f"{p.resolve()}[x_{split}]",
                       dict(extra["columns"][split]))
