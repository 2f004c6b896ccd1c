"""Progress display for long runs: a rich progress bar plus one line per logged round, and step lines for long
server-side loops inside a round (``RunProgress.work``: steps done / total, the current loss, the time left).
Under ``flwr run`` both go through Flower's logger instead (``to_flower_log``), so ``flwr run --stream`` shows
them."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


# A child of Flower's "flwr" logger with a level of its own: its records reach Flower's handlers (the ServerApp's
# output that `flwr run --stream` and `flwr log` show) even while fedsim keeps "flwr" itself at ERROR.
FLOWER_LOG = logging.getLogger("flwr.fedsim")
FLOWER_LOG.setLevel(logging.INFO)
_TO_FLOWER = contextvars.ContextVar("fedsim_progress_to_flower", default=False)


@contextlib.contextmanager
def to_flower_log() -> Iterator[None]:
    """Within this block (the Flower app's ServerApp), every ``RunProgress`` logs its round lines at INFO on
    ``FLOWER_LOG`` instead of the terminal, even when its display is disabled."""
    token = _TO_FLOWER.set(True)
    try:
        yield
    finally:
        _TO_FLOWER.reset(token)


def _fmt_bytes(n: float) -> str:
    from fedsim.results.figures import human_bytes

    return human_bytes(n)


class RunProgress:
    """Shows rounds done / total and the latest accuracy; silent when disabled (tests, --quiet)."""

    #: seconds between two step lines of one server-side loop (its first and last steps are always shown)
    WORK_INTERVAL = 10.0

    def __init__(self, label: str, total: int, enabled: bool = True, work_interval: float | None = None) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.to_flower = _TO_FLOWER.get()  # read where the run starts (the ServerApp's thread)
        self.work_interval = self.WORK_INTERVAL if work_interval is None else float(work_interval)
        self._work: dict[str, list[float]] = {}  # name -> [start time, time of the last line]
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                console=self.console, transient=False, disable=not sys.stderr.isatty(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, status="starting")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def set_total(self, total: int) -> None:
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def update(self, row: dict) -> None:
        if not (self.enabled or self.to_flower):
            return
        acc = row.get("accuracy")
        acc_text = f"acc {acc:.4f}" if isinstance(acc, float) and not math.isnan(acc) else "acc -"
        worst = row.get("client_acc_min")
        if isinstance(worst, float) and not math.isnan(worst):
            acc_text += f" (worst client {worst:.4f})"
        status = f"{acc_text}  up {_fmt_bytes(row.get('bytes_up', 0))}  {row.get('elapsed_seconds', 0):.1f}s"
        if self.to_flower:
            FLOWER_LOG.info("[fedsim %s] round %s/%s  %s", self.label, row["round"], self.total, status)
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=min(row["round"], self.total), status=status)
        if self._progress is None or self._progress.disable:
            self.console.print(f"[{self.label}] round {row['round']}/{self.total}  {status}", highlight=False,
                               markup=False, soft_wrap=True)

    def work(self, name: str, done: int, total: int, *, loss: float | None = None, fraction: float | None = None,
             **values: float) -> str | None:
        """Report step ``done`` of ``total`` of a long server-side loop ``name`` (FedDF's distillation, DENSE's
        synthesis): the line says steps done / total, ``loss`` and ``values``, the elapsed time and an estimate of
        the time left, extrapolated from ``fraction`` (the share of the loop's cost done; default ``done / total``,
        give it where steps grow dearer). Shown at the first and last steps and at most every ``work_interval``
        seconds (a bar's status on a terminal, else one line); returns the line shown, or None."""
        if not (self.enabled or self.to_flower):
            return None
        now = time.perf_counter()
        start, last = self._work.setdefault(name, [now, -math.inf])
        if done < total and done > 1 and now - last < self.work_interval:
            return None
        self._work[name][1] = now
        if done >= total:
            self._work.pop(name)
        elapsed = now - start
        frac = done / total if fraction is None else fraction
        left = elapsed * (1.0 - frac) / frac if frac > 0 else math.nan
        parts = [f"{name} {done}/{total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts += [f"{k} {v:.4g}" for k, v in values.items()]
        parts.append(f"{_fmt_seconds(elapsed)} elapsed, ~{_fmt_seconds(left)} left" if done < total
                     else f"done in {_fmt_seconds(elapsed)}")
        status = "  ".join(parts)
        if self.to_flower:
            FLOWER_LOG.info("[fedsim %s] %s", self.label, status)
        elif self._progress is not None and not self._progress.disable:
            self._progress.update(self._task, status=status)
        else:
            self.console.print(f"[{self.label}] {status}", highlight=False, markup=False, soft_wrap=True)
        return status


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
