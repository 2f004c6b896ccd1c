"""``fedsim validate`` and ``fedsim list`` stay light: no torch, and the light paths agree with the full ones.

The checks before a run read a split's labels and shape without its images (``fedsim.data.describe_dataset``)
and count the model from its layer sizes (``fedsim.preflight.counted_parameters``); these tests pin that they say
what loading the data and building the model say. Timings live in ``scripts/bench_validate.py``, not here.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import AFL_DIGITS, DIGITS, scenario_config

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ray")

PROBE = """
import contextlib, io, sys
import fedsim.cli
with contextlib.redirect_stdout(io.StringIO()):
    code = fedsim.cli.main(sys.argv[1:])
print(code, *[m for m in {heavy!r} if m in sys.modules])
"""


def _cli_in_a_fresh_process(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return out.stdout.split()


def _fmnist_available() -> bool:
    from fedsim.data import describe_dataset
    from fedsim.errors import DataUnavailableError

    try:
        describe_dataset("fashion-mnist", "train", download=False)
    except DataUnavailableError:
        return False
    return True


@pytest.mark.parametrize("argv", [("list",), ("validate", "scenarios/afl-fmnist.toml"),
                                  ("validate", "scenarios/fusefl-fmnist-alpha0.1.toml")],
                         ids=["list", "validate-afl", "validate-fusefl"])
def test_list_and_validate_of_a_shipped_scenario_import_no_torch(argv):
    if argv[0] == "validate" and not _fmnist_available():
        if os.environ.get("CI"):
            raise AssertionError("Fashion-MNIST is missing")
        pytest.skip("Fashion-MNIST not available")
    assert _cli_in_a_fresh_process(*argv) == ["0"]


@pytest.mark.parametrize("text", [AFL_DIGITS, DIGITS], ids=["afl-digits", "cnn-digits"])
def test_validate_reads_other_datasets_without_torch_too(tmp_path, text):
    scenario = tmp_path / "s.toml"
    scenario.write_text(text)
    assert _cli_in_a_fresh_process("validate", str(scenario)) == ["0"]


# ------------------------------------------------------------------------------------------------- data
@pytest.fixture
def fresh_data():
    from fedsim import data, scenario

    data.clear_cache()
    scenario._split_cached.cache_clear()
    yield
    data.clear_cache()
    scenario._split_cached.cache_clear()


def _write_mnist(d: Path, gz: bool, n: int = 30) -> None:
    from fedsim.data import write_idx

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, count in (("train", n), ("t10k", n // 3)):
        suffix = ".gz" if gz else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 255, (count, 28, 28), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", (rng.permutation(count) % 10).astype(np.uint8))


def _same(summary, data) -> None:  # noqa: ANN001
    assert np.array_equal(summary.labels, data.labels) and summary.labels.dtype == np.int64
    assert summary.input_shape == data.input_shape and summary.classes == data.classes
    assert summary.source == data.source and len(summary) == len(data)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_describe_says_what_load_says_for_idx_files(tmp_path, fresh_data, gz):
    from fedsim.data import describe_dataset, load_dataset

    _write_mnist(tmp_path, gz)
    for split in ("train", "test"):
        _same(describe_dataset("mnist", split, root=tmp_path, download=False),
              load_dataset("mnist", split, root=tmp_path, download=False))


@pytest.mark.parametrize("name, options", [("digits", {}), ("synthetic", {"num_classes": 4, "dim": 8})])
def test_describe_says_what_load_says_for_generated_data(fresh_data, name, options):
    from fedsim.data import describe_dataset, load_dataset

    for split in ("train", "test"):
        _same(describe_dataset(name, split, **options), load_dataset(name, split, **options))


@pytest.mark.parametrize("damage", ["truncated", "two-members", "garbage-tail"])
def test_a_damaged_image_file_gets_the_full_readers_verdict(tmp_path, fresh_data, damage):
    """Where the header cannot vouch for the images, describe reads them: the same error, or the same data."""
    from fedsim.data import clear_cache, describe_dataset, load_dataset
    from fedsim.data.idx import read_idx_header
    from fedsim.errors import DataUnavailableError

    _write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "two-members":  # valid gzip (two members), the same bytes: only a full read can tell
        body = gzip.decompress(raw)
        path.write_bytes(gzip.compress(body[:100]) + gzip.compress(body[100:]))
    else:
        path.write_bytes(raw + b"\x00" * 7)
    assert read_idx_header(path) is None
    outcome = []
    for read in (load_dataset, describe_dataset):
        try:
            outcome.append(read("mnist", "train", root=tmp_path, download=False))
        except DataUnavailableError as exc:
            outcome.append(str(exc))
        clear_cache()
    if isinstance(outcome[0], str):
        assert outcome[1] == outcome[0]
    else:
        _same(outcome[1], outcome[0])


def test_the_preflight_split_is_the_runs_split(tmp_path, fresh_data):
    """``data.max_train`` / ``max_test`` slices: the same samples in preflight as in the run."""
    from fedsim.preflight import split_summary
    from fedsim.scenario import test_split, train_split

    config = scenario_config(AFL_DIGITS, tmp_path, "data.max_train=500", "data.max_test=77", "seed=5")
    _same(split_summary(config, "train"), train_split(config))
    _same(split_summary(config, "test"), test_split(config))
    assert len(split_summary(config, "train")) == 500


# ------------------------------------------------------------------------------------------------ model
def test_counted_parameters_equal_the_built_models():
    import torch

    from fedsim.catalog import MODELS
    from fedsim.nn.models import build_model
    from fedsim.preflight import MODEL_SIZES, counted_parameters

    assert set(MODEL_SIZES) == set(MODELS), "a model without a layer-size count (fedsim.preflight.MODEL_SIZES)"
    for name in MODELS:
        for shape in [(1, 28, 28), (3, 32, 32), (1, 8, 8), (1, 1, 64)]:
            for num_classes, width in [(10, None), (1, 1), (100, 3), (7, 16)]:
                with torch.device("meta"):
                    model = build_model(name, shape, num_classes, width)
                built = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
                assert counted_parameters(name, shape, num_classes, width) == built, (name, shape, width)
    # where only building can tell, the counter says so (preflight then builds on the meta device)
    assert counted_parameters("mlp", (1, 8, 8), 10, 2**30) is None  # a tensor near 64-bit sizes
    assert counted_parameters("no-such-model", (1, 8, 8), 10, None) is None
    assert counted_parameters("cnn", (1, 8, 8), 10, 0) is None
