"""The strategy registry: a name -> its parameters, its server part and its client part.

Registration is declarative and cheap: a strategy's protocol module (``fedsim/algorithms/<algo>/protocol.py``) registers a
``StrategySpec`` whose server and client parts are named by import path (``"fedsim.strategies.afl:AFLServer"``), so
listing and validating strategies imports neither torch nor any training code; the parts are imported when a run
needs them. The server part (``fedsim/strategies/``) and the client part (``fedsim/clients/``) never import each
other: both import the protocol. Third-party strategies register the same way from a module named in the
``fedsim.plugins`` entry-point group.

This module imports nothing from ``fedsim.config``; the config imports it to find a strategy's parameters.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from fedsim.catalog import STRATEGY_KINDS
from fedsim.catalog import STREAM_KINDS
from fedsim.errors import ConfigError

ENTRY_POINT_GROUP = "fedsim.plugins"


def _resolve(target: str | type | None) -> Any:
    if target is None or not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class StrategySpec:
    """Everything the engine needs to run one algorithm.

    ``server`` / ``client``: the parts, as classes or ``"module:Class"`` paths (imported on first use);
    ``client = None`` for server-only baselines. ``stream``: the stream kind the strategy learns from ("none" for a
    static partition). ``fixed_rounds(params)``: the number of rounds the algorithm defines (one-shot: 1; FuseFL:
    its stages); a scenario that sets another number is refused, one that sets none gets it. ``single_client``: the
    strategy runs on one client holding all the data (centralized upper bound). ``reducible``: the client part has
    an associative ``reduce``, so one node may serve several clients. ``model_replies``: the client part replies
    with its trained model under the SGD protocol's keys, so ``simulation.byzantine_fraction`` applies to it.
    ``check(config)``: cross-field rules.
    """

    name: str
    params: type
    server: str | type
    client: str | type | None = None
    kind: str = "federated"
    description: str = ""
    stream: str = "none"
    fixed_rounds: Callable[[Any], int] | None = None
    single_client: bool = False
    reducible: bool = False
    model_replies: bool = False
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"StrategySpec.kind must be one of {STRATEGY_KINDS}, got {self.kind!r}")
        if self.stream not in STREAM_KINDS:
            raise ValueError(f"StrategySpec.stream must be one of {STREAM_KINDS}, got {self.stream!r}")

    def server_class(self) -> type:
        return _resolve(self.server)

    def client_class(self) -> type | None:
        return _resolve(self.client)


_REGISTRY: dict[str, StrategySpec] = {}
_BROKEN: dict[str, str] = {}  # module -> import error (one broken plugin must not hide the others)
_DISCOVERED = False


def register_strategy(spec: StrategySpec) -> StrategySpec:
    """Add ``spec``; registering the same name twice with different parts is a programming error."""
    old = _REGISTRY.get(spec.name)
    if old is not None and (old.server != spec.server or old.client != spec.client):
        raise ValueError(f"strategy {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _import(module: str, label: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # reported when a strategy is looked up, and by `fedsim list`
        _BROKEN[label] = f"{type(exc).__name__}: {exc}"


def _discover() -> None:
    """Import the protocol module of every package in ``fedsim.algorithms`` and every ``fedsim.plugins`` entry point.

    The algorithm packages are found on disk and imported by name, so the registry (which every protocol module
    imports) has no static import of any algorithm.
    """
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    algorithms = importlib.import_module("fedsim.algorithms")
    for package in sorted(pkgutil.iter_modules(algorithms.__path__), key=lambda m: m.name):
        if package.ispkg and not package.name.startswith("_"):
            _import(f"fedsim.algorithms.{package.name}.protocol", f"fedsim/algorithms/{package.name}/protocol.py")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _import(entry.value.partition(":")[0], f"entry point {entry.name} ({entry.value})")


def get_strategy(name: Any) -> StrategySpec:
    _discover()
    if name not in _REGISTRY:
        broken = "".join(f"; {path} failed to import ({err})" for path, err in _BROKEN.items())
        raise ConfigError(
            f"strategy.name: {name!r} is not a known strategy; choose one of {', '.join(sorted(_REGISTRY))}{broken}"
        )
    return _REGISTRY[name]


def broken_strategy_modules() -> dict[str, str]:
    """Strategy modules that failed to import, with their errors."""
    _discover()
    return dict(_BROKEN)


def strategies() -> dict[str, StrategySpec]:
    _discover()
    return dict(sorted(_REGISTRY.items()))
