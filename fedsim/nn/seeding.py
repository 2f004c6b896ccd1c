"""One way to seed torch for a piece of work: its global generators forked and seeded for the duration, so the
caller's random state is untouched and every process draws the same numbers from the same seed.

``torch.manual_seed`` also seeds every accelerator backend, and one that is not initialized (a CPU run of a CUDA
build: CUDA, XPU, MTIA) queues the seeding with ``traceback.format_stack()`` of the caller. At a Ray actor's stack
depth that cost ~2 ms per call, twice per client and round (its fresh model, its training; issue #26), and the
queued seed outlived the fork. Work on the CPU therefore seeds the CPU generator alone, which is all
``torch.manual_seed`` changes for it (the same numbers); work on an accelerator keeps ``torch.manual_seed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """torch's global RNG forked and seeded with ``seed`` for the duration (the GPU's too when ``device`` is one)."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cpu":
            torch.random.default_generator.manual_seed(int(seed))
        else:
            torch.manual_seed(int(seed))
        yield
