"""Hugging Face datasets: ``data.name = "hf"`` (or ``"hf:<id>"``), read with the ``datasets`` library.

Where the data comes from:

- ``data.path`` = a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (offline), or a
  ``.parquet`` file, or a directory of ``.parquet`` files (split by file name: a name holding "test" is the test
  split, one holding "valid" a validation split, the rest train; the hub's ``data/train-00000-of-00001.parquet``
  layout reads as it is);
- without ``data.path``, ``"hf:<id>"`` is downloaded with ``datasets.load_dataset(id, cache_dir=data.root)``
  (needs the internet; a ``DataUnavailableError`` says how to provide the files otherwise).

``data.options``: ``image_column`` (default: the first of image, img, pixel_values, x, features present),
``label_column`` (default: the first of label, labels, fine_label, character, y), ``train_split`` / ``test_split``
("train" / "test"), ``test_fraction`` (where there is no test split: that share of the training split, a seeded
draw with ``split_seed``), ``channels_last`` (as for npz). Images are decoded to numpy (``Image`` columns through
PIL) and follow the npz rules (``fedsim.data.npz``); every other column of numbers or strings becomes a column of
the split (``partition.kind = "natural"``, ``partition.by``). Nothing here imports torch.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import ConfigError, DataUnavailableError

from .base import SplitArrays, SplitSummary
from .npz import image_array, image_shape, label_array, number_labels

__all__ = ["HF_OPTIONS", "describe_hf", "load_hf"]

HF_OPTIONS: dict[str, Any] = {"path": None, "id": None, "image_column": None, "label_column": None,
                              "train_split": "train", "test_split": "test", "test_fraction": None, "split_seed": 0,
                              "channels_last": None}
IMAGE_COLUMNS = ("image", "img", "pixel_values", "x", "features")
LABEL_COLUMNS = ("label", "labels", "fine_label", "character", "y")


def _what(path: str | None, hf_id: str | None) -> str:
    return f"data.path {path!r}" if path is not None else f"the Hugging Face dataset {hf_id!r}"


def _parquet_splits(p: Path) -> dict[str, list[Path]]:
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    splits: dict[str, list[Path]] = {}
    for f in files:
        name = f.name.lower()
        split = "test" if "test" in name else "validation" if "valid" in name else "train"
        splits.setdefault(split, []).append(f)
    return splits


@functools.lru_cache(maxsize=4)
def _open(path: str | None, hf_id: str | None, root: str | None, _stamp: float) -> dict:
    """{split name: datasets.Dataset} of the source (memory-mapped Arrow where it comes from disk)."""
    import datasets

    if path is not None:
        p = Path(os.path.expanduser(path))
        if not p.exists():
            raise ConfigError(f"data.path: {path!r} does not exist (looked at {p.resolve()}); give a save_to_disk "
                              "directory or .parquet file(s)")
        try:
            if p.is_dir() and (p / "dataset_dict.json").is_file():
                return dict(datasets.load_from_disk(str(p)))
            if p.is_dir() and (p / "state.json").is_file():
                return {"train": datasets.load_from_disk(str(p))}
            if (p.is_file() and p.suffix == ".parquet") or (p.is_dir() and any(p.rglob("*.parquet"))):
                import pyarrow as pa
                import pyarrow.parquet as pq
                from datasets.table import InMemoryTable

                return {split: datasets.Dataset(InMemoryTable(pa.concat_tables([pq.read_table(f) for f in files])))
                        for split, files in _parquet_splits(p).items()}
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - any reader failure names the path
            raise ConfigError(f"data.path: cannot read {path!r} as a Hugging Face dataset "
                              f"({type(err).__name__}: {err})") from err
        raise ConfigError(f"data.path: {path!r} is neither a save_to_disk directory (dataset_dict.json or "
                          "state.json) nor .parquet file(s)")
    if not hf_id:
        raise ConfigError("data.path: dataset 'hf' needs data.path (a save_to_disk directory or parquet files), "
                          "or name the hub dataset as data.name = \"hf:<id>\"")
    try:
        loaded = datasets.load_dataset(hf_id, cache_dir=root)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated dataset
        raise DataUnavailableError(
            f"Dataset 'hf:{hf_id}' could not be loaded from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Where there is no internet, save it elsewhere with "
            f"datasets.load_dataset({hf_id!r}).save_to_disk(DIR) and set data.path = DIR") from err
    return dict(loaded)


def _source(path: str | None, hf_id: str | None, root: str | None) -> dict:
    stamp = 0.0
    if path is not None:
        p = Path(os.path.expanduser(path))
        stamp = p.stat().st_mtime if p.exists() else -1.0
        path = str(p.resolve())
    return _open(path, hf_id, root, stamp)


def _pick(columns: list[str], given: str | None, defaults: tuple[str, ...], option: str, what: str) -> str:
    if given is not None:
        if given not in columns:
            raise ConfigError(f"data.options.{option}: {given!r} is not a column of {what} (columns: "
                              f"{', '.join(columns)})")
        return given
    for name in defaults:
        if name in columns:
            return name
    raise ConfigError(f"data.options.{option}: none of {', '.join(defaults)} is a column of {what} (columns: "
                      f"{', '.join(columns)}); name the column with data.options.{option}")


def _split_rows(n: int, fraction: Any, seed: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"data.options.test_fraction: {fraction!r} must be a number in (0, 1)")
    k = max(1, int(round(fraction * n)))
    order = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def _the_split(source: dict, split: str, opts: dict, what: str):  # noqa: ANN202
    """The datasets.Dataset of fedsim's ``split`` (rows of the train split where test_fraction applies)."""
    train_name, test_name = opts["train_split"], opts["test_split"]
    if train_name not in source:
        raise ConfigError(f"data.options.train_split: {train_name!r} is not a split of {what} (splits: "
                          f"{', '.join(source)})")
    fraction = opts["test_fraction"]
    if fraction is None:
        if test_name not in source:
            raise ConfigError(f"data.options.test_split: {test_name!r} is not a split of {what} (splits: "
                              f"{', '.join(source)}); name another one, or set data.options.test_fraction to hold "
                              "out a share of the training split")
        return source[train_name if split == "train" else test_name]
    train_rows, test_rows = _split_rows(len(source[train_name]), fraction, opts["split_seed"])
    return source[train_name].select(train_rows if split == "train" else test_rows)


def _columns_of(ds, skip: set[str]) -> dict[str, np.ndarray]:  # noqa: ANN001
    from datasets import ClassLabel, Value

    out = {}
    for name, feature in ds.features.items():
        if name in skip or not isinstance(feature, (Value, ClassLabel)) or str(getattr(feature, "dtype", "")) in (
                "binary", "large_binary"):
            continue
        values = np.asarray(ds[name])
        if values.dtype != object and values.ndim == 1:
            out[name] = values
    return out


def _image_sizes(ds, image_col: str) -> np.ndarray | None:  # noqa: ANN001
    """Each row's input shape as a row of an (n, k) array, read without decoding: an ``Image`` column's headers
    through PIL ((bands, H, W)), a column of nested lists from Arrow's list lengths (-1 where a row's own lists
    differ in length); None for a column of another type (fixed-size arrays: one shape by construction)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Image

    if isinstance(ds.features[image_col], Image):
        import io

        from PIL import Image as PILImage

        shapes = []
        for cell in ds.cast_column(image_col, Image(decode=False))[image_col]:
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
            with PILImage.open(source) as img:
                shapes.append((len(img.getbands()), img.size[1], img.size[0]))
        return np.asarray(shapes, dtype=np.int64).reshape(len(shapes), 3)
    column = ds.with_format("arrow")[image_col]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    owner = np.arange(n)  # the row each list of the current level belongs to
    shapes = []
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = np.asarray(pc.list_value_length(column).fill_null(0), dtype=np.int64)
        count = np.bincount(owner, minlength=n)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        first = np.where(count > 0, lengths[np.minimum(start, max(len(lengths) - 1, 0))] if len(lengths) else 0, 0)
        ragged = np.bincount(owner, weights=(lengths != first[owner]), minlength=n) > 0
        shapes.append(np.where(ragged, -1, first))
        owner = np.repeat(owner, lengths)
        column = pc.list_flatten(column)
    return np.stack(shapes, axis=1) if shapes else None


def check_image_sizes(ds, image_col: str, split: str, what: str) -> None:  # noqa: ANN001
    """Every input of the split has the first one's shape; else a ``ConfigError`` naming the column, the dataset
    and the first row that differs (fedsim stacks a split into one array, so images of several sizes cannot
    train). Reads headers and list lengths only, so ``fedsim validate`` refuses them too."""
    shapes = _image_sizes(ds, image_col)
    if shapes is None or len(shapes) == 0:
        return
    bad = np.flatnonzero((shapes != shapes[0]).any(axis=1) | (shapes == -1).any(axis=1))
    if bad.size:
        def text(s: np.ndarray) -> str:
            return "ragged" if (s == -1).any() else "x".join(str(int(v)) for v in s)

        row = int(bad[0])
        raise ConfigError(f"data.options.image_column: {image_col!r} of {what} ({split}) holds inputs of different "
                          f"sizes: row 0 is {text(shapes[0])}, row {row} is {text(shapes[row])} (rows unlike row 0: "
                          f"{bad.size}); fedsim stacks a split into one array, so resize them to one size "
                          "first (e.g. Dataset.map with PIL's Image.resize, then save_to_disk)")


def _labels(ds, label_col: str, where: str) -> np.ndarray:  # noqa: ANN001
    return label_array(np.asarray(ds[label_col]), len(ds), where)


def _class_names(train_ds, label_col: str) -> list[str] | None:  # noqa: ANN001
    from datasets import ClassLabel

    feature = train_ds.features[label_col]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _prepare(split: str, root: str | None, opts: dict) -> tuple:
    unknown = set(opts) - set(HF_OPTIONS)
    if unknown:  # pragma: no cover - load_dataset checks the options first
        raise ConfigError(f"data.{sorted(unknown)[0]}: not an option of the hf datasets")
    path, hf_id = opts["path"], opts["id"]
    what = _what(path, hf_id)
    source = _source(path, hf_id, root)
    ds = {s: _the_split(source, s, opts, what) for s in ("train", "test")}
    columns = list(ds["train"].column_names)
    image_col = _pick(columns, opts["image_column"], IMAGE_COLUMNS, "image_column", what)
    label_col = _pick(columns, opts["label_column"], LABEL_COLUMNS, "label_column", what)
    for s in ("train", "test"):
        if len(ds[s]) == 0:
            raise ConfigError(f"data.path: the {s} split of {what} holds no samples")
        missing = [c for c in (image_col, label_col) if c not in ds[s].column_names]
        if missing:
            raise ConfigError(f"data.options.image_column: the {s} split of {what} lacks {', '.join(missing)}")
    y = {s: _labels(ds[s], label_col, f"data.options.label_column: {label_col!r} of {what} ({s})")
         for s in ("train", "test")}
    y_train, y_test, classes = number_labels(y["train"], y["test"], _class_names(ds["train"], label_col),
                                             f"data.options.label_column: {label_col!r} of {what}")
    labels = {"train": y_train, "test": y_test}
    shapes = {}
    for s in ("train", "test"):
        first = np.asarray(ds[s].with_format("numpy")[:1][image_col])
        shapes[s] = image_shape(tuple(first.shape), opts["channels_last"],
                                f"data.options.image_column: {image_col!r} of {what} ({s})")
    if shapes["train"] != shapes["test"]:
        raise ConfigError(f"data.options.image_column: {image_col!r} of {what} holds inputs of shape "
                          f"{shapes['train']} in the training split but {shapes['test']} in the test split")
    check_image_sizes(ds[split], image_col, split, what)
    source_text = f"{path if path is not None else 'hf:' + str(hf_id)}[{split}]"
    cols = _columns_of(ds[split], {image_col, label_col})
    return ds[split], image_col, labels[split], classes, shapes[split], cols, source_text


def describe_hf(split: str, root: str | None, **options: Any) -> SplitSummary:
    """The split's labels, input shape (from its first image), classes and columns, without decoding images."""
    _, _, labels, classes, shape, cols, source = _prepare(split, root, {**HF_OPTIONS, **options})
    return SplitSummary(labels, shape, classes, source, cols)


def load_hf(split: str, root: str | None, **options: Any) -> SplitArrays:
    """One split as ``SplitArrays`` (images decoded into memory)."""
    opts = {**HF_OPTIONS, **options}
    ds, image_col, labels, classes, shape, cols, source = _prepare(split, root, opts)
    images = ds.with_format("numpy")[image_col]
    try:
        x = np.asarray(images)
    except ValueError as err:
        raise ConfigError(f"data.options.image_column: {image_col!r} holds images of different sizes ({err}); "
                          "resize them to one size first") from err
    if x.dtype == object:
        raise ConfigError(f"data.options.image_column: {image_col!r} holds images of different sizes or types; "
                          "resize them to one size first")
    x = image_array(x, opts["channels_last"], f"data.options.image_column: {image_col!r} ({split})")
    if tuple(x.shape[1:]) != tuple(shape):
        raise ConfigError(f"data.options.image_column: {image_col!r} ({split}) holds inputs of shape "
                          f"{tuple(x.shape[1:])}, its first one {shape}")
    return SplitArrays(x, labels.copy(), classes, source, cols)
