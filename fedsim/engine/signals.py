"""SIGINT and SIGTERM during a run: the run's files say "interrupted", and the process leaves promptly.

Inside ``signals_interrupt_runs()`` (what ``fedsim run`` uses), SIGINT and SIGTERM end a run the same way. The
handler asks every run in progress (``register_run``) to write its summary.json with ``status = "interrupted"``
at once (the finished rows of metrics.csv stay) and to stop the server loop at its next message. With a local Ray
node it then stops that node and every process below it and exits with 128 + the signal number (130, 143);
otherwise (inline, a joined cluster) it raises ``Interrupted`` in the main thread, which unwinds the run to the
same exit status. A second signal exits at once (the files are already written).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from fedsim.engine.processes import hard_exit
from fedsim.engine.ray_session import teardown_local_ray

__all__ = ["HANDLED_SIGNALS", "Interrupted", "Interruptible", "install_signal_handlers", "interrupt_message",
           "register_run", "signals_interrupt_runs", "unregister_run"]

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run; ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interruptible(Protocol):
    """A run in progress as the signal handler sees it."""

    def interrupt(self, signum: int) -> None:
        """Stop the server loop and write the summary now (called from the signal handler)."""


_ACTIVE_RUNS: list[Interruptible] = []  # the runs in progress in this process
_SIGNALLED: list[int] = []  # the signal being handled (at most one)
_handlers_installed = [False]  # inside signals_interrupt_runs()


def register_run(run: Interruptible) -> None:
    """``run`` is in progress: a signal interrupts it."""
    _ACTIVE_RUNS.append(run)


def unregister_run(run: Interruptible) -> None:
    """``run`` has ended (its own summary is written next)."""
    _ACTIVE_RUNS.remove(run)


def interrupt_message(code: int) -> str:
    """What ``fedsim run`` prints when a signal ended it (exit status ``code``)."""
    name = {130: "interrupted (SIGINT)", 143: "terminated (SIGTERM)"}.get(code, "interrupted")
    return f"{name}: the run directory keeps what was written so far (summary.json: status interrupted)"


def _on_signal(signum: int, frame: Any) -> None:
    if _SIGNALLED:  # a second signal while the first is handled: the run files are written already
        hard_exit(128 + _SIGNALLED[0])
    _SIGNALLED.append(signum)
    for run in list(_ACTIVE_RUNS):
        run.interrupt(signum)
    if _ACTIVE_RUNS and teardown_local_ray():
        # The summary is written and Ray's processes are gone: leave now. Going through Flower's and Ray's own
        # shutdown took 2-8 s after SIGINT on a busy machine, and after a SIGTERM to the process group (timeout,
        # Slurm), which kills the raylet first, Ray's shutdown waits ~8 s on it.
        print(interrupt_message(128 + signum), file=sys.stderr)
        hard_exit(128 + signum)
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """(Re)install fedsim's handlers, inside ``signals_interrupt_runs`` only (``ray.init`` replaces them)."""
    if _handlers_installed[0] and threading.current_thread() is threading.main_thread():
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def signals_interrupt_runs() -> Iterator[None]:
    """Within: SIGINT and SIGTERM interrupt the running scenario (see the module docstring). Main thread only;
    elsewhere (and nested) it changes nothing."""
    if threading.current_thread() is not threading.main_thread() or _handlers_installed[0]:
        yield
        return
    _SIGNALLED.clear()
    previous = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    _handlers_installed[0] = True
    try:
        install_signal_handlers()
        yield
    finally:
        _handlers_installed[0] = False
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _SIGNALLED.clear()
