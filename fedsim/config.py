"""Scenario files: TOML -> one validated, typed ``ScenarioConfig``.

Every setting is read in exactly one place (here) and every invalid field raises a ``ConfigError`` whose message
starts with the dotted field name, then the value, then what is allowed. Strategy parameters are validated against
the dataclass the strategy registers, so a typo in ``[strategy]`` is an error, not a silently ignored key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError


def _choice(path: str, value: Any, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _positive(path: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}: {value!r} is out of range; it must be a finite number {bound}")


def _fraction(path: str, value: float, *, closed_right: bool = True) -> None:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        right = "1]" if closed_right else "1)"
        raise ConfigError(f"{path}: {value!r} is out of range; it must lie in [0, {right}")


@dataclass
class DataConfig:
    """Which dataset, where its files are, and optional slices for quick runs."""

    name: str = "fashion-mnist"
    root: str | None = None
    max_train: int | None = None  # keep the first n of a seeded permutation (quick runs, tests)
    max_test: int | None = None
    options: dict = field(default_factory=dict)  # dataset-specific, e.g. synthetic: separation, dim

    def validate(self, path: str = "data") -> None:
        from fedsim.data import dataset_names

        _choice(f"{path}.name", self.name, dataset_names())
        for key in ("max_train", "max_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{path}.{key}: {value!r} is out of range; it must be >= 1 or left unset")


@dataclass
class PartitionConfig:
    """How the training set is split over the simulated clients."""

    kind: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5  # dirichlet concentration (smaller = more label skew)
    classes_per_client: int = 2  # shards
    quantity_alpha: float = 1.0  # quantity skew
    min_partition_size: int = 0

    def validate(self, path: str = "partition") -> None:
        from fedsim.partition import PARTITIONS

        _choice(f"{path}.kind", self.kind, PARTITIONS)
        if self.num_clients < 1:
            raise ConfigError(f"{path}.num_clients: {self.num_clients!r} is out of range; it must be >= 1")
        _positive(f"{path}.alpha", self.alpha)
        _positive(f"{path}.quantity_alpha", self.quantity_alpha)
        if self.classes_per_client < 1:
            raise ConfigError(
                f"{path}.classes_per_client: {self.classes_per_client!r} is out of range; it must be >= 1"
            )
        _positive(f"{path}.min_partition_size", self.min_partition_size, allow_zero=True)


STREAM_KINDS = ("none", "class-incremental", "online")


@dataclass
class StreamConfig:
    """Continual-learning streams: tasks of new classes, or a single online pass."""

    kind: str = "none"
    tasks: int = 5
    first_task_classes: int | None = None
    batch_size: int = 10  # online
    imbalance: str = "none"  # online: "none" | "long-tail"
    imbalance_ratio: float = 100.0
    classes_over_time: bool = True

    def validate(self, path: str = "stream") -> None:
        _choice(f"{path}.kind", self.kind, STREAM_KINDS)
        if self.tasks < 1:
            raise ConfigError(f"{path}.tasks: {self.tasks!r} is out of range; it must be >= 1")
        if self.first_task_classes is not None and self.first_task_classes < 1:
            raise ConfigError(f"{path}.first_task_classes: {self.first_task_classes!r} must be >= 1 or unset")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size: {self.batch_size!r} is out of range; it must be >= 1")
        _choice(f"{path}.imbalance", self.imbalance, ("none", "long-tail"))
        if self.imbalance_ratio < 1:
            raise ConfigError(f"{path}.imbalance_ratio: {self.imbalance_ratio!r} is out of range; it must be >= 1")


@dataclass
class ModelConfig:
    """The trainable network (gradient strategies) and the frozen feature map (analytic strategies)."""

    name: str = "cnn"
    width: int | None = None
    feature_map: str = "random"  # identity | random | a torchvision backbone name
    feature_dim: int = 2048  # width of the random feature map
    weights: str | None = None  # torchvision weights name, e.g. "IMAGENET1K_V1" (needs a download)

    def validate(self, path: str = "model") -> None:
        from fedsim.models import MODELS

        _choice(f"{path}.name", self.name, MODELS)
        if self.width is not None and self.width < 1:
            raise ConfigError(f"{path}.width: {self.width!r} is out of range; it must be >= 1 or unset")
        if self.feature_dim < 1:
            raise ConfigError(f"{path}.feature_dim: {self.feature_dim!r} is out of range; it must be >= 1")
        if not self.feature_map or not isinstance(self.feature_map, str):
            raise ConfigError(f"{path}.feature_map: {self.feature_map!r} must be 'identity', 'random' or a "
                              "torchvision model name")


@dataclass
class ClientConfig:
    """Local training on each client (gradient strategies)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"

    def validate(self, path: str = "client") -> None:
        if self.epochs < 0:
            raise ConfigError(f"{path}.epochs: {self.epochs!r} is out of range; it must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size: {self.batch_size!r} is out of range; it must be >= 1")
        _positive(f"{path}.lr", self.lr)
        _fraction(f"{path}.momentum", self.momentum, closed_right=False)
        _positive(f"{path}.weight_decay", self.weight_decay, allow_zero=True)
        _choice(f"{path}.optimizer", self.optimizer, ("sgd", "adam"))


@dataclass
class SimulationConfig:
    """How Flower runs the clients: backend, resources per client, grouping, injected failures."""

    backend: str = "ray"  # "ray" (Flower's simulation engine) | "inline" (same apps, in-process, for debugging)
    num_cpus: float = 1.0  # per client (Ray actor)
    num_gpus: float | None = None  # per client; None = 0 where no GPU is visible, else 1 / clients per GPU
    clients_per_node: int = 1  # >1: one Flower node serves a group of clients (needs a reducible client part)
    failure_rate: float = 0.0  # fraction of clients that fail in each round (seeded)
    timeout: float = 3600.0  # seconds to wait for replies in a round
    ray_address: str | None = None  # join an existing Ray cluster ("auto" or "ray://host:port")
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    verbose: bool = False

    def validate(self, path: str = "simulation") -> None:
        _choice(f"{path}.backend", self.backend, ("ray", "inline"))
        _positive(f"{path}.num_cpus", self.num_cpus)
        if self.num_gpus is not None:
            _positive(f"{path}.num_gpus", self.num_gpus, allow_zero=True)
        if self.clients_per_node < 1:
            raise ConfigError(f"{path}.clients_per_node: {self.clients_per_node!r} is out of range; it must be >= 1")
        _fraction(f"{path}.failure_rate", self.failure_rate, closed_right=False)
        _positive(f"{path}.timeout", self.timeout)
        _choice(f"{path}.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class EvaluationConfig:
    """When the server evaluates the global model on the test set."""

    every: int = 1  # rounds between evaluations (the last round is always evaluated)
    batch_size: int = 1024

    def validate(self, path: str = "evaluation") -> None:
        if self.every < 1:
            raise ConfigError(f"{path}.every: {self.every!r} is out of range; it must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size: {self.batch_size!r} is out of range; it must be >= 1")


@dataclass
class StrategyConfig:
    """The algorithm: a registry name and its own validated parameters."""

    name: str = "fedavg"
    params: Any = None  # the strategy's params dataclass instance

    def to_dict(self) -> dict:
        out = {"name": self.name}
        if self.params is not None:
            out.update(dataclasses.asdict(self.params))
        return out


@dataclass
class ScenarioConfig:
    """A whole experiment; the single object every part of fedsim reads its settings from."""

    seed: int = 0
    rounds: int = 1
    name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    @property
    def num_clients(self) -> int:
        return self.partition.num_clients

    @property
    def num_nodes(self) -> int:
        """Flower nodes needed: one per group of ``clients_per_node`` clients."""
        return -(-self.partition.num_clients // self.simulation.clients_per_node)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, StrategyConfig):
                out[f.name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = value
        return out


_SECTIONS = {
    "data": DataConfig,
    "partition": PartitionConfig,
    "stream": StreamConfig,
    "model": ModelConfig,
    "client": ClientConfig,
    "simulation": SimulationConfig,
    "evaluation": EvaluationConfig,
}
_TOP_LEVEL = {"seed": int, "rounds": int, "name": str | None}


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args) + (
        " (or unset)" if _is_union(tp) and type(None) in typing.get_args(tp) else ""
    )


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} has the wrong type; it must be {_type_name(tp)}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (dict, typing.Dict) and isinstance(value, dict):  # noqa: UP006
        return dict(value)
    origin = typing.get_origin(tp)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{path}: {value!r} has the wrong type; it must be {_type_name(tp)}")


def build_dataclass(cls: type, values: dict, path: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, naming ``path.key`` on unknown keys or wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(
                f"{path}.{key}: unknown setting; allowed settings here are {', '.join(allowed) or '(none)'}"
            )
        kwargs[key] = _coerce(f"{path}.{key}", value, hints[key])
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as TOML (numbers, booleans, quoted strings, arrays); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, creating tables as needed."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}: empty key part; use dotted keys such as partition.alpha=0.1")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key!r} is a value, not a table, so it has no field {keys[-1]!r}")
    node[keys[-1]] = value


def parse_overrides(items: typing.Iterable[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set partition.alpha=0.1")
        key, _, value = item.partition("=")
        out.append((key.strip(), parse_value(value.strip())))
    return out


def config_from_dict(tree: dict) -> ScenarioConfig:
    """Validate a raw scenario tree (as loaded from TOML) into a ``ScenarioConfig``."""
    from fedsim.engine.registry import get_strategy

    tree = copy.deepcopy(tree)
    tree.pop("variants", None)
    strategy_name = (tree.get("strategy") or {}).get("name", "fedavg") if isinstance(tree.get("strategy"), dict) \
        else None
    if strategy_name is not None:
        spec = get_strategy(strategy_name)
        if spec.prepare is not None:
            tree = spec.prepare(tree)
    known = set(_SECTIONS) | set(_TOP_LEVEL) | {"strategy"}
    for key in tree:
        if key not in known:
            raise ConfigError(f"{key}: unknown setting; top-level settings are {', '.join(sorted(known))}")
    top = {k: _coerce(k, tree[k], tp) for k, tp in _TOP_LEVEL.items() if k in tree}
    if top.get("rounds", 1) < 1:
        raise ConfigError(f"rounds: {top['rounds']!r} is out of range; it must be >= 1")
    if top.get("seed", 0) < 0:
        raise ConfigError(f"seed: {top['seed']!r} is out of range; it must be >= 0")
    sections = {name: build_dataclass(cls, tree.get(name, {}), name) for name, cls in _SECTIONS.items()}

    strategy_tree = dict(tree.get("strategy", {}))
    if not isinstance(strategy_tree, dict):
        raise ConfigError(f"strategy: expected a table, got {strategy_tree!r}")
    name = strategy_tree.pop("name", "fedavg")
    spec = get_strategy(name)  # raises ConfigError naming strategy.name
    params = build_dataclass(spec.params, strategy_tree, "strategy")
    config = ScenarioConfig(**top, **sections, strategy=StrategyConfig(name=name, params=params))
    _cross_checks(config)
    if spec.check is not None:
        spec.check(config)
    return config


def _cross_checks(config: ScenarioConfig) -> None:
    """Constraints that span sections."""
    sim = config.simulation
    if sim.clients_per_node > 1:
        from fedsim.engine.registry import get_strategy

        spec = get_strategy(config.strategy.name)
        if getattr(spec.client, "reduce", None) is None:
            raise ConfigError(
                f"simulation.clients_per_node: {sim.clients_per_node} needs a strategy whose client part can "
                f"combine replies (has `reduce`); {config.strategy.name!r} has none, so use 1"
            )


def load_scenarios(path: str | Path | None, overrides: typing.Iterable[str] = (),
                   only: typing.Iterable[str] = ()) -> list[tuple[str, ScenarioConfig]]:
    """Load a scenario file into one (label, config) per variant (a single unnamed one when it has none).

    A scenario may list ``[[variants]]``, each with a ``label`` and a ``set`` table of dotted overrides, to run
    several strategies on the same data and partition (``fedsim report`` then compares them).
    Command-line ``--set`` overrides apply to every variant, after the variant's own; a ``strategy.<param>``
    override applies to the variants whose strategy has that parameter (an error if none has). ``only`` keeps the
    variants with those labels.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"scenario: file {str(path)!r} does not exist")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"scenario: {path} is not valid TOML: {exc}") from None
    cli = parse_overrides(overrides)
    variants = tree.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError("variants: expected an array of tables ([[variants]] with label and set)")
    out = []
    labels = set()
    for i, variant in enumerate(variants):
        unknown = set(variant) - {"label", "set"}
        if unknown:
            raise ConfigError(f"variants[{i}].{sorted(unknown)[0]}: unknown setting; allowed settings are label, set")
        base = copy.deepcopy({k: v for k, v in tree.items() if k != "variants"})
        for key, value in (variant.get("set") or {}).items():
            apply_override(base, key, value)
        for key, value in cli:
            if len(variants) > 1 and not _strategy_accepts(base, key):
                continue  # e.g. --set strategy.draws=256 tunes the variants whose strategy has `draws`
            apply_override(base, key, value)
        config = config_from_dict(base)
        label = variant.get("label") or config.name or config.strategy.name
        if label in labels:
            raise ConfigError(f"variants[{i}].label: {label!r} is used twice; labels name run directories")
        labels.add(label)
        out.append((label, config))
    for key, _ in cli:
        if len(variants) > 1 and not any(_strategy_accepts(config.to_dict(), key) for _, config in out):
            raise ConfigError(f"{key}: no variant's strategy has this setting "
                              f"({', '.join(sorted({c.strategy.name for _, c in out}))})")
    return select_variants(out, only)


def select_variants(variants: list[tuple[str, ScenarioConfig]], only: typing.Iterable[str]
                    ) -> list[tuple[str, ScenarioConfig]]:
    """The variants labelled in ``only`` (all of them when it is empty); an unknown label is a ConfigError."""
    only = list(only)
    if not only:
        return variants
    labels = [label for label, _ in variants]
    unknown = [name for name in only if name not in labels]
    if unknown:
        raise ConfigError(f"--only {unknown[0]}: no such variant; variants are {', '.join(labels)}")
    return [(label, config) for label, config in variants if label in only]


def _strategy_accepts(tree: dict, dotted: str) -> bool:
    """Whether a ``strategy.<param>`` override fits the strategy named in ``tree`` (other keys always fit)."""
    keys = dotted.split(".")
    if keys[0] != "strategy" or len(keys) != 2 or keys[1] == "name":
        return True
    from fedsim.engine.registry import get_strategy

    name = (tree.get("strategy") or {}).get("name", "fedavg")
    try:
        spec = get_strategy(name)
    except ConfigError:
        return True  # let validation report the bad name
    return keys[1] in {f.name for f in dataclasses.fields(spec.params)}


def load_scenario(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> ScenarioConfig:
    """Load a scenario that has no variants (or take its first)."""
    return load_scenarios(path, overrides)[0][1]
