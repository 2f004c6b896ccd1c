"""fedsim.nn.seeding.seeded: the numbers of ``torch.manual_seed`` on the CPU, the caller's RNG untouched, and no
accelerator backend asked to queue a seed (each such queue formats the caller's stack: ~2 ms per call in a Ray
actor, twice per client and round, issue #26)."""

from __future__ import annotations

import traceback

import pytest
import torch

from fedsim.nn.models import build_model
from fedsim.nn.seeding import seeded


def test_seeded_draws_what_manual_seed_draws_and_restores_the_callers_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded(7):
        ours = torch.rand(8)
    assert torch.equal(torch.get_rng_state(), before)  # forked: the caller's stream goes on as if nothing ran
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        reference = torch.rand(8)
    assert torch.equal(ours, reference)


def test_cpu_work_never_formats_the_callers_stack(monkeypatch):
    """torch.manual_seed on a process without CUDA initialized calls traceback.format_stack per backend; the CPU
    path must not (this fails with torch.manual_seed in place of the CPU generator)."""
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("traceback.format_stack called while seeding CPU work")

    if torch.cuda.is_initialized():  # pragma: no cover - then manual_seed seeds CUDA directly
        pytest.skip("CUDA is initialized in this process")
    monkeypatch.setattr(traceback, "format_stack", refuse)
    with seeded(3):
        torch.rand(2)
    build_model("cnn", (1, 28, 28), 10, seed=3)  # a client's fresh model, as every round builds one
