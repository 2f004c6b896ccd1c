"""Device profiles (compute speed, download and upload bandwidth) and availability, per client, for the clock.

Drawn from seeded log-normal distributions (the ``[system]`` section's medians and sigmas; defaults and their
sources in docs/system.md) or read from trace files:

- profiles, one row per client: ``client,speed,download_mbps,upload_mbps`` (speed in training samples per second,
  bandwidths in Mbit/s = 10^6 bit/s); every client 0..N-1 exactly once;
- availability, one row per online interval: ``client,start_s,end_s`` (seconds of simulated time, end > start >= 0,
  a client's intervals must not overlap; a client without a row is never online).

A bad file is refused with a ``ConfigError`` naming the field (``system.trace``), the file, the row and the column.
Every draw is a pure function of the scenario seed and the client id, so each process derives the same fleet.
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import ConfigError

__all__ = ["DeviceProfile", "Availability", "AlwaysOnline", "IntervalAvailability", "MarkovAvailability",
           "DeviceFleet", "build_fleet", "read_profile_trace", "read_availability_trace", "PROFILE_COLUMNS",
           "AVAILABILITY_COLUMNS", "MBIT"]

MBIT = 1e6 / 8  # bytes per second in one Mbit/s
PROFILE_COLUMNS = ("client", "speed", "download_mbps", "upload_mbps")
AVAILABILITY_COLUMNS = ("client", "start_s", "end_s")


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device: training samples per second, download and upload bandwidth in bytes per second."""

    speed: float
    download: float
    upload: float

    def seconds(self, bytes_down: int, samples: float, bytes_up: int) -> tuple[float, float, float]:
        """(download, compute, upload) seconds of one round that moves these bytes and trains on these samples."""
        return bytes_down / self.download, samples / self.speed, bytes_up / self.upload


class Availability:
    """When each client is online: ``next_online(pid, t)`` (the first time >= t it is, inf if never again) and
    ``online_until(pid, t)`` (the end of the online period holding t; t itself when it is offline at t)."""

    def next_online(self, pid: int, t: float) -> float:
        raise NotImplementedError

    def online_until(self, pid: int, t: float) -> float:
        raise NotImplementedError

    def is_online(self, pid: int, t: float) -> bool:
        return self.next_online(pid, t) == t and self.online_until(pid, t) > t

    def checkpoint_state(self) -> Any:
        """The state a round checkpoint keeps (None: the process has none beyond its construction)."""
        return None

    def restore_state(self, state: Any) -> None:
        """Back from ``checkpoint_state``."""


class AlwaysOnline(Availability):
    """Every client online at every time (``system.availability = "always"``)."""

    def next_online(self, pid: int, t: float) -> float:
        return t

    def online_until(self, pid: int, t: float) -> float:
        return math.inf


class IntervalAvailability(Availability):
    """Online intervals per client, sorted and disjoint: ``intervals[pid] = [(start, end), ...]``."""

    def __init__(self, intervals: dict[int, list[tuple[float, float]]]) -> None:
        self.intervals = {pid: sorted(v) for pid, v in intervals.items()}
        self._starts = {pid: [s for s, _ in v] for pid, v in self.intervals.items()}

    def _extend(self, pid: int, t: float) -> None:
        """Hook for lazily generated intervals: make sure those covering times up to ``t`` exist."""

    def _holding(self, pid: int, t: float) -> tuple[float, float] | None:
        """The first interval that ends after ``t`` (None if none)."""
        self._extend(pid, t)
        spans = self.intervals.get(pid, [])
        i = max(bisect.bisect_right(self._starts.get(pid, []), t) - 1, 0)
        for j in range(i, len(spans)):
            if spans[j][1] > t:
                return spans[j]
        return None

    def next_online(self, pid: int, t: float) -> float:
        span = self._holding(pid, t)
        return math.inf if span is None else max(span[0], t)

    def online_until(self, pid: int, t: float) -> float:
        span = self._holding(pid, t)
        return t if span is None or span[0] > t else span[1]

    def is_online(self, pid: int, t: float) -> bool:
        span = self._holding(pid, t)
        return span is not None and span[0] <= t < span[1]


class MarkovAvailability(IntervalAvailability):
    """Alternating online/offline periods with exponential lengths (means ``online_mean_s``, ``offline_mean_s``),
    started in the stationary state (online with probability on / (on + off)); each client's periods come from its
    own seeded generator, extended lazily, so the sequence does not depend on the order of queries."""

    def __init__(self, num_clients: int, online_mean: float, offline_mean: float, seed: int) -> None:
        super().__init__({})
        self.online_mean, self.offline_mean = float(online_mean), float(offline_mean)
        self._rngs = {}
        self._state: dict[int, tuple[float, bool]] = {}  # pid -> (time generated up to, online at that time)
        for pid in range(num_clients):
            rng = np.random.default_rng([int(seed), int(pid), 0xA7A1])
            self._rngs[pid] = rng
            online = rng.random() < online_mean / (online_mean + offline_mean)
            self._state[pid] = (0.0, bool(online))
            self.intervals[pid], self._starts[pid] = [], []

    def _extend(self, pid: int, t: float) -> None:
        """Generate periods until an online interval ends after ``t`` (the one holding or following it)."""
        if pid not in self._state:
            return
        end, online = self._state[pid]
        spans, rng = self.intervals[pid], self._rngs[pid]
        while not spans or spans[-1][1] <= t:
            length = float(rng.exponential(self.online_mean if online else self.offline_mean))
            if online:
                spans.append((end, end + length))
                self._starts[pid].append(end)
            end, online = end + length, not online
        self._state[pid] = (end, online)

    def checkpoint_state(self) -> dict[str, Any]:
        """The periods generated so far and each client's generator state (a round checkpoint's)."""
        return {"state": dict(self._state), "intervals": {pid: list(v) for pid, v in self.intervals.items()},
                "rngs": {pid: rng.bit_generator.state for pid, rng in self._rngs.items()}}

    def restore_state(self, state: dict[str, Any]) -> None:
        self._state = dict(state["state"])
        self.intervals = {pid: list(v) for pid, v in state["intervals"].items()}
        self._starts = {pid: [s for s, _ in v] for pid, v in self.intervals.items()}
        for pid, rng_state in state["rngs"].items():
            self._rngs[pid].bit_generator.state = rng_state


@dataclass
class DeviceFleet:
    """Every client's profile and the availability process."""

    profiles: list[DeviceProfile]
    availability: Availability


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    """n draws of a log-normal with this median (exp(mu)) and log-standard deviation."""
    return median * np.exp(sigma * rng.standard_normal(n))


def build_fleet(system: Any, num_clients: int, seed: int) -> DeviceFleet:
    """The fleet of ``system`` (a ``fedsim.config.SystemConfig``): traces where given, else seeded draws."""
    if system.trace:
        profiles = read_profile_trace(system.trace, num_clients)
    else:
        rng = np.random.default_rng([int(seed), 0xD5C0])
        speed = _lognormal(rng, system.speed_median, system.speed_sigma, num_clients)
        down = _lognormal(rng, system.download_median_mbps, system.download_sigma, num_clients)
        up = _lognormal(rng, system.upload_median_mbps, system.upload_sigma, num_clients)
        profiles = [DeviceProfile(float(s), float(d) * MBIT, float(u) * MBIT) for s, d, u in zip(speed, down, up)]
    if system.availability == "trace":
        availability: Availability = read_availability_trace(system.availability_trace, num_clients)
    elif system.availability == "markov":
        availability = MarkovAvailability(num_clients, system.online_mean_s, system.offline_mean_s, seed)
    else:
        availability = AlwaysOnline()
    return DeviceFleet(profiles, availability)


def _rows(path: str | Path, field: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV trace whose header holds ``columns``; errors name ``field`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: {str(path)!r} is not a file; a CSV with the columns {', '.join(columns)}")
    with p.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ConfigError(f"{field}: {p} has no column {', '.join(missing)}; its header must hold "
                              f"{', '.join(columns)} (it has {', '.join(header) or 'none'})")
        reader.fieldnames = header
        rows = [(i + 2, row) for i, row in enumerate(reader)]
    if not rows:
        raise ConfigError(f"{field}: {p} has a header but no rows")
    return rows


def _number(field: str, path: str | Path, line: int, column: str, text: Any, *, integer: bool = False,
            positive: bool = False) -> float:
    what = "a client id (an integer >= 0)" if integer else ("a finite number > 0" if positive
                                                            else "a finite number >= 0")
    try:
        value = int(str(text).strip()) if integer else float(str(text).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {path} line {line}: {column} {text!r} is not {what}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{field}: {path} line {line}: {column} {text!r} is out of range; it must be {what}")
    return value


def read_profile_trace(path: str | Path, num_clients: int, field: str = "system.trace") -> list[DeviceProfile]:
    """Profiles from a CSV with one row per client (``PROFILE_COLUMNS``), every client 0..N-1 exactly once."""
    found: dict[int, DeviceProfile] = {}
    for line, row in _rows(path, field, PROFILE_COLUMNS):
        pid = int(_number(field, path, line, "client", row["client"], integer=True))
        if pid >= num_clients:
            raise ConfigError(f"{field}: {path} line {line}: client {pid} does not exist; the scenario has "
                              f"{num_clients} clients (0..{num_clients - 1})")
        if pid in found:
            raise ConfigError(f"{field}: {path} line {line}: client {pid} has a second row; one row per client")
        speed, down, up = (_number(field, path, line, c, row[c], positive=True) for c in PROFILE_COLUMNS[1:])
        found[pid] = DeviceProfile(speed, down * MBIT, up * MBIT)
    missing = [pid for pid in range(num_clients) if pid not in found]
    if missing:
        raise ConfigError(f"{field}: {path} has no row for client {_few(missing)}; every client 0.."
                          f"{num_clients - 1} needs one")
    return [found[pid] for pid in range(num_clients)]


def read_availability_trace(path: str | Path, num_clients: int,
                            field: str = "system.availability_trace") -> IntervalAvailability:
    """Online intervals from a CSV with one row per interval (``AVAILABILITY_COLUMNS``)."""
    spans: dict[int, list[tuple[float, float, int]]] = {}
    for line, row in _rows(path, field, AVAILABILITY_COLUMNS):
        pid = int(_number(field, path, line, "client", row["client"], integer=True))
        if pid >= num_clients:
            raise ConfigError(f"{field}: {path} line {line}: client {pid} does not exist; the scenario has "
                              f"{num_clients} clients (0..{num_clients - 1})")
        start = _number(field, path, line, "start_s", row["start_s"])
        end = _number(field, path, line, "end_s", row["end_s"])
        if end <= start:
            raise ConfigError(f"{field}: {path} line {line}: end_s {end:g} is not after start_s {start:g}")
        spans.setdefault(pid, []).append((start, end, line))
    for pid, items in spans.items():
        items.sort()
        for (s0, e0, l0), (s1, _, l1) in zip(items, items[1:]):
            if s1 < e0:
                raise ConfigError(f"{field}: {path} lines {l0} and {l1}: client {pid}'s intervals [{s0:g}, {e0:g}) "
                                  f"and [{s1:g}, ...) overlap")
    return IntervalAvailability({pid: [(s, e) for s, e, _ in items] for pid, items in spans.items()})


def _few(values: list[int], limit: int = 5) -> str:
    head = ", ".join(str(v) for v in values[:limit])
    return head + (f" and {len(values) - limit} more" if len(values) > limit else "")
