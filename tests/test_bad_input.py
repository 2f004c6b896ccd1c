"""Issue #23, bad input: one ``error:`` line naming the field or the file, exit 2, no traceback, and no memory
spent on what a file's own header says cannot be there."""

from __future__ import annotations

import gzip
import pickle
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import AFL_DIGITS
from fedsim.cli import main
from fedsim.config import MAX_LABEL_LENGTH, load_scenarios
from fedsim.errors import ConfigError, DataUnavailableError


def _scenario(tmp_path: Path, text: str = AFL_DIGITS, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_error_line(capsys) -> str:  # noqa: ANN001
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ TOML
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_toml_file_nested_5000_deep_is_one_error_line(tmp_path, capsys, command):
    deep = _scenario(tmp_path, "a = " + "[" * 5000 + "]" * 5000 + "\n", "deep.toml")
    assert main([command, str(deep)]) == 2
    assert _one_error_line(capsys) == (f"error: scenario: {deep} is nested too deeply (at most 32 levels of tables "
                                       "and arrays)")
    # deep enough to pass the TOML parser, too deep for a scenario: refused before anything recurses over it
    deep = _scenario(tmp_path, "a = " + "[" * 200 + "]" * 200 + "\n", "deep200.toml")
    assert main([command, str(deep)]) == 2
    assert "nested too deeply" in _one_error_line(capsys)


def test_a_set_value_nested_too_deeply_is_one_error_line(tmp_path, capsys):
    scenario = _scenario(tmp_path)
    assert main(["validate", str(scenario), "--set", "data.options=" + "[" * 5000 + "]" * 5000]) == 2
    assert "nested too deeply" in _one_error_line(capsys)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_table_as_a_dataset_option_names_the_field(tmp_path, capsys, command):
    scenario = _scenario(tmp_path)
    quiet = ["--quiet"] if command == "run" else []
    assert main([command, str(scenario), "--set", "data.options={a={b=1}}", *quiet]) == 2
    assert _one_error_line(capsys).startswith("error: data.options.a: {'b': 1} has the wrong type")
    with pytest.raises(ConfigError, match=r"data\.options\.num_classes: \[1, 2\] has the wrong type"):
        load_scenarios(scenario, ['data.name="synthetic"', "data.options={num_classes=[1,2]}"])
    assert load_scenarios(scenario, ['data.name="synthetic"', "data.options={num_classes=4}"])  # plain values pass


# ---------------------------------------------------------------------------------------------- labels
VARIANTS = AFL_DIGITS + """
[[variants]]
label = {label}
"""


@pytest.mark.parametrize("label", ['"ok\\n"', '"ok\\nok"', '"a/b"', '".."'])
def test_a_label_that_is_not_one_plain_directory_name_is_refused(tmp_path, capsys, label):
    scenario = _scenario(tmp_path, VARIANTS.format(label=label))
    assert main(["validate", str(scenario)]) == 2
    assert _one_error_line(capsys).startswith("error: variants[0].label: ")
    assert not any(p.name.startswith("ok") for p in tmp_path.iterdir())


def test_a_label_too_long_for_a_directory_name_is_refused_at_validation(tmp_path, capsys):
    scenario = _scenario(tmp_path, VARIANTS.format(label='"' + "a" * 300 + '"'))
    assert main(["validate", str(scenario)]) == 2
    assert _one_error_line(capsys) == (f"error: variants[0].label: {'a' * 20 + '...'!r} is 300 characters long; "
                                       f"labels name run directories, so at most {MAX_LABEL_LENGTH}")
    ok = _scenario(tmp_path, VARIANTS.format(label='"' + "a" * MAX_LABEL_LENGTH + '"'))
    assert [label for label, _ in load_scenarios(ok)] == ["a" * MAX_LABEL_LENGTH]
    plain = _scenario(tmp_path, 'name = "' + "n" * 101 + '"\n' + AFL_DIGITS, "named.toml")
    with pytest.raises(ConfigError, match="^name: 'nnnn.*' is 101 characters long"):
        load_scenarios(plain)
    assert main(["validate", str(_scenario(tmp_path)), "--set", 'name="' + "b" * 101 + '"']) == 2  # via --set
    assert _one_error_line(capsys).startswith("error: name: 'bbbb")


def test_a_sweep_point_too_long_for_a_directory_name_is_refused(tmp_path, capsys):
    scenario = _scenario(tmp_path)
    assert main(["run", str(scenario), "--sweep", "data.root=" + "x" * 250, "--out", str(tmp_path / "o")]) == 2
    assert "characters long" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ CIFAR
def _write_cifar10(root: Path, data: object, labels: object) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return folder


@pytest.mark.parametrize("data, labels, key", [
    (np.array([["x"] * 3072] * 2, dtype=object), [0, 1], "data"),  # an object array of strings
    (np.array([[None] * 3072] * 2, dtype=object), [0, 1], "data"),
    (np.zeros((2, 3072), np.uint8), np.array([0, {}], dtype=object), "labels"),
    (np.zeros((2, 3072), np.uint8), ["cat", "dog"], "labels"),
    (np.full((2, 3072), 300), [0, 1], "data"),  # out of uint8's range
])
def test_a_cifar_pickle_of_the_wrong_arrays_is_refused_naming_the_file(tmp_path, capsys, data, labels, key):
    from fedsim.data import clear_cache, load_dataset

    folder = _write_cifar10(tmp_path / "c10", data, labels)
    clear_cache()
    with pytest.raises(DataUnavailableError) as info:
        load_dataset("cifar10", "test", root=tmp_path / "c10", download=False)
    assert str(folder / "test_batch") in str(info.value) and repr(key) in str(info.value)
    scenario = _scenario(tmp_path, AFL_DIGITS.replace('name = "digits"', f'name = "cifar10"\nroot = '
                                                       f'"{tmp_path / "c10"}"\noptions = {{ download = false }}'))
    clear_cache()
    assert main(["validate", str(scenario)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: data: Dataset 'cifar10': ") and ("test_batch" in line or "data_batch" in line)
    clear_cache()


# -------------------------------------------------------------------------------------------------- IDX
def _gzip_bomb(path: Path, header: bytes, zeros: int) -> Path:
    """A gzip file whose IDX header is followed by ``zeros`` zero bytes: tiny on disk, huge inflated."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip wrapper
    chunk = bytes(1 << 20)
    parts = [comp.compress(header)]
    for _ in range(zeros // len(chunk)):
        parts.append(comp.compress(chunk))
    parts.append(comp.flush())
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("dims", [(16,), (1000, 1000)])
def test_a_gzip_bomb_is_refused_after_reading_what_its_header_announces(tmp_path, dims):
    from fedsim.data.idx import read_idx

    inflated = 64 << 20
    header = b"\x00\x00\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path = _gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", header, inflated)
    assert path.stat().st_size < 1 << 20 and len(gzip.decompress(path.read_bytes())) > inflated  # a bomb indeed
    tracemalloc.start()
    try:
        with pytest.raises(DataUnavailableError) as info:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value) and "file has more" in str(info.value)
    announced = int(np.prod(dims))
    assert peak < announced * 3 + (4 << 20), peak  # what the header announced (and chunks), never the 64 MiB


def test_a_small_gzip_whose_header_claims_gigabytes_is_refused_before_reading(tmp_path):
    from fedsim.data.idx import read_idx

    path = tmp_path / "claims.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">III", 60000, 1000, 1000) + bytes(1000)))
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(DataUnavailableError, match="more than a gzip file of"):
            read_idx(path)
        assert time.monotonic() - started < 30
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()


def test_idx_files_still_read_exactly(tmp_path):
    from fedsim.data.idx import read_idx, write_idx

    arr = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, arr)
        np.testing.assert_array_equal(read_idx(tmp_path / name), arr)
    body = gzip.decompress((tmp_path / "a.idx.gz").read_bytes())
    (tmp_path / "long.gz").write_bytes(gzip.compress(body + b"\x01"))
    with pytest.raises(DataUnavailableError, match="need 105 data bytes, file has more"):
        read_idx(tmp_path / "long.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(body[:-1]))
    with pytest.raises(DataUnavailableError, match="need 105 data bytes, file has 104"):
        read_idx(tmp_path / "short.gz")
