"""Issue #21: a model of one's own (a factory outside the repository), arrays of one's own (npz), a saved Hugging Face
dataset, and the natural partition (one client per writer). Offline, on small files the tests write."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import scenario_config
from fedsim.errors import ConfigError

MODEL_FILE = '''
import torch
from torch import nn


class BlockMLP(nn.Module):
    """Block form: `blocks` (cuttable, in order) and `head`; forward == head(blocks(x))."""

    def __init__(self, num_classes, input_shape, hidden=64, depth=3):
        super().__init__()
        d = 1
        for s in input_shape:
            d *= s
        layers = [nn.Sequential(nn.Flatten(1), nn.Linear(d, hidden), nn.ReLU())]
        layers += [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(depth - 1)]
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Sequential(nn.Linear(hidden, num_classes))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def block_mlp(num_classes, input_shape, **params):
    return BlockMLP(num_classes, input_shape, **params)


def plain(num_classes, input_shape, hidden=32):
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(nn.Flatten(1), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_module(num_classes, input_shape):
    return "a string"
'''

BASE = """
seed = 0
{rounds}
[data]
{data}
[partition]
{partition}
[model]
{model}
[client]
epochs = 3
batch_size = 32
lr = 0.1
[simulation]
backend = "inline"
[strategy]
name = "{strategy}"
"""


@pytest.fixture
def model_pkg(tmp_path, monkeypatch):
    """A module `byo_models` in a directory outside the repository, importable by name (sys.path and PYTHONPATH,
    so processes started from here see it too)."""
    pkg = tmp_path / "outside"
    pkg.mkdir()
    (pkg / "byo_models.py").write_text(textwrap.dedent(MODEL_FILE))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    yield pkg
    sys.modules.pop("byo_models", None)


def _scenario(tmp_path, *, strategy="fedavg", rounds=3, data='name = "digits"',
              partition='kind = "iid"\nnum_clients = 3', model='name = "byo_models:block_mlp"\nparams = { hidden = 64 }',
              overrides=()):
    text = BASE.format(rounds="" if rounds is None else f"rounds = {rounds}", data=data, partition=partition, model=model, strategy=strategy)
    return scenario_config(text, tmp_path, *overrides)


def _run(config, out):
    from fedsim.engine.runner import run_scenario
    from fedsim.preflight import preflight

    preflight(config)
    return run_scenario(config, out, show_progress=False)


def _validate(tmp_path, capsys, text: str) -> tuple[int, str]:
    from fedsim.cli import main

    path = tmp_path / "v.toml"
    path.write_text(text)
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------- models
def test_factory_model_trained_by_fedavg_and_recorded(tmp_path, model_pkg):
    config = _scenario(tmp_path)
    summary = _run(config, tmp_path / "fedavg")
    assert summary["final_accuracy"] >= 0.85, summary
    recorded = json.loads((tmp_path / "fedavg" / "config.json").read_text())["config"]["model"]
    assert recorded["name"] == "byo_models:block_mlp" and recorded["params"] == {"hidden": 64}


def test_factory_model_trained_by_fusefl(tmp_path, model_pkg):
    config = _scenario(tmp_path, strategy="fusefl", rounds=None, overrides=["strategy.stages=3", "client.epochs=6"])
    summary = _run(config, tmp_path / "fusefl")
    assert summary["final_accuracy"] >= 0.75, summary


def test_the_block_form_follows_the_factory_and_lacking_it_is_named(tmp_path, model_pkg):
    from fedsim.nn.models import BlockNet
    from fedsim.scenario import scenario_model

    fedavg = _scenario(tmp_path)
    assert not isinstance(scenario_model(fedavg, 10, (1, 8, 8)), BlockNet)  # FedAvg: the module as it is
    fusefl = _scenario(tmp_path, strategy="fusefl", rounds=None, overrides=["strategy.stages=3"])
    net = scenario_model(fusefl, 10, (1, 8, 8))
    assert isinstance(net, BlockNet) and net.num_blocks == 3 and net.feature_dim == 64
    assert net.group_blocks(3) == [(0, 1), (1, 2), (2, 3)]
    plain = _scenario(tmp_path, strategy="fusefl", rounds=None, model='name = "byo_models:plain"')
    with pytest.raises(ConfigError, match=r"^model\.name: 'byo_models:plain' returned Sequential, which lacks "
                                          r"`blocks` and `head`; FuseFL \(strategy.stages = 2\) needs"):
        scenario_model(plain, 10, (1, 8, 8))
    too_few = _scenario(tmp_path, strategy="fusefl", rounds=None, overrides=["strategy.stages=4"])
    with pytest.raises(ConfigError, match=r"^model\.name: .* with 3 blocks; FuseFL \(strategy.stages = 4\)"):
        scenario_model(too_few, 10, (1, 8, 8))


def test_factory_errors_are_field_named_at_validate(tmp_path, capsys, model_pkg):
    def text(model, strategy="fedavg"):
        return BASE.format(rounds="rounds = 1" if strategy == "fedavg" else "", data='name = "digits"',
                           partition='kind = "iid"\nnum_clients = 2', model=model, strategy=strategy)

    code, err = _validate(tmp_path, capsys, text('name = "byo_models:block_mlp"'))
    assert code == 0, err
    code, err = _validate(tmp_path, capsys, text('name = "nowhere.mod:make"'))
    assert code == 2 and "error: model.name: 'nowhere.mod:make' could not be imported: ModuleNotFoundError" in err
    code, err = _validate(tmp_path, capsys, text('name = "byo_models:missing"'))
    assert code == 2 and "error: model.name: 'byo_models:missing' could not be imported: AttributeError" in err
    code, err = _validate(tmp_path, capsys, text('name = "byo_models:not_a_module"'))
    assert code == 2 and "error: model.name: 'byo_models:not_a_module' returned str, not a torch.nn.Module" in err
    code, err = _validate(tmp_path, capsys, text('name = "byo_models:plain"', strategy="fusefl"))
    assert code == 2 and "error: model.name: 'byo_models:plain' returned Sequential, which lacks" in err, err
    code, err = _validate(tmp_path, capsys, text('name = "byo_models:block_mlp"\nparams = { hiden = 3 }'))
    assert code == 2 and "error: model.name: 'byo_models:block_mlp' failed to build" in err and "hiden" in err
    code, err = _validate(tmp_path, capsys, text('name = "transformer"'))
    assert code == 2 and "error: model.name: 'transformer' is not allowed" in err and "package.module:function" in err
    code, err = _validate(tmp_path, capsys, text('name = "cnn"\nparams = { a = 1 }'))
    assert code == 2 and "error: model.params:" in err


def test_factory_from_a_file_path(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(textwrap.dedent(MODEL_FILE))
    text = BASE.format(rounds="rounds = 1", data='name = "digits"\nmax_train = 200\nmax_test = 100',
                       partition='kind = "iid"\nnum_clients = 2', strategy="fedavg",
                       model=f'name = "{tmp_path / "mine.py"}:block_mlp"')
    code, err = _validate(tmp_path, capsys, text)
    assert code == 0, err
    config = scenario_config(text, tmp_path)
    assert _run(config, tmp_path / "run")["final_accuracy"] > 0.1


# ----------------------------------------------------------------------------------------------- npz
def _digits_npz(path, *, groups=True, **extra):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1400], order[1400:]
    arrays = dict(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])
    if groups:
        arrays["groups_train"] = np.array([f"w{i % 7}" for i in range(len(train))])
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


def test_npz_dataset_run_and_natural_partition(tmp_path):
    from fedsim.scenario import partition_for, train_split

    arrays = _digits_npz(tmp_path / "digits.npz")
    data = f'name = "npz"\npath = "{tmp_path / "digits.npz"}"'
    config = _scenario(tmp_path, data=data, partition='kind = "natural"\nby = "groups"\nnum_clients = 7',
                       model='name = "cnn"\nwidth = 16')
    train = train_split(config)
    assert train.input_shape == (1, 8, 8) and len(train) == 1400 and train.num_classes == 10
    np.testing.assert_array_equal(train.labels, arrays["y_train"])
    parts = partition_for(config)
    groups = arrays["groups_train"]
    assert len(parts) == 7
    for k, value in enumerate(sorted(set(groups))):
        np.testing.assert_array_equal(parts[k], np.flatnonzero(groups == value))
    summary = _run(config, tmp_path / "npz")
    assert summary["final_accuracy"] >= 0.85, summary


@pytest.mark.parametrize("change, fragment", [
    (dict(drop="y_test"), "lacks y_test"),
    (dict(y_train=np.zeros((1400, 2), dtype=np.int64)), "y_train has shape (1400, 2)"),
    (dict(y_train=np.full(1400, -1)), "negative label -1"),
    (dict(y_train=np.zeros(1400, dtype=np.float32)), "y_train has dtype float32"),
    (dict(x_test=np.zeros((397, 1, 9, 9), dtype=np.float32)), "x_train holds inputs of shape (1, 8, 8) but x_test"),
    (dict(groups_train=np.zeros(3)), "groups_train is float64 of shape (3,)"),
])
def test_npz_problems_are_field_named(tmp_path, change, fragment):
    from fedsim.data import clear_cache, describe_dataset, load_dataset

    arrays = _digits_npz(tmp_path / "a.npz")
    drop = change.pop("drop", None)
    arrays.update(change)
    if drop:
        del arrays[drop]
    np.savez(tmp_path / "b.npz", **arrays)
    clear_cache()
    for read in (describe_dataset, load_dataset):
        with pytest.raises(ConfigError) as err:
            read("npz", split="train", path=str(tmp_path / "b.npz"))
        assert str(err.value).startswith("data.path: ") and fragment in str(err.value), str(err.value)


def test_npz_refuses_object_arrays_and_missing_files(tmp_path):
    from fedsim.data import load_dataset

    arrays = _digits_npz(tmp_path / "a.npz", groups=False)
    arrays["classes"] = np.array([object()] * 10, dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(ConfigError, match=r"^data\.path: classes .* object array"):
        load_dataset("npz", path=str(tmp_path / "obj.npz"))
    with pytest.raises(ConfigError, match=r"^data\.path: .* is not a file"):
        load_dataset("npz", path=str(tmp_path / "none.npz"))
    with pytest.raises(ConfigError, match=r"^data\.path: dataset 'npz' needs data\.path"):
        scenario_config('[data]\nname = "npz"\n[strategy]\nname = "fedavg"\n', tmp_path)


def test_npz_layouts_and_string_labels(tmp_path):
    from fedsim.data import load_dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 6, 5, 3), dtype=np.uint8)  # channels last
    labels = np.array(["cat", "dog", "emu"])[rng.integers(0, 3, 30)]
    np.savez(tmp_path / "c.npz", x_train=x[:20], y_train=labels[:20], x_test=x[20:], y_test=labels[20:])
    d = load_dataset("npz", path=str(tmp_path / "c.npz"))
    assert d.input_shape == (3, 6, 5) and d.classes == ["cat", "dog", "emu"]
    np.testing.assert_allclose(d.x[0].numpy(), x[0].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert [d.classes[i] for i in d.labels] == labels[:20].tolist()


# -------------------------------------------------------------------------------------- Hugging Face
def _saved_hf(tmp_path, n_train=120, n_test=40):
    from datasets import ClassLabel, Dataset, DatasetDict

    rng = np.random.default_rng(1)

    def split(n, offset):
        y = rng.integers(0, 4, n)
        x = (rng.random((n, 1, 6, 6)) * 0.2 + y[:, None, None, None] * 0.2).astype(np.float32)
        return Dataset.from_dict({"img": x.tolist(), "label": y.tolist(),
                                  "writer": [f"writer-{(i * 7 + offset) % 5}" for i in range(n)]}
                                 ).cast_column("label", ClassLabel(names=["a", "b", "c", "d"]))

    train, test = split(n_train, 0), split(n_test, 3)
    DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hfdata"))
    return np.array(train["writer"]), np.array(train["label"])


def test_saved_hf_dataset_partitioned_naturally(tmp_path):
    from fedsim.preflight import preflight
    from fedsim.scenario import partition_for, train_split

    writers, labels = _saved_hf(tmp_path)
    data = f'name = "hf"\npath = "{tmp_path / "hfdata"}"'
    config = _scenario(tmp_path, data=data, partition='kind = "natural"\nby = "writer"\nnum_clients = 5',
                       model='name = "cnn"\nwidth = 8', rounds=5, overrides=["client.batch_size=8"])
    preflight(config)
    train = train_split(config)
    assert train.input_shape == (1, 6, 6) and train.classes == ["a", "b", "c", "d"] and len(train) == 120
    np.testing.assert_array_equal(train.labels, labels)
    parts = partition_for(config)
    distinct = sorted(set(writers))
    assert len(parts) == len(distinct) == 5
    for k, w in enumerate(distinct):
        np.testing.assert_array_equal(parts[k], np.flatnonzero(writers == w))  # exactly its writer's rows
    wrong = _scenario(tmp_path, data=data, partition='kind = "natural"\nby = "writer"\nnum_clients = 4')
    with pytest.raises(ConfigError, match=r"^partition\.num_clients: 4, .* has 5; set partition\.num_clients = 5"):
        preflight(wrong)
    missing = _scenario(tmp_path, data=data, partition='kind = "natural"\nby = "author"\nnum_clients = 5')
    with pytest.raises(ConfigError, match=r"^partition\.by: 'author' is not a column .* writer"):
        preflight(missing)
    summary = _run(config, tmp_path / "hf")
    assert summary["final_accuracy"] > 0.5, summary


def test_hf_dataset_name_with_id_and_parquet_and_columns(tmp_path):
    from datasets import Dataset

    from fedsim.data import clear_cache, describe_dataset, load_dataset

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    Dataset.from_dict({"pixels": x.tolist(), "target": rng.integers(0, 3, 20).tolist()}).to_parquet(
        str(tmp_path / "train.parquet"))
    clear_cache()
    opts = dict(path=str(tmp_path / "train.parquet"), image_column="pixels", label_column="target",
                test_fraction=0.25)
    d = load_dataset("hf:me/tiny", split="train", **opts)
    t = load_dataset("hf:me/tiny", split="test", **opts)
    assert len(d) == 15 and len(t) == 5 and d.input_shape == (1, 4, 4)
    assert describe_dataset("hf:me/tiny", split="test", **opts).input_shape == (1, 4, 4)
    with pytest.raises(ConfigError, match=r"^data\.options\.test_split: 'test' is not a split"):
        load_dataset("hf", split="test", path=str(tmp_path / "train.parquet"), image_column="pixels",
                     label_column="target")
    with pytest.raises(ConfigError, match=r"^data\.options\.image_column: none of image, img"):
        load_dataset("hf", split="train", path=str(tmp_path / "train.parquet"), test_fraction=0.2)
    config = scenario_config('[data]\nname = "hf:me/tiny"\n[strategy]\nname = "fedavg"\n', tmp_path)
    assert config.data.name == "hf:me/tiny"


# ------------------------------------------------------------------------------------ natural partition
def test_natural_partition_equals_flwr_natural_id_partitioner():
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    from fedsim.data.partition import partition_indices

    rng = np.random.default_rng(0)
    groups = rng.choice(np.array(["u3", "u1", "u10", "u2"]), 200)
    labels = rng.integers(0, 5, 200)
    ours = partition_indices(labels, "natural", 4, seed=0, groups=groups)
    p = NaturalIdPartitioner(partition_by="g")
    p.dataset = Dataset.from_dict({"g": groups.tolist(), "idx": list(range(200))})
    theirs = [np.asarray(p.load_partition(i)["idx"]) for i in range(p.num_partitions)]
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, np.sort(b))
    with pytest.raises(ConfigError, match=r"^partition\.num_clients: 3"):
        partition_indices(labels, "natural", 3, seed=0, groups=groups)


def test_natural_partition_config_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"^partition\.by: the natural partition needs"):
        scenario_config('[partition]\nkind = "natural"\n[strategy]\nname = "fedavg"\n', tmp_path)
    with pytest.raises(ConfigError, match=r"^partition\.by: 'w' is read by the natural partition only"):
        scenario_config('[partition]\nkind = "iid"\nby = "w"\n[strategy]\nname = "fedavg"\n', tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.path: .* is for data\.name = \"npz\""):
        scenario_config('[data]\nname = "digits"\npath = "x.npz"\n[strategy]\nname = "fedavg"\n', tmp_path)


# ------------------------------------------------------------------------------------------ Ray workers
@pytest.mark.slow
def test_factory_model_on_ray_workers(tmp_path, model_pkg):
    """Ray workers import the factory's module too: PYTHONPATH (set by the fixture) reaches them."""
    config = _scenario(tmp_path, rounds=2, overrides=['simulation.backend="ray"', "simulation.num_cpus=1"])
    summary = _run(config, tmp_path / "ray")
    assert summary["final_accuracy"] >= 0.8, summary


# ------------------------------------------------------------------------------------ validate stays light
@pytest.mark.parametrize("kind", ["npz", "hf"])
def test_validate_of_npz_and_hf_scenarios_imports_no_torch(tmp_path, kind):
    """Built-in model + data of one's own: `fedsim validate` reads headers, labels and columns without torch."""
    import subprocess

    from test_validate_light import HEAVY, PROBE, ROOT

    if kind == "npz":
        _digits_npz(tmp_path / "d.npz")
        data, partition = f'name = "npz"\npath = "{tmp_path / "d.npz"}"', 'kind = "natural"\nby = "groups"\nnum_clients = 7'
    else:
        _saved_hf(tmp_path)
        data, partition = f'name = "hf"\npath = "{tmp_path / "hfdata"}"', 'kind = "natural"\nby = "writer"\nnum_clients = 5'
    path = tmp_path / "s.toml"
    path.write_text(BASE.format(rounds="rounds = 1", data=data, partition=partition, model='name = "cnn"\nwidth = 8',
                                strategy="fedavg"))
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), "validate", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["0"], (out.stdout, out.stderr[-2000:])


def test_a_plugin_registers_a_dataset(tmp_path):
    from fedsim import catalog
    from fedsim.data import DATASETS, SplitArrays, describe_dataset, load_dataset, register_dataset

    def loader(split, root, n=30):
        rng = np.random.default_rng(0 if split == "train" else 1)
        return SplitArrays(rng.random((n, 1, 4, 4), dtype=np.float32), rng.integers(0, 3, n), ["a", "b", "c"],
                           f"generated {split}")

    try:
        register_dataset("tiny-plugin-data", loader, "three classes of noise", options={"n": 30})
        assert list(DATASETS) == list(catalog.DATASETS)
        config = scenario_config('[data]\nname = "tiny-plugin-data"\noptions = { n = 12 }\n'
                                 '[strategy]\nname = "fedavg"\n', tmp_path)
        assert config.data.name == "tiny-plugin-data"
        assert len(load_dataset("tiny-plugin-data", n=12)) == 12
        assert describe_dataset("tiny-plugin-data", split="test").input_shape == (1, 4, 4)
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("tiny-plugin-data", loader, "again")
    finally:
        DATASETS.pop("tiny-plugin-data", None)
        catalog.DATASETS.pop("tiny-plugin-data", None)


# ----------------------------------------------------------------------------- natural: a seeded subset
def test_natural_partition_keeps_a_seeded_sample_of_the_groups(tmp_path):
    from fedsim.data.partition import partition_indices
    from fedsim.preflight import preflight
    from fedsim.scenario import partition_for

    groups = np.repeat(np.array([f"u{i:02d}" for i in range(12)]), 5)[::-1].copy()
    labels = np.arange(60) % 3
    full = partition_indices(labels, "natural", 12, seed=0, groups=groups)
    kept = partition_indices(labels, "natural", 4, seed=7, groups=groups, sample_groups=True)
    assert len(kept) == 4
    chosen = [next(k for k, part in enumerate(full) if np.array_equal(part, p)) for p in kept]
    assert chosen == sorted(chosen) and len(set(chosen)) == 4  # whole groups, in sorted order
    expected = np.sort(np.random.default_rng(np.random.SeedSequence([7, 0x6A7C])).choice(12, 4, replace=False))
    assert chosen == expected.tolist()  # the documented draw
    again = partition_indices(labels, "natural", 4, seed=7, groups=groups, sample_groups=True)
    assert all(np.array_equal(a, b) for a, b in zip(kept, again))
    other = partition_indices(labels, "natural", 4, seed=8, groups=groups, sample_groups=True)
    assert any(not np.array_equal(a, b) for a, b in zip(kept, other))
    every = partition_indices(labels, "natural", 12, seed=3, groups=groups, sample_groups=True)
    assert all(np.array_equal(a, b) for a, b in zip(every, full))  # all of them: the full partition
    with pytest.raises(ConfigError, match=r"^partition\.num_clients: 13 clients, but partition\.by has only 12 "
                                          r"distinct values .* at most 12"):
        partition_indices(labels, "natural", 13, seed=0, groups=groups, sample_groups=True)
    with pytest.raises(ConfigError, match=r"partition\.num_clients = 12, or keep a seeded sample of 4 of them with "
                                          r"partition\.sample_groups = true"):
        partition_indices(labels, "natural", 4, seed=0, groups=groups)
    # through a scenario: the saved HF dataset's 5 writers, 3 of them kept
    writers, _ = _saved_hf(tmp_path)
    data = f'name = "hf"\npath = "{tmp_path / "hfdata"}"'
    config = _scenario(tmp_path, data=data, model='name = "cnn"\nwidth = 8',
                       partition='kind = "natural"\nby = "writer"\nnum_clients = 3\nsample_groups = true')
    preflight(config)
    parts = partition_for(config)
    assert len(parts) == 3 and all(len(set(writers[p])) == 1 for p in parts)
    assert len({writers[p][0] for p in parts}) == 3 and sum(map(len, parts)) < len(writers)
    too_many = _scenario(tmp_path, data=data, model='name = "cnn"\nwidth = 8',
                         partition='kind = "natural"\nby = "writer"\nnum_clients = 6\nsample_groups = true')
    with pytest.raises(ConfigError, match=r"^partition\.num_clients: 6 clients, but partition\.by has only 5"):
        preflight(too_many)
    with pytest.raises(ConfigError, match=r"^partition\.sample_groups: only the natural partition samples"):
        scenario_config('[partition]\nkind = "iid"\nsample_groups = true\n[strategy]\nname = "fedavg"\n', tmp_path)


# ------------------------------------------------------------------------ partitions a plugin registers
PARTITION_PLUGIN = '''
"""A partition of one's own: contiguous blocks of the label-sorted samples (each client a few classes)."""
import numpy as np

from fedsim.data import register_partition


def sorted_blocks(labels, num_clients, seed, reverse=False):
    order = np.argsort(labels, kind="stable")
    return np.array_split(order[::-1] if reverse else order, num_clients)


def broken(labels, num_clients, seed):
    return [np.arange(len(labels))] * num_clients  # every client holds everything


register_partition("sorted-blocks", sorted_blocks, "contiguous blocks of the label-sorted samples")
register_partition("overlapping", broken, "every client holds every sample (wrong on purpose)")
'''


@pytest.fixture
def partition_plugin(tmp_path, monkeypatch):
    """The plugin file above, in a directory outside the repository; registrations undone afterwards."""
    from fedsim import catalog
    from fedsim.data.partition import PARTITIONERS

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    path = folder / "byo_partition_plugin.py"
    path.write_text(PARTITION_PLUGIN)
    monkeypatch.delenv("FEDSIM_PLUGINS", raising=False)  # load_plugin records it there; restored after
    yield path
    for name in ("sorted-blocks", "overlapping"):
        PARTITIONERS.pop(name, None)
        catalog.PARTITIONS.pop(name, None)
    sys.modules.pop("byo_partition_plugin", None)


def test_a_plugin_registers_a_partition(tmp_path, capsys, partition_plugin):
    from fedsim.data import register_partition
    from fedsim.data.partition import partition_indices
    from fedsim.registry import load_plugin
    from fedsim.scenario import partition_for, train_split

    text = BASE.format(rounds="rounds = 1", data='name = "digits"', strategy="fedavg", model='name = "mlp"\nwidth = 8',
                       partition='kind = "sorted-blocks"\nnum_clients = 5\nparams = { reverse = true }')
    code, err = _validate(tmp_path, capsys, text)  # before the plugin is loaded the name is unknown
    assert code == 2 and "partition.kind: 'sorted-blocks' is not allowed; choose one of 'iid'" in err
    load_plugin(partition_plugin)
    code, err = _validate(tmp_path, capsys, text)
    assert code == 0, err
    config = scenario_config(text, tmp_path)
    labels = train_split(config).labels
    parts = partition_for(config)
    order = np.argsort(labels, kind="stable")[::-1]
    for got, want in zip(parts, np.array_split(order, 5)):
        np.testing.assert_array_equal(got, np.sort(want))  # sorted, exactly the plugin's blocks
    assert len(set(labels[parts[0]])) <= 3  # label-sorted: 287 samples span at most 3 of the ~144-sample classes
    code, err = _validate(tmp_path, capsys, text.replace("reverse = true", "mirror = true"))
    assert code == 2 and "partition.kind: 'sorted-blocks' (a plugin's partition, byo_partition_plugin) cannot be " \
        "called with partition.params {'mirror': True}" in err
    code, err = _validate(tmp_path, capsys, text.replace('"sorted-blocks"', '"overlapping"').replace(
        "params = { reverse = true }", ""))
    assert code == 2 and "client 1 holds a sample twice or one another client holds; the parts must be disjoint" in err
    code, err = _validate(tmp_path, capsys, text.replace('"sorted-blocks"', '"iid"'))
    assert code == 2 and "partition.params: {'reverse': True} is passed to a plugin's partition only" in err
    with pytest.raises(ValueError, match="partition 'dirichlet' is already registered"):
        register_partition("dirichlet", lambda labels, num_clients, seed: [], "again")
    with pytest.raises(ConfigError, match=r"must return a list of partition\.num_clients = 3 index arrays, got 5"):
        from fedsim.data.partition import PARTITIONERS

        PARTITIONERS["sorted-blocks"] = lambda labels, num_clients, seed: [np.arange(1)] * 5
        partition_indices(labels, "sorted-blocks", 3, seed=0)


def test_a_plugin_partition_in_a_fresh_process(tmp_path, partition_plugin):
    """`fedsim validate --plugin FILE` from another directory (torch-free): the plugin is imported before
    partition.kind is checked, and validate runs its function on the training labels."""
    import subprocess

    from conftest import subprocess_env

    scenario = tmp_path / "blocks.toml"
    text = BASE.format(rounds="rounds = 1", data='name = "digits"', strategy="fedavg", model='name = "mlp"\nwidth = 8',
                       partition='kind = "{kind}"\nnum_clients = 4')
    env = subprocess_env(tmp_path, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("FEDSIM_PLUGINS", None)
    outs = {}
    for kind in ("sorted-blocks", "overlapping"):
        scenario.write_text(text.replace("{kind}", kind))
        outs[kind] = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(scenario), "--plugin",
                                     str(partition_plugin)], capture_output=True, text=True, env=env, cwd=tmp_path,
                                    timeout=300)
    assert outs["sorted-blocks"].returncode == 0, outs["sorted-blocks"].stderr[-3000:]
    assert outs["overlapping"].returncode == 2 and "the parts must be disjoint" in outs["overlapping"].stderr


# --------------------------------------------------------------------- HF images of different sizes
@pytest.mark.parametrize("form", ["pil", "lists"])
def test_hf_images_of_different_sizes_are_refused_at_validate(tmp_path, form):
    """A column of Image (PIL) or of nested lists whose rows differ in size: fedsim validate and loading both say
    which column of which data, and the first row that differs, reading headers and list lengths only."""
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature
    from PIL import Image

    from fedsim.data import clear_cache, describe_dataset, load_dataset
    from fedsim.preflight import preflight

    rng = np.random.default_rng(0)
    if form == "pil":
        images = [Image.fromarray(rng.integers(0, 255, (7 if i == 5 else 6, 6), dtype=np.uint8)) for i in range(12)]
        train = Dataset.from_dict({"image": images, "label": [i % 3 for i in range(12)]}).cast_column(
            "image", ImageFeature())
        column, first, odd = "image", "1x6x6", "row 5 is 1x7x6 (rows unlike row 0: 1)"
    else:
        images = [rng.random((1, 5 if i == 5 else 4, 4)).tolist() for i in range(12)]
        images[9][0][2] = images[9][0][2][:3]  # one row of its own is shorter: ragged
        train = Dataset.from_dict({"img": images, "label": [i % 3 for i in range(12)]})
        column, first, odd = "img", "1x4x4", "row 5 is 1x5x4 (rows unlike row 0: 2)"
    DatasetDict({"train": train, "test": train.select(range(4))}).save_to_disk(str(tmp_path / "ragged"))
    path = str(tmp_path / "ragged")
    message = (rf"^data\.options\.image_column: '{column}' of data\.path '{path}' \(train\) holds inputs of different "
               rf"sizes: row 0 is {first}, {re.escape(odd)}; fedsim stacks a split into one array, so resize them")
    clear_cache()
    with pytest.raises(ConfigError, match=message):
        describe_dataset("hf", split="train", path=path)
    with pytest.raises(ConfigError, match=message):
        load_dataset("hf", split="train", path=path)
    config = _scenario(tmp_path, data=f'name = "hf"\npath = "{path}"', model='name = "cnn"\nwidth = 8')
    with pytest.raises(ConfigError, match=message):
        preflight(config)
    if form == "lists":
        clear_cache()
        describe_dataset("hf", split="test", path=path)  # the first four rows are alike: that split is fine
