"""The strategy registry: a name -> (params dataclass, server part, client part).

Adding an algorithm means writing ``strategies/<name>.py`` (server part + ``register_strategy``),
``clients/<name>.py`` (client part) and a scenario file; the engine discovers ``strategies/`` modules itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsim.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from fedsim.config import ScenarioConfig

KINDS = ("federated", "continual")


@dataclass(frozen=True)
class StrategySpec:
    """Everything the engine needs to run one algorithm."""

    name: str
    params: type  # dataclass of the strategy's own settings ([strategy] table)
    server: type  # server part: ``server(params).run(ctx)``
    client: type | None  # client part: ``client(params).train(content, env)``; None for server-only baselines
    kind: str = "federated"
    description: str = ""
    check: Callable[["ScenarioConfig"], None] | None = None  # cross-field validation of a whole scenario
    prepare: Callable[[dict], dict] | None = None  # rewrite the raw scenario before validation (e.g. 1 client)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"StrategySpec.kind must be one of {KINDS}, got {self.kind!r}")


_REGISTRY: dict[str, StrategySpec] = {}
_BROKEN: dict[str, str] = {}  # strategies module -> import error (one broken plugin must not hide the others)
_DISCOVERED = False


def register_strategy(spec: StrategySpec) -> StrategySpec:
    """Add ``spec``; registering the same name twice from different classes is a programming error."""
    old = _REGISTRY.get(spec.name)
    if old is not None and (old.server is not spec.server or old.client is not spec.client):
        raise ValueError(f"strategy {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every module of the top-level ``strategies`` package, so each registers itself."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import strategies

    for module in sorted(pkgutil.iter_modules(strategies.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"strategies.{module.name}")
        except Exception as exc:  # reported when a strategy is looked up, and by `fedsim list`
            _BROKEN[f"strategies/{module.name}.py"] = f"{type(exc).__name__}: {exc}"


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
