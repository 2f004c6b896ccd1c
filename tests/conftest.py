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
