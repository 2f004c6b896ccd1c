"""Shared test set-up: one compute thread per test process, and real Fashion-MNIST slices through fedsim.data."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_compute_thread():
    """One torch and one BLAS thread: on the 2-core machine two threads under contention ran ~10x slower,
    and a fixed thread count keeps float results reproducible."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


def fmnist(split: str, n: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n`` images (float (n, 1, 28, 28) in [0, 1]) and labels of real Fashion-MNIST.

    Skips where the data is missing, except under CI (``CI`` set), where missing data is a failure.
    """
    from fedsim.data import load_dataset
    from fedsim.errors import DataUnavailableError

    try:
        data = load_dataset("fashion-mnist", split=split, download=False)
    except DataUnavailableError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    n = len(data) if n is None else n
    return data.x[:n], data.labels[:n].copy()


def assert_config_error_names(field: str, fragment: str, build) -> None:
    """``build()`` raises a ConfigError whose message starts with ``field:`` and holds ``fragment``."""
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build()
    message = str(err.value)
    assert message.startswith(field + ":") and fragment in message, message


def scenario_config(text: str, tmp_path, *overrides: str, filename: str = "scenario.toml"):
    """A scenario from TOML text, as `fedsim run FILE --set ...` would load it (written to ``tmp_path``)."""
    from fedsim.config import load_scenario

    path = tmp_path / filename
    path.write_text(text)
    return load_scenario(path, list(overrides))


# FedAvg over 6 Dirichlet(0.5) clients of the bundled digits set: small and quick (tests of the engine)
DIGITS = """
seed = 3
rounds = 2
[data]
name = "digits"
[partition]
kind = "dirichlet"
num_clients = 6
alpha = 0.5
[model]
name = "cnn"
width = 16
[client]
epochs = 3
batch_size = 32
lr = 0.05
[simulation]
backend = "inline"
[strategy]
name = "fedavg"
"""


def subprocess_env(tmp_path, **extra: str) -> dict[str, str]:
    """The environment of a fresh process: none of the quiet settings fedsim sets on import (FLWR_*, RAY_*,
    TOKENIZERS_PARALLELISM), HOME in ``tmp_path``, then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLWR_", "RAY_")) and k != "TOKENIZERS_PARALLELISM"}
    env.update(HOME=str(tmp_path), **extra)
    return env


# -- TOML pieces of the scenarios on real Fashion-MNIST slices -------------------------------------------------
ALL_ON_ONE_CLIENT = 'kind = "iid"\nnum_clients = 1'


def dirichlet(num_clients: int, alpha: float) -> str:
    """The lines of a [partition] table: a Dirichlet(``alpha``) label split over ``num_clients`` clients."""
    return f'kind = "dirichlet"\nnum_clients = {num_clients}\nalpha = {alpha}'


def fmnist_slice(max_train: int, max_test: int, partition: str = ALL_ON_ONE_CLIENT) -> str:
    """The [data] table of the first ``max_train`` training and ``max_test`` test images of Fashion-MNIST and a
    [partition] table of the lines ``partition``."""
    return f'[data]\nname = "fashion-mnist"\nmax_train = {max_train}\nmax_test = {max_test}\n[partition]\n{partition}'


def long_tail_stream(imbalance_ratio: int) -> str:
    """The [stream] and [model] tables of AEF-OCL's setting: an online stream in batches of 10, the classes in a
    long-tailed order (``imbalance_ratio``), the raw pixels as features."""
    return ('[stream]\nkind = "online"\nbatch_size = 10\nimbalance = "long-tail"\n'
            f'imbalance_ratio = {imbalance_ratio}\n[model]\nfeature_map = "identity"')


def aef_ocl_one_client(*, max_train: int, max_test: int, imbalance_ratio: int, buffer_width: int,
                       eval_every: int) -> str:
    """AEF-OCL on one client's long-tailed stream of a Fashion-MNIST slice, with the online SGD baseline's client
    settings (1 epoch, lr 0.05, no momentum), inline backend."""
    return f"""
seed = 0
{fmnist_slice(max_train, max_test)}
{long_tail_stream(imbalance_ratio)}
[client]
epochs = 1
lr = 0.05
momentum = 0.0
[simulation]
backend = "inline"
[strategy]
name = "aef-ocl"
buffer_width = {buffer_width}
eval_every = {eval_every}
"""


def fusefl_scenario(*, max_train: int, max_test: int, num_clients: int, alpha: float, width: int) -> str:
    """FuseFL over a Dirichlet(``alpha``) split of a Fashion-MNIST slice: a cnn of ``width``, 2 local epochs,
    inline backend."""
    return f"""
seed = 0
{fmnist_slice(max_train, max_test, dirichlet(num_clients, alpha))}
[model]
name = "cnn"
width = {width}
[client]
epochs = 2
batch_size = 32
lr = 0.05
[simulation]
backend = "inline"
[strategy]
name = "fusefl"
"""


# The scenario tree (no strategy yet) of the one-shot distillation tests: a width-8 cnn trained 3 epochs on each of
# 3 Dirichlet(1.0) clients of a Fashion-MNIST slice, inline backend
FMNIST_THREE_CNN_CLIENTS = {
    "seed": 0,
    "data": {"name": "fashion-mnist", "max_train": 1500, "max_test": 1000},
    "partition": {"kind": "dirichlet", "num_clients": 3, "alpha": 1.0},
    "model": {"name": "cnn", "width": 8},
    "client": {"epochs": 3, "batch_size": 32, "lr": 0.05},
    "simulation": {"backend": "inline"},
}

# AFL on 32 random features of the digits set over 3 IID clients, one round: the quickest complete run
AFL_DIGITS = """
seed = 0
rounds = 1
[data]
name = "digits"
[partition]
kind = "iid"
num_clients = 3
[model]
feature_map = "random"
feature_dim = 32
[simulation]
backend = "inline"
[strategy]
name = "afl"
"""


def inline_digits_scenario(strategy: str, clients: int = 4) -> str:
    """One round of ``strategy`` on the digits set over ``clients`` IID clients, inline: the plugin tests' scenario."""
    return f"""
seed = 0
rounds = 1
[data]
name = "digits"
[partition]
kind = "iid"
num_clients = {clients}
[simulation]
backend = "inline"
[strategy]
name = "{strategy}"
"""


# FedAvg for 2 rounds over 2 IID clients of the digits set, a width-8 cnn trained one local epoch, inline: the
# scenario of the run-file and tracking tests (tests/test_report_outputs.py, test_tracking.py, test_tensorboard.py)
DIGITS_FEDAVG_2 = inline_digits_scenario("fedavg", clients=2).replace("rounds = 1", "rounds = 2") + """\
[model]
name = "cnn"
width = 8
[client]
epochs = 1
lr = 0.05
"""
