"""The strategy registry: a name -> its parameters, its server part and its client part.

Registration is declarative and cheap: a strategy's protocol module (``fedsim/algorithms/<algo>/protocol.py``) registers a
``StrategySpec`` whose server and client parts are named by import path (``"fedsim.strategies.afl:AFLServer"``), so
listing and validating strategies imports neither torch nor any training code; the parts are imported when a run
needs them. The server part (``fedsim/strategies/``) and the client part (``fedsim/clients/``) never import each
other: both import the protocol. Third-party strategies register the same way from a module named in the
``fedsim.plugins`` entry-point group, or from a plugin file given as ``fedsim run/validate/list/deploy --plugin
path/to/file.py`` (``load_plugin``): the file is imported under its own name (``file.py`` -> module ``file``) and
its path is recorded in ``FEDSIM_PLUGINS`` (the environment every process fedsim starts inherits: Ray workers,
SuperLink, SuperNodes), so each process imports it in ``discover()`` and a part named ``"file:Class"`` resolves
there too. Discovery runs before a scenario's names (``data.name``, ``model.name``, ...) are checked
(``fedsim.catalog.names`` asks for it), so a plugin may add names as well as strategies.

Parts are checked when they are registered (a class given as a class: ``check_client_part`` and
``check_server_part`` at once) and by ``check_parts(spec, clients_per_node)`` before a run starts (``fedsim
validate``, ``run``, ``deploy``): a part named by import path is checked on its source (``ast``; no import, so no
torch), e.g. a client part without ``reduce`` where the spec says ``reducible`` or where a node serves several
clients (``fedsim deploy`` with fewer SuperNodes than clients: ``check_nodes``).

The engine builds the parts through ``server_class()`` / ``client_class()``, which check them against their
contracts (``fedsim.engine.parts.ServerPart`` / ``ClientPart``: the hooks exist, ``__init__`` takes the parameters,
``reduce`` exists where ``reducible`` is declared) and raise ``PartContractError`` naming a missing hook.

This module imports nothing from ``fedsim.config``; the config imports it to find a strategy's parameters.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsim import catalog
from fedsim.catalog import STRATEGY_KINDS
from fedsim.catalog import STREAM_KINDS
from fedsim.errors import ConfigError

ENTRY_POINT_GROUP = "fedsim.plugins"
PLUGINS_ENV = "FEDSIM_PLUGINS"  # the plugin files of this command, os.pathsep-separated absolute paths


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
    an associative ``reduce``, so one node may serve several clients. ``client_addressed``: the server part runs a
    Flower strategy on ``fedsim.engine.client_grid`` wherever a node serves several clients, so each client's
    message gets that client's own reply and nothing is reduced: a node may serve several clients without
    ``reduce`` (the robust rules, q-FedAvg, DP). ``check(config)``: cross-field rules.

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
    client_addressed: bool = False
    model_codec: Any = None
    server_holdout: Callable[[Any], float] | None = None
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"StrategySpec.kind must be one of {STRATEGY_KINDS}, got {self.kind!r}")
        if self.stream not in STREAM_KINDS:
            raise ValueError(f"StrategySpec.stream must be one of {STREAM_KINDS}, got {self.stream!r}")

    @property
    def groups_clients(self) -> bool:
        """One node may serve several clients (``simulation.clients_per_node > 1``): their replies are reduced,
        or each is addressed and answered on its own."""
        return self.reducible or self.client_addressed

    def needs_reduce(self, clients_per_node: int) -> bool:
        """The client part must have ``reduce``: declared reducible, or a node combines several clients' replies
        (it serves several and the server does not address them one by one)."""
        return self.reducible or (clients_per_node > 1 and not self.client_addressed)

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
    """Add ``spec``; registering the same name twice with different parts is a programming error. Parts given as
    classes are checked here (``PartContractError``); parts named by import path by ``check_parts``."""
    old = _REGISTRY.get(spec.name)
    if old is not None and (old.server != spec.server or old.client != spec.client):
        raise ValueError(f"strategy {spec.name!r} is registered twice")
    if inspect.isclass(spec.server):
        check_server_part(spec.server, spec.name)
    if inspect.isclass(spec.client):
        check_client_part(spec.client, spec.name, spec.reducible)
    _REGISTRY[spec.name] = spec
    return spec


# -- checks of the parts before a run, without importing them ---------------------------------------------------
def _source_tree(module: str) -> ast.Module | None:
    """The parsed source of ``module`` (found, not imported: its parent packages are); None where there is none."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin or not str(found.origin).endswith(".py"):
        return None
    return _parse(found.origin)


@functools.lru_cache(maxsize=256)
def _parse(origin: str) -> ast.Module | None:
    try:
        return ast.parse(Path(origin).read_text(encoding="utf-8"), filename=origin)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None


def _imported_names(tree: ast.Module, module: str) -> dict[str, str]:
    """Top-level ``from m import X as Y`` / ``import m as n`` of ``tree``: bound name -> ``m:X`` or ``m``."""
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                base = ".".join(parts[:len(parts) - node.level] + ([base] if base else []))
            for alias in node.names:
                names[alias.asname or alias.name] = f"{base}:{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
    return names


_NEUTRAL_BASES = {"object", "Protocol", "Generic", "ABC"}


@functools.lru_cache(maxsize=256)
def static_members(module: str, name: str, depth: int = 0) -> frozenset[str] | None:
    """The attribute names class ``module:name`` defines, its bases' included, read from the source with ``ast``
    (nothing is imported); None where that cannot be told (no source, a base built at run time, too deep)."""
    if depth > 8:
        return None
    tree = _source_tree(module)
    if tree is None:
        return None
    imports = _imported_names(tree, module)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if cls is None:  # e.g. re-exported from another module
        target = imports.get(name)
        if target and ":" in target:
            mod, _, attr = target.partition(":")
            return static_members(mod, attr, depth + 1)
        return None
    members: set[str] = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(node.name)
        elif isinstance(node, ast.Assign):
            members.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            members.add(node.target.id)
    for base in cls.bases:
        if isinstance(base, ast.Subscript):  # Generic[T], Base[X]
            base = base.value
        if isinstance(base, ast.Name):
            if base.id in _NEUTRAL_BASES:
                continue
            target = imports.get(base.id)
            if target is None:  # a class of the same module
                inherited = static_members(module, base.id, depth + 1)
            elif ":" in target:
                mod, _, attr = target.partition(":")
                inherited = static_members(mod, attr, depth + 1)
            else:
                inherited = None
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            target = imports.get(base.value.id)
            if target is None:
                return None
            mod = target.replace(":", ".")  # `from pkg import mod` then `mod.Base`, or `import mod`
            if mod in ("typing", "abc", "typing_extensions") and base.attr in _NEUTRAL_BASES:
                continue
            inherited = static_members(mod, base.attr, depth + 1)
        else:
            return None
        if inherited is None:
            return None
        members |= inherited
    return frozenset(members)


def _hooks_of(target: Any) -> tuple[Any, frozenset[str] | None]:
    """(the class itself when it is at hand without importing anything new, else None; the names it defines as
    read from its source, None where unknown)."""
    if target is None or not isinstance(target, str):
        return target, None
    module, _, name = target.partition(":")
    if module in sys.modules and hasattr(sys.modules[module], name):
        return getattr(sys.modules[module], name), None
    return None, static_members(module, name)


def check_parts(spec: StrategySpec, clients_per_node: int = 1) -> None:
    """Check ``spec``'s parts before a run, without importing what is not imported yet (no torch): the server part
    has ``run``, the client part ``train``, and ``reduce`` where the spec declares ``reducible`` or a node combines
    several clients' replies (``StrategySpec.needs_reduce``). A part named by import path is read from its source;
    one whose hooks cannot be told from it is checked when the engine builds it. Raises ``ConfigError`` naming
    ``strategy.name``."""
    def refuse(exc: Exception) -> None:
        raise ConfigError(f"strategy.name: {spec.name!r}: {exc}") from None

    if clients_per_node > 1 and not spec.groups_clients:
        refuse(PartContractError(
            f"a node serving {clients_per_node} clients needs a client part that combines their replies (declared "
            "reducible=True, with reduce(replies)) or a server that addresses each client (client_addressed=True); "
            "this strategy has neither, so one client per node"))
    server, server_hooks = _hooks_of(spec.server)
    try:
        if server is not None:
            check_server_part(server, spec.name)
        elif server_hooks is not None and "run" not in server_hooks:
            raise PartContractError(f"strategy {spec.name!r}: server part {spec.server} has no run(ctx) hook "
                                    "(ServerPart, fedsim.engine.parts)")
        client, client_hooks = _hooks_of(spec.client)
        if client is not None:
            check_client_part(client, spec.name, spec.needs_reduce(clients_per_node))
        elif client_hooks is not None:
            if "train" not in client_hooks:
                raise PartContractError(f"strategy {spec.name!r}: client part {spec.client} has no train(content, "
                                        "env) hook (ClientPart, fedsim.engine.parts)")
            if spec.needs_reduce(clients_per_node) and "reduce" not in client_hooks:
                raise PartContractError(f"strategy {spec.name!r}: client part {spec.client} has no reduce(replies) "
                                        "hook, but the spec declares reducible=True (ReducibleClientPart, "
                                        "fedsim.engine.parts)")
    except PartContractError as exc:
        refuse(exc)


def check_nodes(spec: StrategySpec, num_clients: int, nodes: int) -> None:
    """``fedsim deploy --nodes nodes``: each SuperNode serves ceil(num_clients / nodes) clients, so more than one
    needs a strategy that groups clients (``StrategySpec.groups_clients``); a ``ConfigError`` saying which
    ``--nodes`` works otherwise."""
    per_node = -(-int(num_clients) // max(1, int(nodes)))
    if per_node > 1 and not spec.groups_clients:
        raise ConfigError(
            f"--nodes {nodes}: {num_clients} clients on {nodes} SuperNodes puts {per_node} clients on a node, which "
            f"needs a client part that combines their replies (reducible=True, with reduce) or a server that "
            f"addresses each client; {spec.name!r} has neither: use --nodes {num_clients} (one client per "
            "SuperNode)")
    check_parts(spec, per_node)


def check_variants(loaded: list, nodes: int | None = None) -> None:
    """Every (label, config) variant's parts against their contracts, before anything starts (torch-free: the
    parts' source is read, not imported); with ``nodes``, for a deployment on that many SuperNodes
    (``check_nodes``). A ``ConfigError`` names the variant where there are several."""
    for label, config in loaded:
        spec = get_strategy(config.strategy.name)
        try:
            if nodes is None:
                check_parts(spec, config.simulation.clients_per_node)
            else:
                check_nodes(spec, config.num_clients, nodes)
        except ConfigError as exc:
            raise ConfigError(f"variant {label!r}: {exc}" if len(loaded) > 1 else str(exc)) from None


# -- plugins ----------------------------------------------------------------------------------------------------
def plugin_files() -> dict[str, Path]:
    """The plugin files of this process and its parent (``FEDSIM_PLUGINS``): module name -> path."""
    out: dict[str, Path] = {}
    for item in os.environ.get(PLUGINS_ENV, "").split(os.pathsep):
        if item.strip():
            path = Path(item.strip())
            out.setdefault(path.stem, path)
    return out


class _PluginFinder(importlib.abc.MetaPathFinder):
    """Finds the plugin files of ``FEDSIM_PLUGINS`` by their module name, in every process (last on
    ``sys.meta_path``: an installed module of that name is refused by ``load_plugin``, never shadowed)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if path is not None or "." in name:
            return None
        file = plugin_files().get(name)
        if file is None or not file.is_file():
            return None
        return importlib.util.spec_from_file_location(name, file)


if not any(isinstance(f, _PluginFinder) for f in sys.meta_path):
    sys.meta_path.append(_PluginFinder())


def _remember_plugin(path: Path) -> None:
    known = [p for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p.strip()]
    if str(path) not in known:
        os.environ[PLUGINS_ENV] = os.pathsep.join([*known, str(path)])


def _forget_plugin(path: Path) -> None:
    known = [p for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p.strip() and p != str(path)]
    if known:
        os.environ[PLUGINS_ENV] = os.pathsep.join(known)
    else:
        os.environ.pop(PLUGINS_ENV, None)


def load_plugin(path: str | os.PathLike) -> str:
    """Import the plugin file ``path`` (``--plugin``) under its own name (``my_method.py`` -> ``my_method``) after
    the shipped strategies and the entry points, and record it for the processes this one starts; its module name.
    A missing file, a name taken by another module or an error while importing it is a ``ConfigError`` naming
    ``--plugin``."""
    given = str(path)
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--plugin {given}: no such file; give the path of a Python file that calls "
                          "register_strategy(...)")
    if file.suffix != ".py":
        raise ConfigError(f"--plugin {given}: not a .py file")
    file = file.resolve()
    name = file.stem
    if not name.isidentifier():
        raise ConfigError(f"--plugin {given}: {name!r} is not a Python module name; rename the file (letters, "
                          "digits and '_', not starting with a digit)")
    other = plugin_files().get(name)
    if other is not None and other.resolve() != file:
        raise ConfigError(f"--plugin {given}: another plugin file has the module name {name!r} ({other}); rename "
                          "one of them")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == file:
            _remember_plugin(file)
            return name
        raise ConfigError(f"--plugin {given}: the module name {name!r} is taken by {loaded!r}; rename the file")
    found = importlib.util.find_spec(name) if other is None else None
    if found is not None and (not found.origin or Path(found.origin).resolve() != file):  # itself, on sys.path: fine
        raise ConfigError(f"--plugin {given}: the module name {name!r} is taken by an installed module "
                          f"({found.origin}); rename the file")
    discover()  # the shipped strategies first: a plugin that registers one of their names is refused clearly
    _remember_plugin(file)
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 -- reported as the user's file failing, with where it failed
        sys.modules.pop(name, None)
        _forget_plugin(file)
        frames = [f for f in _traceback_frames(exc) if Path(f[0]).resolve() == file]
        where = f" (line {frames[-1][1]})" if frames else ""
        raise ConfigError(f"--plugin {given}: importing it failed{where}: {type(exc).__name__}: {exc}") from None
    return name


def _traceback_frames(exc: BaseException) -> list[tuple[str, int]]:
    import traceback

    return [(f.filename, f.lineno or 0) for f in traceback.extract_tb(exc.__traceback__)]


def load_plugins(paths: Any) -> list[str]:
    """``load_plugin`` for each of ``paths`` (``--plugin``, repeatable), in order."""
    return [load_plugin(p) for p in (paths or ())]


def _import(module: str, label: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # reported when a strategy is looked up, and by `fedsim list`
        _BROKEN[label] = f"{type(exc).__name__}: {exc}"


def discover() -> None:
    """Import the protocol module of every package in ``fedsim.algorithms``, every ``fedsim.plugins`` entry point
    and every plugin file of ``FEDSIM_PLUGINS`` (once per process; a plugin file loaded later by ``load_plugin``
    is imported then).

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
    for name, path in plugin_files().items():
        _import(name, f"plugin {path}")


_discover = discover  # the name the engine and older plugins used
catalog.before_lookup(discover)  # a scenario's names are checked after the plugins registered theirs


def get_strategy(name: Any) -> StrategySpec:
    discover()
    if name not in _REGISTRY:
        broken = "".join(f"; {path} failed to import ({err})" for path, err in _BROKEN.items())
        raise ConfigError(
            f"strategy.name: {name!r} is not a known strategy; choose one of {', '.join(sorted(_REGISTRY))}{broken}"
        )
    return _REGISTRY[name]


def broken_strategy_modules() -> dict[str, str]:
    """Strategy modules that failed to import, with their errors."""
    discover()
    return dict(_BROKEN)


def strategies() -> dict[str, StrategySpec]:
    discover()
    return dict(sorted(_REGISTRY.items()))
