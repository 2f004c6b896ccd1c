"""Scenario files: TOML -> one validated, typed ``ScenarioConfig``.

Every setting is read in exactly one place (here) and every invalid field raises a ``ConfigError`` whose message
starts with the dotted field name, then the value, then what is allowed. Strategy parameters are validated against
the dataclass the strategy registers, so a typo in ``[strategy]`` is an error, not a silently ignored key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim import catalog
from fedsim.errors import ConfigError
from fedsim.params import Interval, Options, check_choice, validate_params
from fedsim.registry import StrategySpec, get_strategy

# shorthands for the declared constraints below
POSITIVE = Interval(0, None, closed="neither")
NON_NEGATIVE = Interval(0, None)
AT_LEAST_1 = Interval(1, None, integer=True)
AT_LEAST_0 = Interval(0, None, integer=True)
FRACTION = Interval(0, 1)
FRACTION_OPEN = Interval(0, 1, closed="left")

LABEL_PATTERN = re.compile(r"[A-Za-z0-9._-]+")  # the whole label (fullmatch: no trailing newline slips through)
MAX_LABEL_LENGTH = 100  # a label is one directory name (< 255 bytes), with room for sweep points and seed folders
MAX_DEPTH = 32  # tables and arrays nested deeper than this are no scenario (a scenario needs 4)


def _choice(path: str, value: Any, allowed: typing.Iterable[str]) -> None:
    check_choice(path, value, allowed)


class _OptionsOr(Options):
    """One of ``values``, or a value ``accept(value)`` admits (a factory model, an ``hf:<id>`` dataset)."""

    def __init__(self, values: typing.Iterable[Any], accept: typing.Callable[[Any], bool], forms: str) -> None:
        super().__init__(values)
        object.__setattr__(self, "source", values)  # a catalog registry: read when checked (plugins add names)
        object.__setattr__(self, "accept", accept)
        object.__setattr__(self, "forms", forms)

    def accepts(self, value: Any) -> bool:
        return Options(catalog.live(self.source)).accepts(value) or bool(self.accept(value))

    def describe(self) -> str:
        return f"{Options(catalog.live(self.source)).describe()}, or {self.forms}"


@dataclass
class DataConfig:
    """Which dataset, where its files are, and optional slices for quick runs."""

    name: str = "fashion-mnist"
    root: str | None = None
    path: str | None = None  # npz: the .npz file; hf: a save_to_disk directory or parquet file(s)
    max_train: int | None = None  # keep the first n of a seeded permutation (quick runs, tests)
    max_test: int | None = None
    options: dict = field(default_factory=dict)  # dataset-specific, e.g. synthetic: separation, dim
    # fraction of the training split that the server keeps and no client holds (FedDF's unlabeled distillation
    # data); unset: what the strategy needs (FedDF: 0.1, every other strategy: 0). Set it in a scenario that
    # compares strategies so that all of them partition the same client data (fedsim.scenario.server_holdout)
    server_holdout: float | None = None

    _parameter_constraints = {"name": [_OptionsOr(catalog.DATASETS, catalog.is_dataset_name, "'hf:<dataset id>'")],
                              "max_train": [AT_LEAST_1, None],
                              "max_test": [AT_LEAST_1, None], "server_holdout": [FRACTION_OPEN, None]}

    def check(self, path: str) -> None:
        for key, value in self.options.items():  # the dataset's loader takes them as keyword arguments
            if isinstance(value, (dict, list, tuple)) or value is None:
                raise ConfigError(f"{path}.options.{key}: {value!r} has the wrong type; dataset options are plain "
                                  "values (numbers, strings, true or false), not tables or arrays")
        own = self.name == "npz" or self.name == "hf" or self.name.startswith(catalog.HF_PREFIX)
        if self.path is not None and not own:
            raise ConfigError(f"{path}.path: {self.path!r} is for data.name = \"npz\" or \"hf\" / \"hf:<id>\"; "
                              f"dataset {self.name!r} reads data.root")
        if self.path is not None and not self.path:
            raise ConfigError(f"{path}.path: must not be empty")
        if self.name in ("npz", "hf") and self.path is None and "path" not in self.options:
            what = "a .npz file holding x_train, y_train, x_test, y_test" if self.name == "npz" else \
                "a save_to_disk directory or parquet file(s) (or use data.name = \"hf:<id>\" to download)"
            raise ConfigError(f"{path}.path: dataset {self.name!r} needs data.path, {what}")


@dataclass
class PartitionConfig:
    """How the training set is split over the simulated clients."""

    kind: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5  # dirichlet concentration (smaller = more label skew)
    classes_per_client: int = 2  # shards
    quantity_alpha: float = 1.0  # quantity skew
    min_partition_size: int = 0
    self_balancing: bool = False  # dirichlet: no share of later classes for a client above N / num_clients (FuseFL's
    #                               official sampler; with min_partition_size = 10 the paper's partition)
    by: str | None = None  # natural: the training data's column naming each sample's client (writer, user, device)
    sample_groups: bool = False  # natural: keep a seeded draw of num_clients of the column's values (else all)
    params: dict = field(default_factory=dict)  # a plugin's partition kind: its keyword arguments
    # share of each client's partition held out as its local test data (seeded, stratified where possible) and
    # removed from what it trains on; evaluation.mode = "local" / "both" measures on it (fedsim.data.local_split)
    test_fraction: float = 0.0

    _parameter_constraints = {"kind": [catalog.RegisteredNames("partitions")], "num_clients": [AT_LEAST_1],
                              "alpha": [POSITIVE], "quantity_alpha": [POSITIVE],
                              "classes_per_client": [AT_LEAST_1], "min_partition_size": [AT_LEAST_0],
                              "self_balancing": [Options((False, True))], "test_fraction": [FRACTION_OPEN],
                              "sample_groups": [Options((False, True))]}

    def check(self, path: str) -> None:
        if self.self_balancing and self.kind != "dirichlet":
            raise ConfigError(f"{path}.self_balancing: only the dirichlet partition balances itself, got kind "
                              f"{self.kind!r}; set kind = \"dirichlet\" or self_balancing = false")
        if self.kind == "natural" and not self.by:
            raise ConfigError(f"{path}.by: the natural partition needs the column that names each sample's client, "
                              "e.g. by = \"writer\" (npz: an array writer_train; hf: a column)")
        if self.by is not None and self.kind != "natural":
            raise ConfigError(f"{path}.by: {self.by!r} is read by the natural partition only, got kind "
                              f"{self.kind!r}; set kind = \"natural\" or leave by out")
        if self.sample_groups and self.kind != "natural":
            raise ConfigError(f"{path}.sample_groups: only the natural partition samples its groups, got kind "
                              f"{self.kind!r}; set kind = \"natural\" or sample_groups = false")
        if self.params:
            from fedsim.data.partition import PARTITIONERS

            if self.kind not in PARTITIONERS:
                raise ConfigError(f"{path}.params: {self.params!r} is passed to a plugin's partition only; the "
                                  f"built-in kind {self.kind!r} takes its settings as partition fields")


STREAM_KINDS = catalog.STREAM_KINDS


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
    # class-incremental: classes recur across tasks (Si-Blurry, G-ACIL's setting; fedsim.data.streams.
    # generalized_class_incremental): N = disjoint_fraction of the classes live in one task, M = blurry_fraction
    # of each other class's samples are dealt to every task; read by strategies whose tasks() hook builds it
    generalized: bool = False
    disjoint_fraction: float = 0.5
    blurry_fraction: float = 0.1

    _parameter_constraints = {"kind": [Options(STREAM_KINDS)], "tasks": [AT_LEAST_1],
                              "first_task_classes": [AT_LEAST_1, None], "batch_size": [AT_LEAST_1],
                              "imbalance": [Options(("none", "long-tail"))],
                              "imbalance_ratio": [Interval(1, None)], "generalized": [Options((False, True))],
                              "disjoint_fraction": [Interval(0, 1, closed="right")],
                              "blurry_fraction": [Interval(0, 1)]}

    def check(self, path: str) -> None:
        if self.generalized and self.kind != "class-incremental":
            raise ConfigError(f"{path}.generalized: recurring classes are a class-incremental stream, got kind "
                              f"{self.kind!r}; set kind = \"class-incremental\" or generalized = false")
        if self.generalized and self.first_task_classes is not None:
            raise ConfigError(f"{path}.first_task_classes: a generalized stream splits its classes by "
                              f"disjoint_fraction; leave first_task_classes out")


@dataclass
class ModelConfig:
    """The trainable network (gradient strategies) and the frozen feature map (analytic strategies)."""

    name: str = "cnn"
    width: int | None = None
    feature_map: str = "random"  # identity | random | a torchvision backbone name
    feature_dim: int = 2048  # width of the random feature map
    weights: str | None = None  # torchvision weights name, e.g. "IMAGENET1K_V1" (needs a download)
    params: dict = field(default_factory=dict)  # a factory model's keyword arguments (model.name = "pkg.mod:fn")

    _parameter_constraints = {"name": [_OptionsOr(catalog.MODELS, catalog.is_factory_name, catalog.FACTORY_FORMS)],
                              "width": [AT_LEAST_1, None], "feature_dim": [AT_LEAST_1]}

    def check(self, path: str) -> None:
        factory = catalog.is_factory_name(self.name)
        if self.params and not factory:
            raise ConfigError(f"{path}.params: {self.params!r} is passed to a factory model (model.name = "
                              f"\"package.module:function\"); the built-in {self.name!r} takes model.width")
        if factory and self.width is not None:
            raise ConfigError(f"{path}.width: {self.width!r} is for the built-in models; pass a factory's "
                              f"settings in model.params")
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

    _parameter_constraints = {"epochs": [AT_LEAST_0], "batch_size": [AT_LEAST_1], "lr": [POSITIVE],
                              "momentum": [FRACTION_OPEN], "weight_decay": [NON_NEGATIVE],
                              "optimizer": [Options(("sgd", "adam"))]}


@dataclass
class SimulationConfig:
    """How Flower runs the clients: backend, resources per client, grouping, injected failures."""

    backend: str = "ray"  # "ray" (Flower's simulation engine) | "inline" (same apps, in-process, for debugging)
    num_cpus: float = 1.0  # per client (Ray actor)
    num_gpus: float | None = None  # per client; None = 0 where no GPU is visible, else 1 / clients per GPU
    clients_per_node: int = 1  # >1: one Flower node serves a group of clients (StrategySpec.groups_clients)
    failure_rate: float = 0.0  # fraction of clients that fail in each round (seeded)
    timeout: float = 3600.0  # seconds to wait for replies in a round
    ray_address: str | None = None  # join an existing Ray cluster ("auto" or "ray://host:port")
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    verbose: bool = False
    # byzantine clients (a seeded set, fixed for the run) replace their model update d = w_k - w_t by
    # factor * d: sign-flip: factor = -byzantine_scale (unset: -1); scale: +byzantine_scale (unset: 10).
    # Applied by the node to model replies of the gradient strategies (fedsim.engine.node.byzantine_clients)
    byzantine_fraction: float = 0.0
    byzantine_mode: str = "sign-flip"
    byzantine_scale: float | None = None

    _parameter_constraints = {"backend": [Options(("ray", "inline"))], "num_cpus": [POSITIVE],
                              "num_gpus": [NON_NEGATIVE, None], "clients_per_node": [AT_LEAST_1],
                              "failure_rate": [FRACTION_OPEN], "timeout": [POSITIVE],
                              "device": [Options(("auto", "cpu", "cuda"))], "byzantine_fraction": [FRACTION],
                              "byzantine_mode": [Options(("sign-flip", "scale"))],
                              "byzantine_scale": [POSITIVE, None]}


EVALUATION_MODES = ("global", "local", "both")


@dataclass
class EvaluationConfig:
    """When the server evaluates the global model on the test set."""

    every: int = 1  # rounds between evaluations (the last round is always evaluated)
    batch_size: int = 1024
    # per-client figures: "global" (the common test split, re-weighted to each client's label mix), "local" (each
    # client's held-out data, partition.test_fraction), "both"; the accuracy column is the test split's in all three
    mode: str = "global"

    _parameter_constraints = {"every": [AT_LEAST_1], "batch_size": [AT_LEAST_1],
                              "mode": [Options(EVALUATION_MODES)]}


@dataclass
class LoggingConfig:
    """Experiment tracking beside the run files; changes no result (so config.json lists it only when set)."""

    tensorboard: bool = False  # every metrics.csv row also as TensorBoard scalars in run_dir/tensorboard/
    # every metrics.csv row as MLflow metrics (step = round), the scenario as parameters, the summary at the end;
    # store: run_dir/mlflow.db (SQLite) unless mlflow_tracking_uri names one (sqlite:///runs/all.db, http://...)
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "fedsim"

    def check(self, path: str) -> None:
        import importlib.util

        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"{path}.tensorboard: true needs the tensorboard package, which is not installed; "
                              "pip install 'fedsim[tensorboard]' (or tensorboard), or leave it false")
        if self.mlflow and importlib.util.find_spec("mlflow") is None:
            raise ConfigError(f"{path}.mlflow: true needs the mlflow package, which is not installed; "
                              "pip install 'fedsim[mlflow]', or leave it false")
        if not str(self.mlflow_experiment).strip():
            raise ConfigError(f"{path}.mlflow_experiment: an empty name; give a name, e.g. \"fedsim\"")


@dataclass
class SystemConfig:
    """Cross-device realism (``[system]``; absent: no clock, today's behaviour): device profiles, availability,
    deadlines and over-selection, read by ``fedsim.engine.clock``. Units and the defaults' sources: docs/system.md."""

    trace: str | None = None  # CSV, one row per client: client,speed,download_mbps,upload_mbps (else drawn)
    speed_median: float = 200.0  # training samples per second (log-normal median; an assumption, docs/system.md)
    speed_sigma: float = 0.8  # log-standard deviation of the speeds
    download_median_mbps: float = 20.0  # Mbit/s
    download_sigma: float = 0.9
    upload_median_mbps: float = 5.0  # Mbit/s
    upload_sigma: float = 0.9
    availability: str = "always"  # "always" | "markov" (exponential online/offline periods) | "trace"
    online_mean_s: float = 3600.0  # markov: mean online period (s)
    offline_mean_s: float = 3600.0  # markov: mean offline period (s)
    availability_trace: str | None = None  # CSV, one row per online interval: client,start_s,end_s
    deadline_s: float | None = None  # a client that has not answered this long after the round began is dropped
    over_selection: float = 1.0  # select ceil(m * over_selection) available clients, keep the first m answers
    targets: list[float] = field(default_factory=list)  # accuracies for summary.json's time_to_accuracy

    _parameter_constraints = {"speed_median": [POSITIVE], "speed_sigma": [NON_NEGATIVE],
                              "download_median_mbps": [POSITIVE], "download_sigma": [NON_NEGATIVE],
                              "upload_median_mbps": [POSITIVE], "upload_sigma": [NON_NEGATIVE],
                              "availability": [Options(("always", "markov", "trace"))],
                              "online_mean_s": [POSITIVE], "offline_mean_s": [POSITIVE],
                              "deadline_s": [POSITIVE, None], "over_selection": [Interval(1, None)]}

    def check(self, path: str) -> None:
        if (self.availability == "trace") != (self.availability_trace is not None):
            raise ConfigError(f"{path}.availability_trace: {self.availability_trace!r} goes with availability = "
                              f"\"trace\" (got {self.availability!r}); set both or neither")
        for i, target in enumerate(self.targets):
            if not FRACTION.accepts(target):
                raise ConfigError(f"{path}.targets[{i}]: {target!r} is out of range; it must lie in [0, 1]")

    def check_scenario(self, config: ScenarioConfig) -> None:
        """Rules spanning sections: one client per node, trace files that parse for the scenario's clients."""
        from fedsim.system.devices import read_availability_trace, read_profile_trace

        if config.simulation.clients_per_node != 1:
            raise ConfigError(f"system: device profiles time and drop single clients; simulation.clients_per_node "
                              f"= {config.simulation.clients_per_node} combines several in one reply, so use 1")
        if self.trace is not None:
            read_profile_trace(self.trace, config.num_clients)
        if self.availability_trace is not None:
            read_availability_trace(self.availability_trace, config.num_clients)


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    system: SystemConfig | None = None  # [system]: device profiles and the simulated clock (None: off)

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
            elif value is None and f.name == "system":  # off: listed only when set, as logging
                continue
            elif isinstance(value, LoggingConfig):  # tracking only: listed when set, so resume checks of earlier
                if value != LoggingConfig():          # runs see the same configuration (the fields set only)
                    default = dataclasses.asdict(LoggingConfig())
                    out[f.name] = {k: v for k, v in dataclasses.asdict(value).items() if v != default[k]}
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
    "logging": LoggingConfig,
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
    validate_params(obj, path)
    return obj


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as TOML (numbers, booleans, quoted strings, arrays); bare words stay strings."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"--set value {_shorten(text)}: nested too deeply (at most {MAX_DEPTH} levels of "
                          "arrays and tables)") from None
    check_depth(value, f"--set value {_shorten(text)}")
    return value


def _shorten(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_depth(tree: Any, where: str) -> None:
    """``ConfigError`` naming ``where`` when tables/arrays nest deeper than ``MAX_DEPTH`` (checked without
    recursion, before anything recursive walks the tree)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth >= MAX_DEPTH:
            raise ConfigError(f"{where}: nested too deeply (more than {MAX_DEPTH} levels of tables and arrays)")
        stack.extend((child, depth + 1) for child in children)


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


def parse_targeted_overrides(items: typing.Iterable[str]) -> list[tuple[str | None, str, Any]]:
    """``--set key=value`` -> (None, key, value); ``--set LABEL:key=value`` (one variant) -> (LABEL, key, value)."""
    out = []
    for item in items:
        head, sep, _ = str(item).partition("=")
        target, colon, key = head.partition(":")
        if sep and colon:
            if not target.strip() or not key.strip():
                raise ConfigError(f"--set {item!r}: expected LABEL:key=value, e.g. --set fedavg:rounds=10")
            ((key, value),) = parse_overrides([f"{key}={str(item).partition('=')[2]}"])
            out.append((target.strip(), key, value))
        else:
            ((key, value),) = parse_overrides([item])
            out.append((None, key, value))
    return out


def config_from_dict(tree: dict) -> ScenarioConfig:
    """Validate a raw scenario tree (as loaded from TOML) into a ``ScenarioConfig``.

    The tree is never rewritten: what a strategy derives (the rounds a one-shot or staged algorithm defines, the
    single client of a centralized baseline) is derived here, on the typed config, after validation.
    """
    tree = copy.deepcopy(tree)
    tree.pop("variants", None)
    check_seeds(tree.pop("seeds", None))  # the runs' seeds (fedsim run), not a setting of one run
    known = set(_SECTIONS) | set(_TOP_LEVEL) | {"strategy", "system"}
    for key in tree:
        if key not in known:
            raise ConfigError(f"{key}: unknown setting; top-level settings are {', '.join(sorted(known))}")
    top = {k: _coerce(k, tree[k], tp) for k, tp in _TOP_LEVEL.items() if k in tree}
    if top.get("rounds", 1) < 1:
        raise ConfigError(f"rounds: {top['rounds']!r} is out of range; it must be >= 1")
    if top.get("seed", 0) < 0:
        raise ConfigError(f"seed: {top['seed']!r} is out of range; it must be >= 0")
    sections = {name: build_dataclass(cls, tree.get(name, {}), name) for name, cls in _SECTIONS.items()}

    strategy_tree = tree.get("strategy", {})
    if not isinstance(strategy_tree, dict):
        raise ConfigError(f"strategy: expected a table of settings (name = ... and the strategy's parameters), "
                          f"got {strategy_tree!r}")
    strategy_tree = dict(strategy_tree)
    name = strategy_tree.pop("name", "fedavg")
    spec = get_strategy(name)  # raises ConfigError naming strategy.name
    params = build_dataclass(spec.params, strategy_tree, "strategy")
    if "rounds" not in top and spec.fixed_rounds is not None:
        top["rounds"] = int(spec.fixed_rounds(params))
    if spec.single_client:
        sections["partition"] = dataclasses.replace(sections["partition"], kind="iid", num_clients=1)
        sections["simulation"] = dataclasses.replace(sections["simulation"], clients_per_node=1)
    system = build_dataclass(SystemConfig, tree["system"], "system") if "system" in tree else None
    config = ScenarioConfig(**top, **sections, strategy=StrategyConfig(name=name, params=params), system=system)
    _cross_checks(config, spec)
    if system is not None:
        system.check_scenario(config)
    if spec.check is not None:
        spec.check(config)
    return config


_STREAM_WORDS = {"online": "a single-pass online stream", "class-incremental": "a class-incremental task stream "
                 "(with stream.tasks)", "none": "a static partition, not a stream"}


def _cross_checks(config: ScenarioConfig, spec: StrategySpec) -> None:
    """Constraints that span sections."""
    name = config.strategy.name
    if config.stream.kind != spec.stream:
        raise ConfigError(f"stream.kind: {config.stream.kind!r} does not suit {name!r}, which learns from "
                          f"{_STREAM_WORDS[spec.stream]}; set stream.kind = {spec.stream!r}")
    mode = config.evaluation.mode
    if mode != "global" and config.partition.test_fraction == 0:
        raise ConfigError(f"evaluation.mode: {mode!r} measures each client's held-out local test data, but "
                          "partition.test_fraction is 0 (none is held out); set partition.test_fraction to a share "
                          "in (0, 1), e.g. 0.2, or evaluation.mode = \"global\"")
    sim = config.simulation
    if sim.byzantine_fraction > 0 and not spec.model_replies:
        raise ConfigError(f"simulation.byzantine_fraction: {sim.byzantine_fraction} needs a strategy whose clients "
                          f"send model updates (the gradient strategies: fedavg, fedprox, krum, ...); {name!r} does "
                          "not, so byzantine clients would change nothing: use 0")
    if sim.clients_per_node > 1 and not spec.groups_clients:
        raise ConfigError(
            f"simulation.clients_per_node: {sim.clients_per_node} needs a strategy whose client part can "
            f"combine replies (has `reduce`) or whose server addresses each client; {name!r} has neither, so use 1"
        )


def check_seeds(seeds: Any) -> list[int] | None:
    """A scenario's top-level ``seeds = [0, 1, 2]``: ``fedsim run`` runs every variant once per seed (as
    ``--seeds``, which replaces it); None when unset."""
    if seeds is None:
        return None
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds: {seeds!r} has the wrong type; it must be a non-empty list of integers >= 0, "
                          "e.g. seeds = [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds!r} lists a seed twice")
    return list(seeds)


def scenario_seeds(path: str | Path | None) -> list[int] | None:
    """The ``seeds`` list of a scenario file (validated), None when it has none."""
    if path is None:
        return None
    try:
        tree = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return None  # load_scenarios reports the file's problem, naming it
    return check_seeds(tree.get("seeds"))


def check_label(path: str, label: Any) -> str:
    """A variant label names a run directory: letters, digits, '.', '_' and '-' only, and not '.' or '..'."""
    if not isinstance(label, str):
        raise ConfigError(f"{path}: {label!r} has the wrong type; it must be a string")
    if not LABEL_PATTERN.fullmatch(label) or label in (".", ".."):
        raise ConfigError(f"{path}: {label!r} is not a valid label; labels name run directories, so use letters, "
                          "digits, '.', '_' and '-' only (not '.' or '..', no '/')")
    if len(label) > MAX_LABEL_LENGTH:
        raise ConfigError(f"{path}: {label[:20] + '...'!r} is {len(label)} characters long; labels name run "
                          f"directories, so at most {MAX_LABEL_LENGTH}")
    return label


def load_scenarios(path: str | Path | None, overrides: typing.Iterable[str] = (),
                   only: typing.Iterable[str] = (), *, sweep: typing.Iterable[str] = (),
                   notes: list[str] | None = None) -> list[tuple[str, ScenarioConfig]]:
    """Load a scenario file into one (label, config) per variant (a single unnamed one when it has none).

    A scenario may list ``[[variants]]``, each with a ``label`` and a ``set`` table of dotted overrides, to run
    several strategies on the same data and partition (``fedsim report`` then compares them).

    Precedence, lowest first: the scenario's tables; a command-line ``--set key=value`` (every variant); the
    variant's own ``set``; ``--set LABEL:key=value`` (that variant only) and ``sweep`` items (a sweep point, every
    variant). In a scenario with several variants a ``--set`` or sweep item skips the variants that cannot take it
    (``override_skip_reason``: a ``strategy.<param>`` their strategy lacks, ``rounds`` for a strategy that defines
    its own); one that no variant takes is an error. Every error raised while building a variant names it
    (``variant 'afl': rounds: ...``). ``notes`` (a list) receives one line per ``--set`` that a variant's own
    ``set`` overrides or that a variant skips. ``only`` keeps the variants with those labels.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"scenario: file {str(path)!r} does not exist")
        if not path.is_file():
            raise ConfigError(f"scenario: {str(path)!r} is not a file; give the path of a scenario .toml file")
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"scenario: {path} is not a text file (not UTF-8); give a scenario .toml file") from None
        except OSError as exc:
            raise ConfigError(f"scenario: {path} cannot be read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"scenario: {path} is not valid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"scenario: {path} is nested too deeply (at most {MAX_DEPTH} levels of tables and "
                              "arrays)") from None
        check_depth(tree, f"scenario: {path}")
    cli = parse_targeted_overrides(overrides)
    swept = parse_overrides(sweep)
    variants = tree.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError("variants: expected an array of tables ([[variants]] with label and set)")
    named = "variants" in tree  # errors name the variant
    several = len(variants) > 1
    out = []
    labels = set()
    taken: dict[tuple[str, str], list[str]] = {}  # (origin, key) -> variants that took it
    targeted_used: set[str] = set()
    for i, variant in enumerate(variants):
        unknown = set(variant) - {"label", "set"}
        if unknown:
            raise ConfigError(f"variants[{i}].{sorted(unknown)[0]}: unknown setting; allowed settings are label, set")
        if "label" in variant:
            check_label(f"variants[{i}].label", variant["label"])
        settings = variant.get("set") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"variants[{i}].set: {settings!r} has the wrong type; it must be a table of dotted "
                              'settings, e.g. set = { "strategy.name" = "fedprox" }')
        base = copy.deepcopy({k: v for k, v in tree.items() if k != "variants"})
        where = variant.get("label") if isinstance(variant.get("label"), str) else None
        try:
            # the variant as it ends up, for its label and its strategy (what the global items are checked against)
            probe = copy.deepcopy(base)
            for _, key, value in [c for c in cli if c[0] is None]:
                apply_override(probe, key, value)
            for key, value in settings.items():
                apply_override(probe, key, value)
            label_now = where or _derived_label(probe)
            own = [(key, value) for target, key, value in cli if target is not None and target == label_now]
            for key, value in own:
                apply_override(probe, key, value)
            mine = copy.deepcopy(base)  # the variant without the global items
            for key, value in [*settings.items(), *own]:
                apply_override(mine, key, value)
            where = label_now
            targeted_used.update(target for target, _, _ in cli if target == label_now)
            for target, key, value in cli:
                if target is not None:
                    continue
                reason = override_skip_reason(probe, key, mine) if several else None
                if reason is not None:
                    if notes is not None:
                        notes.append(f"--set {key}: not applied to variant {where!r} ({reason})")
                    continue
                if key in settings and notes is not None and several:
                    notes.append(f"--set {key}: variant {where!r} keeps its own {key} = {settings[key]!r} (a "
                                 f"variant's set wins; --set {where}:{key}=... changes it)")
                taken.setdefault(("--set", key), []).append(where)
                apply_override(base, key, value)
            for key, value in settings.items():
                apply_override(base, key, value)
            for key, value in own:
                apply_override(base, key, value)
            for key, value in swept:
                if several and override_skip_reason(base, key, mine) is not None:
                    continue
                taken.setdefault(("--sweep", key), []).append(where)
                apply_override(base, key, value)
            config = config_from_dict(base)
        except ConfigError as exc:
            if not named:
                raise
            raise ConfigError(f"variant {where or f'variants[{i}]'!r}: {exc}") from None
        label = check_label(f"variants[{i}].label" if "label" in variant else "name",
                            variant.get("label") or config.name or config.strategy.name)
        if label in labels:
            raise ConfigError(f"variants[{i}].label: {label!r} is used twice; labels name run directories")
        labels.add(label)
        out.append((label, config))
    for origin, items in (("--set", [(k, v) for t, k, v in cli if t is None]), ("--sweep", swept)):
        for key, _ in items:
            if several and not taken.get((origin, key)):
                strategies = ", ".join(sorted({c.strategy.name for _, c in out}))
                if _is_strategy_param(key):
                    raise ConfigError(f"{key}: no variant's strategy has this setting ({strategies})")
                raise ConfigError(f"{key}: no variant takes this setting ({strategies}: "
                                  f"{override_skip_reason(out[0][1].to_dict(), key)})")
    unknown_targets = sorted({t for t, _, _ in cli if t is not None} - targeted_used)
    if unknown_targets:
        raise ConfigError(f"--set {unknown_targets[0]}:...: no variant is labelled {unknown_targets[0]!r}; variants "
                          f"are {', '.join(label for label, _ in out)}")
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


def _is_strategy_param(dotted: str) -> bool:
    keys = dotted.split(".")
    return keys[0] == "strategy" and len(keys) == 2 and keys[1] != "name"


def _tree_strategy(tree: dict) -> StrategySpec | None:
    strategy = tree.get("strategy") or {}
    name = strategy.get("name", "fedavg") if isinstance(strategy, dict) else None
    try:
        return get_strategy(name)
    except ConfigError:
        return None  # let validation report the bad name


def _derived_label(tree: dict) -> str:
    """The label of a variant without one: the scenario's ``name``, else its strategy's name."""
    strategy = tree.get("strategy") if isinstance(tree.get("strategy"), dict) else {}
    return str(tree.get("name") or strategy.get("name", "fedavg"))


def override_skip_reason(tree: dict, dotted: str, own: dict | None = None) -> str | None:
    """Why a command-line ``--set`` / ``--sweep`` of ``dotted`` does not apply to the variant whose (raw) tree is
    ``tree`` (``own``: that tree without the command line's global items), in a scenario with several variants:
    a ``strategy.<param>`` its strategy lacks, or ``rounds`` where the variant does not set them and its strategy
    defines them (one-shot, FuseFL's stages) or takes them from its stream (tasks, one online pass); None: it
    applies."""
    spec = _tree_strategy(tree)
    if spec is None:
        return None
    keys = dotted.split(".")
    if _is_strategy_param(dotted) and keys[1] not in {f.name for f in dataclasses.fields(spec.params)}:
        return f"{spec.name!r} has no parameter {keys[1]!r}"
    if dotted == "rounds" and "rounds" not in (tree if own is None else own):
        if spec.fixed_rounds is not None:
            return f"{spec.name!r} defines its own rounds"
        if spec.stream != "none":
            return f"{spec.name!r} takes its rounds from its {spec.stream} stream"
    return None


def _strategy_accepts(tree: dict, dotted: str) -> bool:
    """Whether a ``strategy.<param>`` override fits the strategy named in ``tree`` (other keys always fit)."""
    return not (_is_strategy_param(dotted) and override_skip_reason(tree, dotted) is not None)


def load_scenario(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> ScenarioConfig:
    """Load a scenario that has no variants (or take its first)."""
    return load_scenarios(path, overrides)[0][1]
