"""Loaders for each dataset fedsim knows. Each returns a whole split as numpy ``SplitArrays`` (``fedsim.data``
makes the tensors); the IDX datasets also have a ``describe_*`` that reads only the labels and the image header.

Real files are read with small format readers of our own (IDX, the CIFAR python pickles, SVHN's .mat) instead of
through torchvision's dataset classes: those insist on their own directory layout and checksums, which rejects
the Debian package's ``.gz`` files and makes the code path untestable offline. torchvision is used only to
*download* missing files; when that fails (no internet) the error is one paragraph that says where we looked and
how to provide the files.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fedsim.errors import ConfigError, DataUnavailableError

from .base import SplitArrays, SplitSummary, default_cache_dir, uint8_arrays
from .idx import read_idx, read_idx_header

SYSTEM_DATA_DIR = Path("/usr/share/datasets")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(i) for i in range(10)]


# ----------------------------------------------------------------------------------------------- helpers
def _env_data_dir() -> Path | None:
    value = os.environ.get("FEDSIM_DATA")
    return Path(value).expanduser() if value else None


def _download_dir(root: str | None) -> Path:
    """Downloads go to ``root`` if given, else ``$FEDSIM_DATA``, else ``~/.cache/fedsim``."""
    if root is not None:
        return Path(root)
    return _env_data_dir() or default_cache_dir()


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    seen: set[str] = set()
    out: list[Path] = []
    for p in paths:
        key = os.path.normpath(str(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _torchvision_download(class_name: str, root: Path, **kwargs: Any) -> None:
    """Let torchvision fetch a dataset into ``root`` (its own layout below it). Looked up at call time so
    tests can replace the torchvision class and never touch the network."""
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    getattr(tvd, class_name)(root=str(root), download=True, **kwargs)


def _unavailable(name: str, split: str, what: str, tried: list[Path], download_note: str, how: str) -> DataUnavailableError:
    tried_s = ", ".join(str(p) for p in tried) if tried else "(no directories)"
    return DataUnavailableError(
        _one_line(
            f"Dataset '{name}' ({split} split) is not available: looked for {what} in {tried_s}; {download_note}. "
            f"To provide it, {how}."
        )
    )


def _try_download(class_name: str, dl_dir: Path, download: bool, **kwargs: Any) -> tuple[bool, str]:
    if not download:
        return False, "downloading is disabled (data option download = false)"
    try:
        _torchvision_download(class_name, dl_dir, **kwargs)
    except Exception as err:  # network errors come in many types (URLError, RuntimeError, OSError, ...)
        return False, f"downloading it with torchvision.datasets.{class_name} into {dl_dir} failed ({type(err).__name__}: {err})"
    return True, ""


# ----------------------------------------------------------------------------------------- IDX datasets
@dataclass(frozen=True)
class IdxSpec:
    name: str
    tv_class: str  # torchvision class used for downloads; its files land in ROOT/<tv_class>/raw
    classes: list[str]
    system_dir: Path
    apt_package: str | None


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_pair(d: Path, split: str) -> tuple[Path, Path] | None:
    found = []
    for stem in IDX_FILES[split]:
        hit = next((c for c in (d / stem, d / f"{stem}.gz") if c.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def idx_search_dirs(spec: IdxSpec, root: str | None) -> list[Path]:
    """Directories searched, in order: root, $FEDSIM_DATA/<name>, $FEDSIM_DATA, the system dir, the cache."""
    dirs: list[Path] = []
    if root is not None:
        r = Path(root)
        dirs += [r, r / spec.name, r / spec.tv_class / "raw"]
    env = _env_data_dir()
    if env is not None:
        dirs += [env / spec.name, env, env / spec.tv_class / "raw"]
    dirs.append(spec.system_dir)
    dirs.append(default_cache_dir() / spec.tv_class / "raw")
    return _dedupe(dirs)


def _check_labels(name: str, where: Path, labels: np.ndarray, num_classes: int) -> None:
    """Integer labels in 0..num_classes-1; a DataUnavailableError naming the file otherwise."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataUnavailableError(f"Dataset '{name}': {where} holds {labels.dtype} labels; class labels must be "
                                   f"integers in 0..{num_classes - 1}.")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataUnavailableError(
            f"Dataset '{name}': {where} holds labels outside the class range 0..{num_classes - 1} (smallest "
            f"{int(labels.min())}, largest {int(labels.max())}); these are not {name} files."
        )


def _check_not_empty(name: str, split: str, where: Path, n: int) -> None:
    if n == 0:
        raise DataUnavailableError(f"Dataset '{name}' ({split} split): {where} holds no samples; provide the "
                                   "complete files.")


def _check_idx_pair(spec: IdxSpec, images_path: Path, labels_path: Path, num_images: int, image_dtype: np.dtype,
                    labels: np.ndarray, split: str) -> None:
    """The two files belong together and are this dataset's (the same checks whether the images were read)."""
    if num_images != labels.shape[0]:
        raise DataUnavailableError(
            f"Dataset '{spec.name}': {images_path} holds {num_images} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files do not belong together."
        )
    if image_dtype != np.uint8 or labels.size and int(labels.max()) >= len(spec.classes):
        raise DataUnavailableError(
            f"Dataset '{spec.name}': {images_path} / {labels_path} are not {spec.name} files "
            f"(image dtype {image_dtype}, largest label {int(labels.max()) if labels.size else None})."
        )
    _check_labels(spec.name, labels_path, labels, len(spec.classes))
    _check_not_empty(spec.name, split, images_path, num_images)


def _read_idx_split(spec: IdxSpec, images_path: Path, labels_path: Path, split: str = "train") -> SplitArrays:
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    _check_idx_pair(spec, images_path, labels_path, images.shape[0], images.dtype, labels, split)
    return uint8_arrays(images, labels, spec.classes, channels_last=False, source=f"{images_path}, {labels_path}")


def _describe_idx_split(spec: IdxSpec, images_path: Path, labels_path: Path, split: str) -> SplitSummary:
    """The split's labels and image shape from the labels file and the images' header; a full read (and its
    error) where the header cannot vouch for the file."""
    header = read_idx_header(images_path)
    if header is None or len(header[0]) != 3:
        return _read_idx_split(spec, images_path, labels_path, split).summary()
    (num_images, height, width), dtype = header
    labels = read_idx(labels_path, expect_ndim=1)
    _check_idx_pair(spec, images_path, labels_path, num_images, dtype, labels, split)
    return SplitSummary(np.asarray(labels, dtype=np.int64), (1, height, width), list(spec.classes),
                        f"{images_path}, {labels_path}")


def _other(split: str) -> str:
    return "test" if split == "train" else "train"


def _split_elsewhere(name: str, split: str, d: Path, what: str) -> DataUnavailableError:
    """The first directory holding the dataset has only the other split: refuse rather than mix two copies."""
    return DataUnavailableError(
        f"Dataset '{name}' ({split} split): {d} holds its {_other(split)} split but not the {split} split "
        f"({what}); both splits must come from one place, so put the {split} files there too (or point "
        f"FEDSIM_DATA / data.root at a directory holding both)."
    )


def _locate_idx_pair(spec: IdxSpec, split: str, root: str | None) -> tuple[Path, Path] | None:
    """The split's two IDX files in the first search dir holding the dataset (None: in none of them)."""
    for d in idx_search_dirs(spec, root):
        pair = _find_idx_pair(d, split)
        if pair is not None:
            return pair
        if _find_idx_pair(d, _other(split)) is not None:
            raise _split_elsewhere(spec.name, split, d, " and ".join(f"{s}[.gz]" for s in IDX_FILES[split]))
    return None


def describe_idx_dataset(spec: IdxSpec, split: str, root: str | None, download: bool = True) -> SplitSummary:
    """``load_idx_dataset``'s split without its images (labels and the images' header); loads it where the files
    are not found yet (the download)."""
    pair = _locate_idx_pair(spec, split, root)
    if pair is not None:
        return _describe_idx_split(spec, *pair, split=split)
    return load_idx_dataset(spec, split, root, download).summary()


def load_idx_dataset(spec: IdxSpec, split: str, root: str | None, download: bool = True) -> SplitArrays:
    """Find the split's two IDX files (``.gz`` or raw) in the search dirs, else download with torchvision."""
    dirs = idx_search_dirs(spec, root)
    pair = _locate_idx_pair(spec, split, root)
    if pair is not None:
        return _read_idx_split(spec, *pair, split=split)
    dl_dir = _download_dir(root)
    ok, note = _try_download(spec.tv_class, dl_dir, download, train=(split == "train"))
    if ok:
        pair = _find_idx_pair(dl_dir / spec.tv_class / "raw", split)
        if pair is not None:
            return _read_idx_split(spec, *pair, split=split)
        note = f"torchvision reported a download into {dl_dir} but the IDX files are not under {dl_dir / spec.tv_class / 'raw'}"
    how = []
    if spec.apt_package:
        how.append(f"install the Debian package (`apt-get install {spec.apt_package}`, which puts the files in {spec.system_dir})")
    how.append(
        f"put the four IDX files ({', '.join(IDX_FILES['train'] + IDX_FILES['test'])}, gzip-compressed or not) in a "
        f"directory and set FEDSIM_DATA to it (or pass data.root)"
    )
    how.append(f"allow the download (internet access) into {dl_dir}")
    what = " and ".join(f"{s}[.gz]" for s in IDX_FILES[split])
    raise _unavailable(spec.name, split, what, dirs, note, ", or ".join(how))


FASHION_MNIST = IdxSpec("fashion-mnist", "FashionMNIST", FASHION_MNIST_CLASSES,
                        SYSTEM_DATA_DIR / "fashion-mnist", "dataset-fashion-mnist")
MNIST = IdxSpec("mnist", "MNIST", DIGIT_CLASSES, SYSTEM_DATA_DIR / "mnist", None)


def load_fashion_mnist(split: str, root: str | None, download: bool = True) -> SplitArrays:
    return load_idx_dataset(FASHION_MNIST, split, root, download)


def describe_fashion_mnist(split: str, root: str | None, download: bool = True) -> SplitSummary:
    return describe_idx_dataset(FASHION_MNIST, split, root, download)


def load_mnist(split: str, root: str | None, download: bool = True) -> SplitArrays:
    return load_idx_dataset(MNIST, split, root, download)


def describe_mnist(split: str, root: str | None, download: bool = True) -> SplitSummary:
    return describe_idx_dataset(MNIST, split, root, download)


# ------------------------------------------------------------------------------------ CIFAR and SVHN
def _base_dirs(name: str, root: str | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root), Path(root) / name]
    env = _env_data_dir()
    if env is not None:
        dirs += [env / name, env]
    dirs.append(default_cache_dir())
    return _dedupe(dirs)


# What the official CIFAR python pickles (and numpy arrays pickled by any numpy version) are made of: numpy's
# array and scalar reconstructors and dtypes, plus the codec Python 3 uses for bytes in protocol-2 pickles.
# dict, list, tuple, str, bytes and numbers need no global at all. Nothing else may be loaded: an unpickler that
# resolves arbitrary globals runs arbitrary code (`os.system` in a crafted file).
_CIFAR_PICKLE_GLOBALS = frozenset({
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in ((f"{prefix}.multiarray", "_reconstruct"), (f"{prefix}.multiarray", "scalar"),
                         (f"{prefix}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads plain containers, numbers, strings and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name}; a CIFAR batch holds only "
                                     "dicts, lists, strings, numbers and numpy arrays")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id; a CIFAR batch has none")


def _unpickle(path: Path) -> dict:
    """Read one CIFAR python batch with the restricted unpickler: data files are never allowed to run code."""
    try:
        with open(path, "rb") as fh:
            batch = _RestrictedUnpickler(fh, encoding="latin1").load()
    except Exception as err:
        raise DataUnavailableError(
            f"cannot read {path} as a CIFAR python batch: {type(err).__name__}: {err}. Only the official "
            "python-version files (dicts of numpy arrays and lists) are accepted."
        ) from err
    if not isinstance(batch, dict):
        raise DataUnavailableError(f"cannot read {path} as a CIFAR python batch: it holds a "
                                   f"{type(batch).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_array(name: str, f: Path, key: str, value: object, dtype: type) -> np.ndarray:
    """``value`` (a batch's ``data`` or labels) as a numeric array; ``DataUnavailableError`` naming the file and
    the key for anything else: an object array (which the restricted unpickler lets through, built of plain
    values), strings, ragged lists, numbers out of range."""
    what = f"Dataset '{name}': {f} holds a {key!r} entry that is not"
    if isinstance(value, np.ndarray) and value.dtype.kind not in "biu":
        raise DataUnavailableError(f"{what} an integer array (dtype {value.dtype}); the CIFAR python format "
                                   "stores uint8 images and integer labels")
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biu":
            raise TypeError(f"dtype {array.dtype}")
        if array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
            raise OverflowError(f"values outside {np.iinfo(dtype).min}..{np.iinfo(dtype).max}")
        return array.astype(dtype, copy=False)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataUnavailableError(f"{what} integers of the CIFAR python format ({type(err).__name__}: "
                                   f"{str(err)[:200]})") from None


def _cifar_arrays(name: str, files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        batch = _unpickle(f)
        try:
            data = _cifar_array(name, f, "data", batch["data"], np.uint8)
            labels = _cifar_array(name, f, label_key, batch[label_key], np.int64)
        except KeyError as err:
            raise DataUnavailableError(f"Dataset '{name}': {f} lacks the key {err} of the CIFAR python format") from err
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
            raise DataUnavailableError(
                f"Dataset '{name}': {f} holds data of shape {data.shape} and {labels.shape[0]} labels, "
                f"expected (n, 3072) and n labels"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


@dataclass(frozen=True)
class CifarSpec:
    name: str
    tv_class: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    label_key: str


CIFAR10 = CifarSpec("cifar10", "CIFAR10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                    ("test_batch",), "batches.meta", "label_names", "labels")
CIFAR100 = CifarSpec("cifar100", "CIFAR100", "cifar-100-python", ("train",), ("test",), "meta",
                     "fine_label_names", "fine_labels")


def _cifar_files(spec: CifarSpec, base: Path, split: str) -> list[Path] | None:
    folder = base / spec.folder
    names = spec.train_files if split == "train" else spec.test_files
    files = [folder / n for n in names] + [folder / spec.meta_file]
    return files if all(f.is_file() for f in files) else None


def _read_cifar(spec: CifarSpec, files: list[Path], split: str = "train") -> SplitArrays:
    *batches, meta = files
    x, y = _cifar_arrays(spec.name, batches, spec.label_key)
    names = _unpickle(meta).get(spec.names_key, [])
    if not isinstance(names, (list, tuple, np.ndarray)) or (isinstance(names, np.ndarray) and names.ndim != 1):
        raise DataUnavailableError(f"Dataset '{spec.name}': {meta} holds a {spec.names_key!r} entry that is not a "
                                   "list of class names")
    classes = [str(c) for c in names]
    if not classes or (y.size and (y.min() < 0 or y.max() >= len(classes))):
        raise DataUnavailableError(f"Dataset '{spec.name}': labels in {batches[0].parent} do not match the class names in {meta}")
    _check_not_empty(spec.name, split, batches[0].parent, x.shape[0])
    return uint8_arrays(x, y, classes, channels_last=False, source=str(batches[0].parent))


def load_cifar(spec: CifarSpec, split: str, root: str | None, download: bool = True) -> SplitArrays:
    """Read ``<dir>/<cifar-…-python folder>`` from the first search dir that has it, else download."""
    dirs = _base_dirs(spec.name, root)
    for d in dirs:
        files = _cifar_files(spec, d, split)
        if files is not None:
            return _read_cifar(spec, files, split)
        if _cifar_files(spec, d, _other(split)) is not None:
            names = spec.train_files if split == "train" else spec.test_files
            raise _split_elsewhere(spec.name, split, d / spec.folder, ", ".join(names))
    dl_dir = _download_dir(root)
    ok, note = _try_download(spec.tv_class, dl_dir, download, train=(split == "train"))
    if ok:
        files = _cifar_files(spec, dl_dir, split)
        if files is not None:
            return _read_cifar(spec, files, split)
        note = f"torchvision reported a download into {dl_dir} but {dl_dir / spec.folder} is incomplete"
    names = spec.train_files if split == "train" else spec.test_files
    what = f"{spec.folder}/{{{','.join(names + (spec.meta_file,))}}}"
    how = (
        f"extract the official python version of the archive (it contains {spec.folder}/) into a directory and set "
        f"FEDSIM_DATA to it (or pass data.root), or allow the download (internet access) into {dl_dir}"
    )
    raise _unavailable(spec.name, split, what, [d / spec.folder for d in dirs], note, how)


def load_cifar10(split: str, root: str | None, download: bool = True) -> SplitArrays:
    return load_cifar(CIFAR10, split, root, download)


def load_cifar100(split: str, root: str | None, download: bool = True) -> SplitArrays:
    return load_cifar(CIFAR100, split, root, download)


def _read_svhn(path: Path) -> SplitArrays:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
        x = np.asarray(mat["X"], dtype=np.uint8)
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except Exception as err:
        raise DataUnavailableError(f"cannot read {path} as an SVHN .mat file: {type(err).__name__}: {err}") from err
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise DataUnavailableError(f"{path}: SVHN arrays have shapes X {x.shape}, y {y.shape}; expected (32, 32, 3, n), (n, 1)")
    y = np.where(y == 10, 0, y)  # SVHN stores the digit 0 as label 10
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataUnavailableError(f"{path}: SVHN labels outside 0..10")
    _check_not_empty("svhn", path.name.split("_")[0], path, y.shape[0])
    return uint8_arrays(np.transpose(x, (3, 2, 0, 1)), y, DIGIT_CLASSES, channels_last=False, source=str(path))


def load_svhn(split: str, root: str | None, download: bool = True) -> SplitArrays:
    """SVHN's cropped digits ``{train,test}_32x32.mat`` (the 'extra' split is not used)."""
    fname = f"{split}_32x32.mat"
    dirs = _base_dirs("svhn", root)
    for d in dirs:
        if (d / fname).is_file():
            return _read_svhn(d / fname)
        if (d / f"{_other(split)}_32x32.mat").is_file():
            raise _split_elsewhere("svhn", split, d, fname)
    dl_dir = _download_dir(root)
    ok, note = _try_download("SVHN", dl_dir, download, split=split)
    if ok:
        if (dl_dir / fname).is_file():
            return _read_svhn(dl_dir / fname)
        note = f"torchvision reported a download into {dl_dir} but {dl_dir / fname} is missing"
    how = (f"put {fname} (from the official SVHN site) in a directory and set FEDSIM_DATA to it (or pass data.root), "
           f"or allow the download (internet access) into {dl_dir}")
    raise _unavailable("svhn", split, fname, dirs, note, how)


# ---------------------------------------------------------------------------------------- in-wheel data
def load_digits(split: str, root: str | None) -> SplitArrays:
    """scikit-learn's 1797 8x8 digits (bundled, always offline); stratified 80/20 split with seed 0."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    target = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(target.shape[0]), test_size=0.2, stratify=target, random_state=0
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    x = (np.asarray(bunch.images, dtype=np.float32)[idx] / 16.0)[:, None, :, :].copy()
    return SplitArrays(x, target[idx].copy(), list(DIGIT_CLASSES),
                       source="sklearn.datasets.load_digits (bundled with scikit-learn)")


def load_synthetic(
    split: str,
    root: str | None,
    num_classes: int = 10,
    dim: int = 64,
    num_train: int = 10000,
    num_test: int = 2000,
    separation: float = 2.0,
    seed: int = 0,
) -> SplitArrays:
    """Gaussian classes for scale tests: class c is N(separation * u_c, I) with u_c a random unit vector.

    The class means come from ``seed`` alone, so train and test share them; the samples use separate streams
    per split. Values are mapped affinely into [0, 1] (0.5 + z * scale, with a scale that keeps the means and
    5 standard deviations inside, then clipped) so the [0, 1] contract holds without changing separability.
    Shape (1, 1, dim); labels are balanced (n // num_classes per class, remainder to the first classes).
    """
    for key, value, lo in (("num_classes", num_classes, 2), ("dim", dim, 1), ("num_train", num_train, 1),
                           ("num_test", num_test, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ConfigError(f"data.{key}: must be an integer >= {lo} for the synthetic dataset, got {value!r}")
    if isinstance(separation, bool) or not isinstance(separation, (int, float)) or not np.isfinite(separation) or separation < 0:
        raise ConfigError(f"data.separation: must be a finite number >= 0, got {separation!r}")
    rng_means = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    u = rng_means.standard_normal((num_classes, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    n = num_train if split == "train" else num_test
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1 if split == "train" else 2]))
    y = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(y)
    z = separation * u[y] + rng.standard_normal((n, dim))
    scale = 0.5 / (float(separation) * float(np.abs(u).max()) + 5.0)
    x = np.clip(0.5 + scale * z, 0.0, 1.0).astype(np.float32)
    return SplitArrays(
        x.reshape(n, 1, 1, dim),
        y,
        classes=[f"class_{c}" for c in range(num_classes)],
        source=f"generated (synthetic Gaussian classes, seed {seed})",
    )


# ------------------------------------------------------------------------------------------ imagefolder
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _class_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_imagefolder(split: str, root: str | None) -> SplitArrays:
    """The user's own images, ``root/<split>/<class>/*.png|jpg|…``, read into memory.

    Class ids come from the sorted class folders of ``root/train`` for both splits (so a test split missing a
    class keeps the same ids, as torchvision's ImageFolder would not). All images must share one size; the
    result is 1-channel when every image is grayscale, RGB otherwise.
    """
    from PIL import Image

    if root is None:
        raise ConfigError("data.root: the imagefolder dataset needs a root directory laid out as root/<split>/<class>/*.png")
    base = Path(root)
    split_dir = base / split
    train_dir = base / "train"
    if not split_dir.is_dir():
        raise DataUnavailableError(
            f"Dataset 'imagefolder' ({split} split) is not available: {split_dir} is not a directory; lay out your "
            f"images as {base}/train/<class>/*.png and {base}/test/<class>/*.png."
        )
    classes = _class_dirs(train_dir) if train_dir.is_dir() else _class_dirs(split_dir)
    unknown = sorted(set(_class_dirs(split_dir)) - set(classes))
    if unknown:
        raise DataUnavailableError(
            f"Dataset 'imagefolder': {split_dir} has class folders {unknown} that {train_dir} does not have; "
            f"both splits must use the training split's classes {classes}."
        )
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        if cdir.is_dir():
            files += [(f, label) for f in sorted(cdir.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    if not files:
        raise DataUnavailableError(
            f"Dataset 'imagefolder' ({split} split) is not available: no images ({', '.join(IMAGE_EXTENSIONS)}) "
            f"under {split_dir}/<class>/."
        )
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except Exception as err:
            raise DataUnavailableError(f"Dataset 'imagefolder': cannot read image {f}: {type(err).__name__}: {err}") from err
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        first = images[0].size
        odd = next(i for i, im in enumerate(images) if im.size != first)
        raise DataUnavailableError(
            f"Dataset 'imagefolder' ({split} split): images must all have one size, found {len(sizes)} sizes, "
            f"e.g. {files[0][0]} is {first[0]}x{first[1]} but {files[odd][0]} is "
            f"{images[odd].size[0]}x{images[odd].size[1]} (width x height); resize them beforehand."
        )
    gray = all(im.mode in ("L", "1") for im in images)
    mode = "L" if gray else "RGB"
    arr = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in images])
    labels = np.asarray([lab for _, lab in files], dtype=np.int64)
    return uint8_arrays(arr, labels, classes, channels_last=not gray, source=str(split_dir))
