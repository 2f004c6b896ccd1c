"""Mid-run checkpoints: what ``fedsim run --resume`` needs to continue an interrupted run from its last round.

After every finished round a multi-round strategy (the model-rounds framework, ``fedsim.frameworks.model_rounds``,
and the FedAvg family of ``strategies/fedavg.py``) calls ``ctx.checkpoint.save(round, state)``, which writes
``run_dir/checkpoint.pkl`` atomically (``fedsim.results.rundir.atomic_write``; only the last round's is kept) with

- the strategy's own state (``state``: the global model, server state such as SCAFFOLD's c, FedDyn's h, the
  server optimizer's moments, the rounds that skipped aggregation);
- the engine's: the metrics.csv rows so far, clients.csv's ledger, the byte and failure counters, the exchanges,
  the summary entries so far, the RNG states of the server process (``random``, which Flower's node sampling
  uses, numpy's global generator, ``ctx.rng``, torch's CPU generator; per-round seeds are derived from the scenario
  seed and the round, ``ctx.derive_seed``, and need nothing);
- every client's persistent state (``ClientEnv.state``: SCAFFOLD's c_i, FedDyn's gradient), collected from the
  nodes: the server asks each node for its clients' namespaces of its Flower ``Context.state`` with a query message
  (``STATE_OP``, outside the byte accounting), and on resume sends each node back the namespaces of the clients it
  serves. Clients are keyed by partition id, so a resumed run may land on other node ids (Ray, the deployment
  engine).

The checkpoint is removed when the run completes. ``load(run_dir, config)`` reads it for a resumed run and refuses
a checkpoint of another configuration (``CheckpointMismatch`` names the differing fields). The file is a Python
pickle: load only checkpoints your own runs wrote.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

from fedsim.engine.accounting import CLIENT_SEPARATOR, ENGINE_KEY
from fedsim.engine.node import STATE_OP
from fedsim.errors import FedsimError
from fedsim.results.rundir import _jsonable, atomic_write, record_written

__all__ = ["CHECKPOINT_FILE", "CheckpointMismatch", "RoundCheckpoint", "load", "check_compatible",
           "config_key"]

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT = 1


class CheckpointMismatch(FedsimError):
    """A checkpoint written by a run of another configuration."""


def config_key(config: dict) -> dict:
    """The configuration a checkpoint must match: the resolved scenario without its tracking settings."""
    out = json.loads(json.dumps(_jsonable(config)))
    out.pop("logging", None)
    return out


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if a == b else [path or "(the whole configuration)"]


def _read(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        payload = pickle.loads(path.read_bytes())
    except Exception as exc:  # noqa: BLE001  (truncated or foreign file)
        raise FedsimError(f"--resume: {path} cannot be read ({type(exc).__name__}: {exc}); remove it to run "
                          "from the beginning") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedsimError(f"--resume: {path} is not a fedsim checkpoint of format {FORMAT}; remove it to run "
                          "from the beginning")
    return payload


def check_compatible(run_dir: str | Path, config: dict, label: str | None = None) -> bool:
    """Whether ``run_dir`` holds a checkpoint of ``config`` (False: none there); raises ``CheckpointMismatch``
    for a checkpoint of another configuration."""
    payload = _read(Path(run_dir))
    if payload is None:
        return False
    diff = _differences(payload["config"], config_key(config))
    if diff:
        shown = ", ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
        variant = f" (variant {label!r})" if label else ""
        raise CheckpointMismatch(
            f"--resume: {Path(run_dir) / CHECKPOINT_FILE} is the checkpoint of a run of a different "
            f"configuration{variant} (differs in: {shown}); run with the configuration it was written for, or "
            "pass --overwrite to start this one from the beginning")
    return True


def load(run_dir: str | Path, config: dict) -> dict | None:
    """The checkpoint of ``config`` in ``run_dir`` (None where there is none); ``CheckpointMismatch`` for one of
    another configuration."""
    return _read(Path(run_dir)) if check_compatible(run_dir, config) else None


def _rng_states() -> dict:
    import torch

    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_states(states: dict) -> None:
    import torch

    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _keys_of(states: RecordDict, clients: list[int]) -> list[str]:
    """The keys of ``states`` ("<pid>/<key>", ``CLIENT_SEPARATOR``) that belong to ``clients``."""
    prefixes = {f"{pid}{CLIENT_SEPARATOR}" for pid in clients}
    return [k for k in states.keys() if k[:k.find(CLIENT_SEPARATOR) + 1] in prefixes]


class RoundCheckpoint:
    """The checkpoint of one run (``ctx.checkpoint``): ``resume()`` once before the first round, ``save`` after
    each finished round.

    ``payload`` is the checkpoint read for ``--resume`` (None: a fresh run).
    """

    def __init__(self, ctx: Any, payload: dict | None = None) -> None:
        self.ctx = ctx
        self.payload = payload
        self.path = Path(ctx.run_dir) / CHECKPOINT_FILE
        self.saved = False
        self._states = RecordDict()  # every client's state as last collected ("<pid>/<key>" -> record)

    @property
    def round(self) -> int:
        """The last round the checkpoint being resumed finished (0 for a fresh run)."""
        return int(self.payload["round"]) if self.payload else 0

    # -- client states, through the nodes --------------------------------------------------------------------
    def _query(self, nodes: list[int], op: str, contents: dict[int, Any] | None = None) -> list:
        grid = self.ctx.grid
        msgs = []
        for node in nodes:
            body = RecordDict(dict((contents or {}).get(node, RecordDict()).items()))
            body[ENGINE_KEY] = ConfigRecord({STATE_OP: op})
            msgs.append(Message(body, node, MessageType.QUERY))
        replies = list(grid.inner.send_and_receive(msgs, timeout=self.ctx.config.simulation.timeout))
        errors = [m.error.reason for m in replies if m.has_error()]
        if errors or len(replies) != len(msgs):
            raise FedsimError(f"checkpoint: {len(errors) or len(msgs) - len(replies)} of {len(msgs)} nodes did not "
                              f"{'send' if op == 'get' else 'take'} their clients' state"
                              + (f"; first error: {errors[0].strip().splitlines()[-1]}" if errors else ""))
        return replies

    def _collect_client_states(self) -> bytes:
        """Every client's state: asked again only of the nodes whose states may have changed since the last
        checkpoint (``AccountingGrid.take_state_changed``); the others' are the ones collected before."""
        grid = self.ctx.grid
        nodes = sorted(n for n in grid.take_state_changed() if n in grid.node_clients)
        if nodes:
            for key in _keys_of(self._states, [pid for n in nodes for pid in grid.node_clients[n]]):
                del self._states[key]
            for msg in self._query(nodes, "get"):
                for key, record in msg.content.items():
                    self._states[key] = record
        return recorddict_to_proto(self._states).SerializeToString()

    def _restore_client_states(self, blob: bytes) -> None:
        proto = ProtoRecordDict()
        proto.ParseFromString(blob)
        states = recorddict_from_proto(proto)
        self._states = RecordDict(dict(states.items()))
        contents = {}
        for node, clients in self.ctx.grid.node_clients.items():
            contents[node] = RecordDict({k: states[k] for k in _keys_of(states, clients)})
        self._query(list(contents), "set", contents)

    # -- the engine's state ---------------------------------------------------------------------------------
    def _engine_state(self) -> dict:
        ctx, grid = self.ctx, self.ctx.grid
        inner = grid.inner
        return {"rows": list(ctx.recorder.rows), "traffic": grid.traffic, "ledger": grid.ledger,
                "exchanges": ctx.exchanges, "extra_summary": dict(ctx.extra_summary),
                "last_step_bytes": ctx._last_step_bytes, "ctx_rng": ctx.rng.getstate(), "rng": _rng_states(),
                "replies": {k: getattr(inner, k) for k in ("replies_ok", "replies_failed", "first_error")
                            if hasattr(inner, k)},
                "clock": None if ctx.clock is None else ctx.clock.checkpoint_state()}

    def _restore_engine(self, state: dict) -> None:
        ctx, grid = self.ctx, self.ctx.grid
        grid.traffic = state["traffic"]
        grid.ledger = state["ledger"]
        ctx.exchanges = state["exchanges"]
        ctx.extra_summary.update({k: v for k, v in state["extra_summary"].items() if k != "setup_seconds"})
        ctx._last_step_bytes = tuple(state["last_step_bytes"])
        ctx.rng.setstate(state["ctx_rng"])
        for key, value in state["replies"].items():
            setattr(grid.inner, key, value)
        if state["clock"] is not None:  # [system]: the simulated clock where the interrupted run left it
            ctx.clock.restore_state(state["clock"])
        ctx.recorder.restore_rows(state["rows"])
        ctx._write_clients()
        if ctx.progress is not None:
            for row in state["rows"]:
                ctx.progress.update(row)
        _set_rng_states(state["rng"])

    # -- the strategy's calls -------------------------------------------------------------------------------
    def resume(self) -> dict | None:
        """Restore the engine, the clients' and the RNG states of the checkpoint being resumed and return the
        strategy's own state (as ``save`` got it, plus "round"); None for a fresh run. Call it once, after the
        strategy's set-up and before its first round: the RNG states are those at the end of the saved round."""
        if not self.payload:
            return None
        self._restore_client_states(self.payload["clients"])
        self._restore_engine(self.payload["engine"])
        return {**self.payload["strategy"], "round": self.round}

    def save(self, round_: int, state: dict) -> None:
        """Checkpoint the run after ``round_`` finished (its metrics row logged): ``state`` is what the strategy
        needs to continue (picklable: arrays, dicts, numbers)."""
        if not self.saved:
            record_written(self.ctx.run_dir, [CHECKPOINT_FILE])  # fedsim's own file: replaced with the run
        payload = {"format": FORMAT, "config": config_key(self.ctx.config.to_dict()), "round": int(round_),
                   "strategy": state, "clients": self._collect_client_states(), "engine": self._engine_state()}
        atomic_write(self.path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        self.saved = True

    def remove(self) -> None:
        """The run completed: its checkpoint goes."""
        self.path.unlink(missing_ok=True)
