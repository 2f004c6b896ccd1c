"""Datasets: real Fashion-MNIST, digits, synthetic, imagefolder, the IDX reader and the offline error paths.

Nothing here touches the network: every download is replaced by a fake torchvision class.
"""

import gzip
import os
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim import data as fdata
from fedsim.data import DATASETS, LabeledData, clear_cache, dataset_names, load_dataset, read_idx
from fedsim.data import sources
from fedsim.errors import ConfigError, DataUnavailableError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No $FEDSIM_DATA from the caller, downloads/cache under tmp, a fresh dataset cache per test."""
    monkeypatch.delenv("FEDSIM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    clear_cache()
    yield
    clear_cache()


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file written by hand (independent of fedsim's writer)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes()


def write_idx_set(d: Path, n_train: int, n_test: int, gz: bool, size: int = 28, value: int = 255) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.full((n, size, size), value, dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr)
            (d / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)


# ------------------------------------------------------------------------------------------ real data
def test_fashion_mnist_real():
    try:
        train = load_dataset("fashion-mnist", split="train")
    except DataUnavailableError:
        if os.environ.get("CI"):
            raise
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    test = load_dataset("fashion-mnist", split="test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert 0.2 < float(train.x.mean()) < 0.4  # real images, not blank: Fashion-MNIST's mean pixel is ~0.286
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.labels.dtype == np.int64 and train.num_classes == 10 and train.input_shape == (1, 28, 28)
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert load_dataset("fashion-mnist", split="train") is train, "cached per process"


def test_idx_search_order_root_then_env(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "env" / "fashion-mnist", 20, 10, gz=True, value=255)
    write_idx_set(tmp_path / "mine", 30, 10, gz=False, value=0)
    monkeypatch.setenv("FEDSIM_DATA", str(tmp_path / "env"))
    from_env = load_dataset("fashion-mnist")
    assert len(from_env) == 20 and float(from_env.x.min()) == 1.0  # $FEDSIM_DATA beats /usr/share
    from_root = load_dataset("fashion-mnist", root=tmp_path / "mine")
    assert len(from_root) == 30 and float(from_root.x.max()) == 0.0  # root beats $FEDSIM_DATA
    mnist = load_dataset("mnist", split="test", root=str(tmp_path / "mine"), download=False)
    assert len(mnist) == 10 and mnist.classes == [str(i) for i in range(10)]


def test_idx_dataset_missing_everywhere_gives_one_paragraph(tmp_path, monkeypatch):
    calls = []

    class OfflineFashionMNIST:
        def __init__(self, root, download, train):
            calls.append((root, download, train))
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error [Errno -3]>")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", OfflineFashionMNIST)
    monkeypatch.setattr(sources, "FASHION_MNIST", replace(sources.FASHION_MNIST, system_dir=tmp_path / "no-system"))
    monkeypatch.setenv("FEDSIM_DATA", str(tmp_path / "envdata"))
    with pytest.raises(DataUnavailableError) as info:
        load_dataset("fashion-mnist", split="test", root=tmp_path / "empty")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Dataset 'fashion-mnist' (test split)")
    for path in (tmp_path / "empty", tmp_path / "envdata" / "fashion-mnist", tmp_path / "envdata",
                 tmp_path / "no-system", tmp_path / "xdg-cache" / "fedsim" / "FashionMNIST" / "raw"):
        assert str(path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "FEDSIM_DATA" in msg and "download" in msg
    assert "urlopen error" in msg
    assert calls == [(str(tmp_path / "empty"), True, False)]
    with pytest.raises(DataUnavailableError, match="downloading is disabled"):
        load_dataset("fashion-mnist", split="test", root=tmp_path / "empty", download=False)
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------- IDX reader
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(arr)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got = read_idx(path, expect_ndim=3)
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable
    ints = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i.idx").write_bytes(idx_bytes(ints, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "i.idx"), ints)


def test_fedsim_writer_matches_format(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    fdata.write_idx(tmp_path / "a.gz", arr)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == idx_bytes(arr)


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "magic number"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "data type"),
        (b"\x00\x00\x08\x03" + struct.pack(">III", 2, 2, 2) + b"\x00" * 7, "need 8 data bytes, file has 7"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "need 2 data bytes, file has 3"),
        (b"\x00\x00", "shorter than"),
        (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"ab")[:-6], "gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, payload, why):
    path = tmp_path / "bad-idx"
    path.write_bytes(payload)
    with pytest.raises(DataUnavailableError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and why in str(info.value)


def test_read_idx_checks_ndim_and_pairs(tmp_path):
    write_idx_set(tmp_path, 5, 5, gz=False)
    with pytest.raises(DataUnavailableError, match="expected 1"):
        read_idx(tmp_path / "train-images-idx3-ubyte", expect_ndim=1)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(DataUnavailableError, match="do not belong together"):
        load_dataset("fashion-mnist", root=tmp_path)


# --------------------------------------------------------------------------------- digits, synthetic
def test_digits_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    for part in (train, test):  # stratified: every class close to its 10% share
        frac = np.bincount(part.labels, minlength=10) / len(part)
        assert np.all(np.abs(frac - 0.1) < 0.01)
    clear_cache()
    again = load_dataset("digits", "train")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    from sklearn.datasets import load_digits

    all_images = torch.from_numpy(load_digits().images.astype(np.float32) / 16).reshape(1797, -1)
    flat = torch.cat([train.x, test.x]).reshape(1797, -1)
    # train and test together are exactly the 1797 digits (sorted rows compare as multisets)
    assert torch.equal(torch.sort(flat.sum(1)).values, torch.sort(all_images.sum(1)).values)


def _ncm_accuracy(train: LabeledData, test: LabeledData) -> float:
    xtr, xte = train.x.reshape(len(train), -1), test.x.reshape(len(test), -1)
    means = torch.stack([xtr[train.y == c].mean(0) for c in range(train.num_classes)])
    pred = torch.cdist(xte, means).argmin(1)
    return float((pred == test.y).float().mean())


def test_synthetic_determinism_and_separability():
    opts = dict(num_classes=5, dim=16, num_train=1000, num_test=500)
    a = load_dataset("synthetic", "train", **opts, seed=3)
    clear_cache()
    b = load_dataset("synthetic", "train", **opts, seed=3)
    c = load_dataset("synthetic", "train", **opts, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (1000, 1, 1, 16) and a.input_shape == (1, 1, 16) and a.num_classes == 5
    assert float(a.x.min()) >= 0.0 and float(a.x.max()) <= 1.0
    np.testing.assert_array_equal(np.bincount(a.labels), [200] * 5)
    far = _ncm_accuracy(load_dataset("synthetic", "train", **opts, separation=8.0),
                        load_dataset("synthetic", "test", **opts, separation=8.0))
    near = _ncm_accuracy(load_dataset("synthetic", "train", **opts, separation=0.0),
                         load_dataset("synthetic", "test", **opts, separation=0.0))
    assert far > 0.97, "train and test must share the class means"
    assert near < 0.35
    with pytest.raises(ConfigError, match="^data.num_classes"):
        load_dataset("synthetic", num_classes=1)


# -------------------------------------------------------------------------------------- registry, API
def test_registry_and_errors():
    assert dataset_names() == sorted(DATASETS)
    assert {"fashion-mnist", "mnist", "digits", "synthetic", "cifar10", "cifar100", "svhn", "imagefolder"} <= set(
        dataset_names()
    )
    assert all(info.description for info in DATASETS.values())
    with pytest.raises(ConfigError) as info:
        load_dataset("imagenet-42")
    msg = str(info.value)
    assert msg.startswith("data.name") and "imagenet-42" in msg and all(n in msg for n in dataset_names())
    with pytest.raises(ConfigError, match="^data.split"):
        load_dataset("digits", split="valid")
    with pytest.raises(ConfigError, match="^data.dimm"):
        load_dataset("synthetic", dimm=3)


def test_subset_keeps_shapes():
    d = load_dataset("digits", "test")
    sub = d.subset(np.array([5, 0, 2]))
    assert sub.x.shape == (3, 1, 8, 8) and torch.equal(sub.y, d.y[[5, 0, 2]]) and sub.classes == d.classes
    empty = d.subset(np.array([], dtype=np.int64))
    assert empty.x.shape == (0, 1, 8, 8) and len(empty) == 0 and empty.labels.dtype == np.int64


# ------------------------------------------------------------------------------------- imagefolder
def _png(path: Path, size=(4, 3), mode="L", value=128):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)


def test_imagefolder(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for cls, value in (("cat", 0), ("dog", 255)):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", value=value)
    _png(tmp_path / "train" / "zebra" / "0.png", value=51)  # a class the test split lacks
    train = load_dataset("imagefolder", "train", root=tmp_path)
    test = load_dataset("imagefolder", "test", root=tmp_path)
    assert train.classes == test.classes == ["cat", "dog", "zebra"]
    assert train.x.shape == (7, 1, 3, 4) and test.x.shape == (2, 1, 3, 4)  # (N, C, H, W); PNG size is (W, H)
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1, 1, 2])
    assert float(train.x[0].max()) == 0.0 and float(train.x[3].min()) == 1.0
    assert float(train.x[6, 0, 0, 0]) == pytest.approx(0.2)


def test_imagefolder_rgb_and_errors(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", mode="RGB", value=255)
    _png(tmp_path / "train" / "b" / "0.png", mode="L", value=0)
    rgb = load_dataset("imagefolder", "train", root=tmp_path)
    assert rgb.x.shape == (2, 3, 3, 4)
    assert rgb.x[0, :, 0, 0].tolist() == [1.0, 0.0, 1.0]
    _png(tmp_path / "train" / "b" / "1.png", size=(5, 5))
    clear_cache()
    with pytest.raises(DataUnavailableError, match="one size") as info:
        load_dataset("imagefolder", "train", root=tmp_path)
    assert "1.png" in str(info.value)
    with pytest.raises(DataUnavailableError, match="is not a directory"):
        load_dataset("imagefolder", "test", root=tmp_path)
    with pytest.raises(ConfigError, match="^data.root"):
        load_dataset("imagefolder", "train")


# ------------------------------------------------------------------------ CIFAR / SVHN (no network)
def _write_cifar10(root: Path, n: int = 4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.full((n, 3072), 255, dtype=np.uint8)
        data[:, 1024:] = 0  # red channel only
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": list(np.arange(n) % 10)}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)


def test_cifar10_download_path_and_reader(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:  # what torchvision's download leaves behind, in the real on-disk format
        def __init__(self, root, download, train):
            calls.append((root, download, train))
            _write_cifar10(Path(root))

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    d = load_dataset("cifar10", "train", root=tmp_path / "c10")
    assert calls == [(str(tmp_path / "c10"), True, True)]
    assert d.x.shape == (20, 3, 32, 32) and d.classes[3] == "c3"
    assert d.x[:, 0].min() == 1.0 and d.x[:, 1:].max() == 0.0
    t = load_dataset("cifar10", "test", root=tmp_path / "c10")
    assert len(t) == 4 and len(calls) == 1, "files already there: no second download"


def test_cifar100_and_svhn_readers(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "test", "wb") as fh:
        pickle.dump({"data": np.zeros((3, 3072), np.uint8), "fine_labels": [0, 99, 5], "coarse_labels": [0, 1, 2]}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, fh)
    c100 = load_dataset("cifar100", "test", root=tmp_path, download=False)
    assert c100.num_classes == 100 and c100.labels.tolist() == [0, 99, 5]

    import scipy.io

    x = np.zeros((32, 32, 3, 2), np.uint8)
    x[0, 31, 2, 1] = 255  # row 0, column 31, blue channel, second image
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [3]], np.uint8)})
    svhn = load_dataset("svhn", "test", root=tmp_path, download=False)
    assert svhn.x.shape == (2, 3, 32, 32) and svhn.labels.tolist() == [0, 3]  # label 10 means digit 0
    assert float(svhn.x[1, 2, 0, 31]) == 1.0 and float(svhn.x.sum()) == 1.0


@pytest.mark.parametrize("name, tv_class", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("svhn", "SVHN")])
def test_offline_download_failure_message(tmp_path, monkeypatch, name, tv_class):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, tv_class, offline)
    root = tmp_path / "nothing-here"
    with pytest.raises(DataUnavailableError) as info:
        load_dataset(name, "train", root=root)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"Dataset '{name}' (train split)" in msg
    assert str(root) in msg and str(tmp_path / "xdg-cache" / "fedsim") in msg
    assert "FEDSIM_DATA" in msg and "name resolution" in msg and f"torchvision.datasets.{tv_class}" in msg
