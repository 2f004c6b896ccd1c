"""The simulated clock: how long each client's round takes on its device, and when a round ends.

On with a scenario's ``[system]`` section (``fedsim.config.SystemConfig``); the engine measures every exchange, so
every strategy gets simulated time without code of its own. For client i of an exchange that starts at t0:

    start_i    = the first time >= t0 at which i is online (t0 for a sampled client, which is online at t0)
    download_i = bytes_down_i / download bandwidth_i       (bytes of the request, as ``AccountingGrid`` counts them)
    compute_i  = samples_i / speed_i,  samples_i = epochs * examples_i
                 epochs: ``local-epochs`` of the request's ConfigRecord (``LocalTraining``), 1 where it has none
                 (one pass: AFL's feature statistics, DPCR's); examples: the reply's ``num-examples`` metric (the
                 samples the client reports it trained on: its partition, or the task of a stream), the client's
                 partition size where the reply reports none
    upload_i   = bytes_up_i / upload bandwidth_i           (bytes of the reply, as the node counts them)
    finish_i   = start_i + download_i + compute_i + upload_i

A client is dropped (its reply becomes an error reply, counted in ``failed_clients`` like a failure; its bytes
stay counted) when it goes offline before ``finish_i`` or misses the deadline (``finish_i - t0 >
system.deadline_s``). With over-selection (``system.over_selection > 1``) a sampled round keeps the first m answers
in order of ``finish_i`` and discards the rest (counted in ``dropped_clients`` only). A synchronous round ends when
its last kept client answers, or at ``t0 + deadline_s`` when a client was lost and a deadline is set (the server
waits that long to know). Clients that fail (``simulation.failure_rate``, crashes) do not extend a round without
a deadline. Asynchronous strategies (FedBuff) set ``asynchronous`` and ``start_at`` and move ``now`` themselves,
reading each client's ``ClientTiming`` in ``last``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.app.error import Error

from fedsim.scenario import derive_seed
from fedsim.system.devices import DeviceFleet, build_fleet

__all__ = ["CLIENT_DROPPED", "ClientTiming", "SimClock", "EPOCHS_KEY", "EXAMPLES_KEY"]

CLIENT_DROPPED = 9002  # error code of a reply the clock dropped (deadline missed, went offline)
EPOCHS_KEY = "local-epochs"  # LocalTraining's epochs in a request's ConfigRecord
EXAMPLES_KEY = "num-examples"  # the examples a reply reports (Flower FedAvg's weighted_by_key)


@dataclass(frozen=True)
class ClientTiming:
    """One client's part of an exchange on the simulated clock (seconds; ``start`` and ``finish`` absolute)."""

    pid: int
    start: float
    download: float
    compute: float
    upload: float
    samples: float
    dropped: str | None = None  # why it was dropped, None when kept

    @property
    def finish(self) -> float:
        return self.start + self.download + self.compute + self.upload


class SimClock:
    """Simulated time of one run: the fleet, ``now`` (seconds since the run began) and the exchanges' timings."""

    def __init__(self, config: Any, fleet: DeviceFleet, partitions: list | None = None) -> None:
        self.system = config.system
        self.seed = int(config.seed)
        self.num_clients = int(config.num_clients)
        self.fleet = fleet
        self.sizes = None if partitions is None else [len(p) for p in partitions]
        self.now = 0.0
        self.asynchronous = False  # True: exchanges do not move `now` (the strategy does)
        self.start_at: float | None = None  # the next exchange starts then (default: now)
        self.last: dict[int, ClientTiming] = {}  # the last exchange's timings, per client
        self.dropped = 0  # clients dropped or discarded so far (deadline, offline, over-selection)
        self._target: int | None = None  # over-selection: the next exchange keeps this many answers
        self._reached: dict[float, float | None] = {float(t): None for t in self.system.targets}

    @classmethod
    def for_config(cls, config: Any, partitions: list | None = None, system: Any = None) -> SimClock | None:
        """The clock of ``config`` (with ``system`` in place of its ``[system]`` section where given); None
        without either (no simulated time)."""
        if system is not None:
            config = dataclasses.replace(config, system=system)
        if config.system is None:
            return None
        return cls(config, build_fleet(config.system, config.num_clients, config.seed), partitions)

    # -- sampling -----------------------------------------------------------------------------------------------
    def available(self, t: float | None = None) -> list[int]:
        """The clients online at ``t`` (default: now)."""
        t = self.now if t is None else t
        return [pid for pid in range(self.num_clients) if self.fleet.availability.is_online(pid, t)]

    def sample(self, m: int, round_: int, t: float | None = None) -> list[int]:
        """m clients for a round starting at ``t`` (default now): ceil(m * over_selection) drawn (seeded per round)
        among the online ones; the next exchange keeps the first m answers. When nobody is online the round
        starts (``now`` moves) when the first client comes online."""
        t = self.now if t is None else t
        online = self.available(t)
        if not online:
            t = min(self.fleet.availability.next_online(pid, t) for pid in range(self.num_clients))
            if math.isinf(t):
                return []
            if not self.asynchronous:
                self.now = t
            online = self.available(t)
        k = min(math.ceil(m * self.system.over_selection - 1e-9), len(online))
        rng = np.random.default_rng(derive_seed(self.seed, round_, "system-sample"))
        chosen = sorted(int(online[i]) for i in rng.choice(len(online), size=k, replace=False))
        self._target = m if k > m else None
        return chosen

    def sample_nodes(self, grid: Any, fraction: float, round_: int) -> list[int]:
        """``sample`` for Flower's strategies, as node ids: m = max(int(N * fraction), 1), Flower's count."""
        node_of = {c: node for node, clients in grid.node_clients.items() for c in clients}
        return [node_of[pid] for pid in self.sample(max(int(len(node_of) * fraction), 1), round_)]

    # -- timing -------------------------------------------------------------------------------------------------
    def timing(self, pid: int, start: float, bytes_down: int, samples: float, bytes_up: int,
               round_start: float | None = None) -> ClientTiming:
        """Client ``pid``'s timing for a round that began at ``round_start`` (default: ``start``, when the client
        starts), with the reason it is dropped (if it is)."""
        round_start = start if round_start is None else round_start
        if math.isinf(start):
            return ClientTiming(pid, start, 0.0, 0.0, 0.0, samples, f"client {pid}: never online again")
        profile = self.fleet.profiles[pid]
        down, comp, up = profile.seconds(bytes_down, samples, bytes_up)
        t = ClientTiming(pid, start, down, comp, up, samples)
        offline = self.fleet.availability.online_until(pid, start)
        deadline = self.system.deadline_s
        if offline < t.finish:
            return _with(t, f"client {pid}: went offline at {offline:.1f} s, before it answered "
                            f"(at {t.finish:.1f} s)")
        if deadline is not None and t.finish - round_start > deadline:
            return _with(t, f"client {pid}: missed the deadline (system.deadline_s = {deadline:g}): answered "
                            f"{t.finish - round_start:.1f} s after the round began")
        return t

    def _samples(self, msg: Message, pid: int, epochs: float) -> float:
        for record in msg.content.metric_records.values():
            if EXAMPLES_KEY in record:
                return epochs * float(record[EXAMPLES_KEY])
        return epochs * float(self.sizes[pid] if self.sizes is not None else 0)

    def exchange(self, messages: list[Message], replies: Iterable[tuple[tuple, Message]],
                 clients_of: Callable[[Message], list[int]], nbytes: Callable[[Any], int],
                 upload_of: Callable[[Message], int], traffic: Any) -> Iterator[tuple[tuple, Message]]:
        """Time an exchange: pass ``replies`` (``(sort key, message)``) through, dropping those the clock drops.

        ``clients_of(sent message)`` are its clients, ``nbytes(content)`` a request's size, ``upload_of(reply)``
        the bytes a reply's client sent; dropped clients are added to ``traffic.failed``."""
        t0 = self.now if self.start_at is None else self.start_at
        self.start_at, target, self._target = None, self._target, None
        sent: dict[int, tuple[int, int, float]] = {}  # node -> (client, bytes down, epochs)
        for msg in messages:
            epochs = _epochs(msg)
            size = nbytes(msg.content) if msg.has_content() else 0
            for pid in clients_of(msg):
                sent[msg.metadata.dst_node_id] = (pid, size, epochs)
        self.last = timings = {}
        kept_ends, lost, held = [], False, []
        try:
            for key, msg in replies:
                node = msg.metadata.src_node_id
                if msg.has_error() or node not in sent:
                    lost = True
                    yield key, msg
                    continue
                pid, down, epochs = sent[node]
                start = self.fleet.availability.next_online(pid, t0)
                t = timings[pid] = self.timing(pid, start, down, self._samples(msg, pid, epochs), upload_of(msg),
                                                    t0)
                if t.dropped is not None:
                    lost = True
                    traffic.failed += 1
                    self.dropped += 1
                    _drop(msg, t.dropped)
                    yield key, msg
                elif target is None:
                    kept_ends.append(t.finish)
                    yield key, msg
                else:
                    held.append((t.finish, pid, key, msg))
            held.sort(key=lambda item: item[:2])
            for rank, (finish, pid, key, msg) in enumerate(held):
                if rank < target:
                    kept_ends.append(finish)
                else:
                    timings[pid] = _with(timings[pid], f"client {pid}: over-selected, answered after the first "
                                                       f"{target} (system.over_selection)")
                    self.dropped += 1
                    _drop(msg, timings[pid].dropped)
                yield key, msg
        finally:
            if not self.asynchronous:
                end = max(kept_ends, default=t0)
                if lost and self.system.deadline_s is not None:
                    end = max(end, t0 + self.system.deadline_s)
                self.now = max(self.now, end)

    # -- round checkpoints (fedsim.engine.checkpoint) -----------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """What a round checkpoint keeps of the clock: ``now``, the dropped count, the targets reached, the last
        exchange's timings, the pending exchange settings and the availability's generated state (the fleet's
        profiles are a function of the scenario and are rebuilt)."""
        return {"now": self.now, "dropped": self.dropped, "reached": dict(self._reached), "last": dict(self.last),
                "asynchronous": self.asynchronous, "start_at": self.start_at, "target": self._target,
                "availability": self.fleet.availability.checkpoint_state()}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Back from ``checkpoint_state`` (a resumed run's clock, built for the same configuration)."""
        self.now, self.dropped = float(state["now"]), int(state["dropped"])
        self._reached, self.last = dict(state["reached"]), dict(state["last"])
        self.asynchronous, self.start_at, self._target = state["asynchronous"], state["start_at"], state["target"]
        self.fleet.availability.restore_state(state["availability"])

    # -- results ------------------------------------------------------------------------------------------------
    def observe(self, accuracy: float) -> None:
        """Note an evaluated accuracy at ``now`` for the time-to-accuracy targets."""
        if accuracy is None or not math.isfinite(float(accuracy)):
            return
        for target, reached in self._reached.items():
            if reached is None and float(accuracy) >= target:
                self._reached[target] = round(self.now, 4)

    def summary(self) -> dict[str, Any]:
        """summary.json entries: total simulated seconds, dropped clients, the first time at each target (None:
        never reached)."""
        out: dict[str, Any] = {"sim_seconds": round(self.now, 4), "dropped_clients": int(self.dropped)}
        if self._reached:
            out["time_to_accuracy"] = {f"{t:g}": s for t, s in self._reached.items()}
        return out


def _with(t: ClientTiming, reason: str) -> ClientTiming:
    return ClientTiming(t.pid, t.start, t.download, t.compute, t.upload, t.samples, reason)


def _epochs(msg: Message) -> float:
    """``local-epochs`` of a request's ConfigRecords, 1 (one pass over the samples) where it has none."""
    if msg.has_content():
        for record in msg.content.config_records.values():
            if EPOCHS_KEY in record:
                return float(record[EPOCHS_KEY])
    return 1.0


def _drop(msg: Message, reason: str) -> None:
    """Turn a reply into the error reply of a dropped client, in place (what the strategy then sees)."""
    msg.__dict__["_content"] = None
    msg.__dict__["_error"] = Error(code=CLIENT_DROPPED, reason=reason)
