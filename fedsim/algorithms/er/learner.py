"""ER's learner: a reservoir-sampled exemplar buffer (Vitter's Algorithm R) and the replay batch.

Experience Replay with a reservoir buffer (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning",
2019; the ``er`` model of Mammoth, github aimagelab/mammoth, ``models/er.py`` + ``utils/buffer.py``): a buffer of at
most M samples; the k-th sample offered (k = 1, 2, ...) enters while the buffer is not full, afterwards it replaces
a uniformly chosen slot with probability M / k, so after N offers every sample is in the buffer with probability
M / N. Each training step concatenates the current batch with a replay batch drawn from the buffer without
replacement (Mammoth's ``get_data``) and minimizes the cross-entropy over the concatenation. **It keeps exemplars**
(raw images of old classes), unlike every other class-incremental method in fedsim.

fedsim offers a task's samples to the buffer once, in a seeded order, after the task's training (the data of the
task being trained is all at hand, so replaying it adds nothing); Mammoth offers every batch of every epoch during
training, so a multi-epoch task can enter the buffer several times.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["reservoir_update"]


def reservoir_update(buffer: Any, seen: int, items: Any, capacity: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, int]:
    """Offer ``items`` in order to a reservoir of ``capacity``; returns (new buffer, new count of offers)."""
    buf = list(np.asarray(buffer, dtype=np.int64).tolist())
    seen = int(seen)
    for item in np.asarray(items, dtype=np.int64).tolist():
        seen += 1
        if len(buf) < capacity:
            buf.append(item)
        else:
            j = int(rng.integers(0, seen))
            if j < capacity:
                buf[j] = item
    return np.asarray(buf, dtype=np.int64), seen
