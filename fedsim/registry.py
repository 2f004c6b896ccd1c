"""The strategy registry: a name -> its parameters, its server part and its client part.

Registration is declarative and cheap: a strategy's protocol module (``fedsim/algorithms/<algo>/protocol.py``) registers a
``StrategySpec`` whose server and client parts are named by import path (``"fedsim.strategies.afl:AFLServer"``), so
listing and validating strategies imports neither torch nor any training code; the parts are imported when a run
needs them. The server part (``fedsim/strategies/``) and the client part (``fedsim/clients/``) never import each
other: both import the protocol. Third-party strategies register the same way from a module named in the
``fedsim.plugins`` entry-point group.

The engine builds the parts through ``server_class()`` / ``client_class()``, which check them against their
contracts (``fedsim.engine.parts.ServerPart`` / ``ClientPart``: the hooks exist, ``__init__`` takes the parameters,
``reduce`` exists where ``reducible`` is declared) and raise ``PartContractError`` naming a missing hook.

This module imports nothing from ``fedsim.config``; the config imports it to find a strategy's parameters.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from fedsim.catalog import STRATEGY_KINDS
from fedsim.catalog import STREAM_KINDS
from fedsim.errors import ConfigError

ENTRY_POINT_GROUP = "fedsim.plugins"


class PartContractError(TypeError):
    """A strategy's part (or declared model codec) misses a hook of its contract (``fedsim.engine.parts``)."""


def _where(spec_name: str, side: str, obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"strategy {spec_name!r}: {side} {module}.{name}"


def _lacks(obj: Any, hook: str) -> bool:
    return not callable(getattr(obj, hook, None))


def _check_class(cls: Any, where: str, contract: str) -> None:
    if not inspect.isclass(cls):
        raise PartContractError(f"{where} is not a class ({contract}, fedsim.engine.parts)")
    try:
        inspect.signature(cls).bind(None)
    except TypeError:
        raise PartContractError(f"{where} cannot be built as {cls.__name__}(params): its __init__ must take the "
                                f"strategy's parameters ({contract}, fedsim.engine.parts)") from None
    except ValueError:  # no signature to read (a builtin): the call decides
        pass


def check_server_part(cls: Any, spec_name: str) -> type:
    """``cls`` if it keeps the ``ServerPart`` contract (``__init__(params)``, ``run(ctx)``); else a
    ``PartContractError`` naming the missing hook."""
    where = _where(spec_name, "server part", cls)
    if inspect.isclass(cls) and _lacks(cls, "run"):
        raise PartContractError(f"{where} has no run(ctx) hook (ServerPart, fedsim.engine.parts)")
    _check_class(cls, where, "ServerPart")
    return cls


def check_client_part(cls: Any, spec_name: str, reducible: bool) -> type:
    """``cls`` if it keeps the ``ClientPart`` contract (``__init__(params)``, ``train(content, env)``, and
    ``reduce(replies)`` where the spec declares ``reducible``); else a ``PartContractError`` naming the hook."""
    where = _where(spec_name, "client part", cls)
    if inspect.isclass(cls) and _lacks(cls, "train"):
        raise PartContractError(f"{where} has no train(content, env) hook (ClientPart, fedsim.engine.parts)")
    if inspect.isclass(cls) and reducible and _lacks(cls, "reduce"):
        raise PartContractError(f"{where} has no reduce(replies) hook, but the spec declares reducible=True "
                                "(ReducibleClientPart, fedsim.engine.parts)")
    _check_class(cls, where, "ClientPart")
    return cls


def check_model_codec(codec: Any, spec_name: str) -> Any:
    """``codec`` if it has ``read(content)`` and ``write(content, arrays)``; else a ``PartContractError``."""
    missing = [hook for hook in ("read", "write") if _lacks(codec, hook)]
    if missing:
        raise PartContractError(f"{_where(spec_name, 'model codec', codec)} has no {' or '.join(missing)} hook "
                                "(ModelCodec, fedsim.engine.parts)")
    return codec


def _resolve(target: Any) -> Any:
    """``"module:name"`` imported and looked up; anything else (a class, an object, None) as it is."""
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
    an associative ``reduce``, so one node may serve several clients. ``check(config)``: cross-field rules.

    What the engine needs to know of an algorithm is declared here, never probed on its parameters:

    - ``model_codec``: how to read and write the model in a train message and its reply (a ``ModelCodec`` of
      ``fedsim.engine.parts``: ``read(content) -> dict[str, ndarray] | None``, ``write(content, arrays)``; an
      object or a ``"module:object"`` path). The byzantine clients of ``simulation.byzantine_fraction`` rewrite a
      reply's model through it; a strategy without one refuses them (``model_replies`` is False).
    - ``server_holdout(params) -> float``: the share of the training split the server keeps from every client
      when the scenario leaves ``data.server_holdout`` unset (FedDF's distillation data); None: 0.
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
    model_codec: Any = None
    server_holdout: Callable[[Any], float] | None = None
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"StrategySpec.kind must be one of {STRATEGY_KINDS}, got {self.kind!r}")
        if self.stream not in STREAM_KINDS:
            raise ValueError(f"StrategySpec.stream must be one of {STREAM_KINDS}, got {self.stream!r}")

    @property
    def model_replies(self) -> bool:
        """The client part replies with a model the engine can read (a ``model_codec`` is declared)."""
        return self.model_codec is not None

    def server_class(self) -> type:
        """The server part (imported on first use), checked against ``ServerPart`` (``PartContractError``)."""
        return check_server_part(_resolve(self.server), self.name)

    def client_class(self) -> type | None:
        """The client part (imported on first use; None for server-only strategies), checked against
        ``ClientPart`` (and ``ReducibleClientPart`` where ``reducible``)."""
        cls = _resolve(self.client)
        return None if cls is None else check_client_part(cls, self.name, self.reducible)

    def model_codec_object(self) -> Any:
        """The declared ``model_codec`` (imported on first use), checked against ``ModelCodec``; None where there
        is none."""
        codec = _resolve(self.model_codec)
        return None if codec is None else check_model_codec(codec, self.name)


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
