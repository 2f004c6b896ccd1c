"""The process tree of this process: who descends from whom, who is alive, and leaving at once; and making the
processes fedsim starts die with it.

Every piece of fedsim that starts processes (the private Ray, ``fedsim deploy``'s federation) finds and stops
them through these functions, so there is one reading of ``/proc``.

Dying with fedsim, even on ``kill -9`` (Linux):

- ``die_with_parent()`` is a ``preexec_fn`` that asks the kernel to SIGKILL the child when its parent goes
  (``prctl(PR_SET_PDEATHSIG)``). It reaches direct children only, and "parent" is the *thread* that forked
  (``man 2 prctl``): start such children from a thread that lives as long as they should (the main thread).
- ``Watchdog`` covers what PDEATHSIG does not: the grandchildren (Flower's SuperExec, ServerApp and ClientApp
  processes start new sessions and are re-parented to init when their parent dies). It is a small process of its
  own (stdlib only: this file run as a script) that holds the read end of a pipe whose write end only this
  process has; when this process ends, however it ends, the pipe reads EOF and the watchdog SIGKILLs every
  process that carries its token in its environment (``watchdog.env``, inherited by everything below) and every
  descendant it saw below the PIDs it was told to watch. The same sweep runs on a normal ``close()``, so a
  process started in a window the bookkeeping missed is found too.

This module imports nothing outside the standard library at the top (the watchdog runs it as a script).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator


def hard_exit(code: int) -> None:
    """Flush stdout/stderr and leave now, without running atexit handlers or joining threads."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_after_handlers() -> bool:
    """When this interpreter exits, run every exit handler (``atexit``: Ray's disconnect, logging's flush,
    ``weakref.finalize`` and multiprocessing's clean-up of its children), flush stdout/stderr, then leave with
    status 0 without the interpreter's teardown, as multiprocessing's own child processes do
    (``os._exit`` after their finalizers). With torch loaded, the teardown (every module and object freed one by
    one) costs ~1.5 CPU-s per process and does nothing a finished Ray actor needs (issue #26). Only for a
    process that is leaving normally: the status of an exit already under way is not kept. False where this
    Python cannot run its handlers early (no ``atexit._run_exitfuncs``): the exit stays the normal one."""
    import atexit

    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None:
        return False

    def leave() -> None:  # registered last, so it runs first, and runs the others itself
        atexit.unregister(leave)
        run_handlers()
        hard_exit(0)

    atexit.register(leave)
    return True


def descendants(root: int) -> list[int]:
    """Every live descendant process of ``root`` (Linux ``/proc``; [] elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no procfs
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != b"Z":
            children.setdefault(int(stat[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def signal_alive(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every PID of ``pids`` that is still alive (one that went in between is no error)."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


def wait_gone(pids: Iterable[int], seconds: float, poll: float = 0.05) -> list[int]:
    """Wait up to ``seconds`` until none of ``pids`` is alive; the ones still alive then."""
    pids = list(pids)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(poll)
    return [pid for pid in pids if alive(pid)]


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; tells a PID from a later reuse), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def with_env(key: str, value: str) -> list[int]:
    """Live PIDs (this user's: others' environments are unreadable) whose initial environment holds
    ``key=value``, this process excluded."""
    needle = f"{key}={value}".encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no procfs
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        if needle in environ.split(b"\0") and alive(int(entry)):
            found.append(int(entry))
    return found


# ------------------------------------------------------------------------------------------ dying with fedsim
_PR_SET_PDEATHSIG = 1
_prctl: list = []  # libc's prctl, loaded once in the parent (a forked child should not load libraries)


def _load_prctl() -> Callable[..., int] | None:
    if not _prctl:
        fn = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).prctl
        _prctl.append(fn)
    return _prctl[0]


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when the thread that started it ends (its
    parent dies; see the module docstring for the thread caveat), and exits at once if the parent was gone before
    the request took effect. It also unblocks every signal (a child inherits the parent's signal mask). On systems
    without ``prctl`` it only does the latter."""
    parent = os.getpid()
    prctl = _load_prctl()

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            if os.getppid() != parent:  # the parent died between fork and prctl: nobody would signal us
                os._exit(1)

    return preexec


@contextlib.contextmanager
def deferred_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within: SIGINT/SIGTERM are noted instead of handled; on leaving, the handlers are put back and the first
    noted signal is raised again, so its handler (an interrupt) runs after the block, not in the middle of
    starting a process and recording it, or of stopping them. Main thread only (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {}
    for sig in signals:
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if noted:
            signal.raise_signal(noted[0])


class Watchdog:
    """A process that kills what this process started once this process is gone (see the module docstring).

    ``env`` holds the token (``TOKEN_ENV=<hex>``): give it to every process to cover, and they and everything they
    start are killed by the sweep. ``watch(pid)`` adds a root whose descendants the watchdog collects every
    ``interval`` seconds (for processes that dropped the environment). ``close()`` sweeps now and waits for it."""

    TOKEN_ENV = "FEDSIM_WATCHDOG_TOKEN"

    def __init__(self, interval: float = 0.5) -> None:
        self.token = secrets.token_hex(16)
        self.env = {self.TOKEN_ENV: self.token}
        env = {k: v for k, v in os.environ.items() if k != self.TOKEN_ENV}
        # -I: no PYTHON* variables, no script or user site directory on sys.path: the standard library only
        self.proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--watchdog", self.token, str(float(interval))],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)  # its own session: a Ctrl-C or kill of this process group does not reach it

    @property
    def pid(self) -> int:
        return self.proc.pid

    def watch(self, pid: int) -> None:
        """Collect ``pid``'s descendants from now on, and kill them and it in the sweep."""
        self._send(str(int(pid)))

    def remove_after(self, path: str | os.PathLike) -> None:
        """Delete the directory ``path`` after the sweep (what a killed process could not clean up)."""
        self._send("rm " + os.fsdecode(os.path.abspath(path)))

    def _send(self, line: str) -> None:
        if "\n" in line:
            raise ValueError(f"watchdog: a newline in {line!r}")
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def close(self, timeout: float = 30.0) -> bool:
        """Sweep now (every process with the token, every descendant seen below the watched PIDs) and wait up to
        ``timeout`` seconds for the watchdog to finish; True if it did."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def _watchdog_main(token: str, interval: float) -> None:
    """The watchdog process: collect below the watched roots until stdin reads EOF, then kill (see Watchdog)."""
    import select
    import shutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe ends it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    roots: set[int] = set()
    remove: list[str] = []
    seen: dict[int, int] = {}  # pid -> start time
    buffer = b""
    fd = sys.stdin.fileno()

    def collect() -> None:
        for root in roots:
            for pid in [root, *descendants(root)]:
                if pid not in seen and (started := start_time(pid)) is not None:
                    seen[pid] = started

    while True:
        ready, _, _ = select.select([fd], [], [], interval)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="surrogateescape")
                if text.isdigit():
                    roots.add(int(text))
                elif text.startswith("rm "):
                    remove.append(text[3:])
        collect()

    collect()
    quiet = 0
    while quiet < 3:  # until three sweeps in a row find nothing (a killed process may have just started one)
        targets = {pid for pid, started in seen.items() if start_time(pid) == started}
        targets.update(with_env(Watchdog.TOKEN_ENV, token))
        for pid in list(targets):
            targets.update(descendants(pid))
        targets.discard(os.getpid())
        targets = {pid for pid in targets if alive(pid)}
        for pid in targets:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        quiet = 0 if targets else quiet + 1
        time.sleep(0.05)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    _watchdog_main(sys.argv[2], float(sys.argv[3]))
