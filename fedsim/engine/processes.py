"""The process tree of this process: who descends from whom, who is alive, and leaving at once.

Every piece of fedsim that starts processes (the private Ray, ``fedsim deploy``'s federation) finds and stops
them through these functions, so there is one reading of ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import sys


def hard_exit(code: int) -> None:
    """Flush stdout/stderr and leave now, without running atexit handlers or joining threads."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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
