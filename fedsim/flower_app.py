"""fedsim as a Flower App: the ServerApp and ClientApp that ``flwr run`` starts (simulation or deployment engine).

This is the one module that wires fedsim into Flower's app runtime (``run_simulation`` lives in
``fedsim.engine.runner``): a Flower change to the app API is a change here only.

The run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden by ``flwr run --run-config``) says
what to run; every value is a flat string because Flower's run config holds no lists:

- ``scenario``: path of a scenario file. Relative paths are looked up in the working directory, then in the app
  directory (the FAB, which carries ``scenarios/``).
- ``out``: the run directory the ServerApp writes (as ``fedsim run --out``); relative to the ServerApp's working
  directory. Empty: ``runs/<scenario>-<time>``.
- ``set``: overrides, ``;``-separated, e.g. ``"rounds=3;partition.alpha=0.5"`` (as repeated ``--set``), or a JSON
  list of them (what ``fedsim deploy`` passes when an override holds a ``;``: it stays one override).
- ``only``: the variant to run when the scenario has several (one Flower run runs one variant).
- ``nodes``: how many nodes to wait for before starting (0: as many as have registered once their number stops
  changing for a few seconds, which is all of them in Flower's simulation runtime).

A SuperNode serves the clients of its ``partition-id`` (node config, as in Flower's examples) out of
``num-partitions`` nodes: node p serves clients ``p*ceil(N/P) ...`` (as fedsim's simulation with
``clients_per_node = ceil(N/P)``; with N not a multiple of P the last nodes may serve none, and the server leaves
those out); it builds its own partitions from the scenario (the same seeded split on every node), so no training
data travels.

A SIGINT or SIGTERM to the ServerApp's process ends the run as ``fedsim run`` does: summary.json says
``interrupted`` and keeps the finished rows.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.config import ScenarioConfig, load_scenarios, select_variants
from fedsim.errors import ConfigError

# what the run config holds, with its defaults: pyproject.toml's [tool.flwr.app.config] and fedsim deploy's app
RUN_CONFIG_DEFAULTS: dict[str, str | int] = {"scenario": "scenarios/afl-fmnist.toml", "out": "", "set": "", "only": "",
                                             "nodes": 0}
RUN_CONFIG_KEYS = tuple(RUN_CONFIG_DEFAULTS)


def split_overrides(text: str) -> list[str]:
    """``"rounds=3;partition.alpha=0.5"`` -> ``["rounds=3", "partition.alpha=0.5"]`` (empty parts dropped); a
    JSON list of strings is taken as it is (``join_overrides``)."""
    text = str(text or "").strip()
    if text.startswith("["):
        import json

        try:
            parts = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"run config: set = {text!r} is neither 'k=v;k=v' nor a JSON list: {exc}") from None
        if not isinstance(parts, list) or not all(isinstance(part, str) for part in parts):
            raise ConfigError(f"run config: set = {text!r}: a JSON list of 'key=value' strings is expected")
        return [part.strip() for part in parts if part.strip()]
    return [part.strip() for part in text.split(";") if part.strip()]


def join_overrides(overrides: list[str] | tuple[str, ...]) -> str:
    """The run config ``set`` value that ``split_overrides`` turns back into exactly ``overrides`` (the plain
    ``;``-joined form where that is exact, a JSON list otherwise)."""
    import json

    overrides = [str(o).strip() for o in overrides if str(o).strip()]
    if any(";" in o for o in overrides) or (overrides and overrides[0].startswith("[")):
        return json.dumps(overrides)
    return ";".join(overrides)


def app_dirs() -> list[Path]:
    """Directories a relative scenario path may be under: the working directory, then the Flower app's own
    directory (Flower puts the installed FAB first on ``sys.path`` when it loads the app)."""
    dirs = [Path.cwd()]
    for entry in sys.path:
        path = Path(entry or ".")
        if (path / "pyproject.toml").is_file() and path not in dirs:
            dirs.append(path)
    return dirs


def resolve_scenario(path: str) -> Path:
    """The scenario file ``path`` names (see ``app_dirs``); a ConfigError naming the run-config key if none."""
    if not str(path or "").strip():
        raise ConfigError("run config: 'scenario' is empty; give a scenario file, e.g. "
                          "flwr run . --run-config \"scenario='scenarios/afl-fmnist.toml'\"")
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
        raise ConfigError(f"run config: scenario {str(path)!r} does not exist")
    for base in app_dirs():
        if (base / candidate).is_file():
            return base / candidate
    raise ConfigError(f"run config: scenario {str(path)!r} not found in {', '.join(str(d) for d in app_dirs())}")


def config_from_run_config(run_config: dict) -> tuple[str | None, ScenarioConfig]:
    """The (variant label, config) a Flower run config selects."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {', '.join(unknown)}; fedsim's app reads "
                          f"{', '.join(RUN_CONFIG_KEYS)}")
    return _load(str(run_config.get("scenario", "")), str(run_config.get("set", "")),
                 str(run_config.get("only", "")))


@functools.lru_cache(maxsize=16)
def _load(scenario: str, overrides: str, only: str) -> tuple[str | None, ScenarioConfig]:
    path = resolve_scenario(scenario)
    every = load_scenarios(path, split_overrides(overrides))
    if len(every) == 1:
        if only and every[0][0] != only:
            raise ConfigError(f"run config: only = {only!r}, but {path} has no variants")
        return None, every[0][1]
    labels = [label for label, _ in every]
    if not only:
        raise ConfigError(f"run config: {path} has {len(labels)} variants ({', '.join(labels)}); one Flower run "
                          "runs one of them: add only='<label>' to the run config (fedsim deploy runs them all)")
    return select_variants(every, [only])[0]


def node_group(node_config: dict, config: ScenarioConfig) -> list[int]:
    """The clients the node with this node config serves (``config`` as ``for_nodes`` made it): an equal block per
    node, as in fedsim's own simulation (``fedsim.engine.accounting.node_group``)."""
    from fedsim.engine.accounting import node_group as block

    try:
        pid, nodes = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("node config: a fedsim SuperNode needs integer 'partition-id' and 'num-partitions', "
                          "e.g. flower-supernode --node-config \"partition-id=0 num-partitions=3\"") from None
    if not 0 <= pid < nodes:
        raise ConfigError(f"node config: partition-id = {pid} is outside 0..{nodes - 1} (num-partitions = {nodes})")
    return block(pid, config.simulation.clients_per_node, config.num_clients)


def for_nodes(config: ScenarioConfig, num_nodes: int) -> ScenarioConfig:
    """``config`` with ``simulation.clients_per_node`` set so that its clients fill ``num_nodes`` nodes (the
    server waits for that many nodes and finds out by discovery which clients each serves)."""
    import dataclasses

    per_node = -(-config.num_clients // max(1, num_nodes))
    sim = dataclasses.replace(config.simulation, clients_per_node=per_node)
    return dataclasses.replace(config, simulation=sim)


# ------------------------------------------------------------------------------------------------- the apps
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedsim.engine.runner import run_scenario
    from fedsim.engine.signals import signals_interrupt_runs
    from fedsim.results.rundir import default_out

    label, config = config_from_run_config(dict(context.run_config))
    nodes = _wait_for_nodes(grid, int(context.run_config.get("nodes", 0) or 0))
    config = for_nodes(config, nodes)
    out = str(context.run_config.get("out", "") or "") or str(default_out(str(context.run_config["scenario"])))
    from fedsim.engine.progress import to_flower_log

    with signals_interrupt_runs(), to_flower_log():  # SIGINT/SIGTERM: summary.json says interrupted, as under
        try:                                           # fedsim run; round lines on Flower's log (flwr run --stream)
            run_scenario(config, out, label=label, show_progress=False, grid=grid)
        except KeyboardInterrupt as exc:  # to Flower, a failed ServerApp (it exits with its error code)
            raise RuntimeError(f"interrupted ({exc}): {out}/summary.json says status interrupted") from None


def _wait_for_nodes(grid: Grid, expected: int = 0, settle: float = 3.0, timeout: float = 600.0) -> int:
    """How many nodes this run has: ``expected`` once that many registered; with 0, as many as registered once
    their number stayed the same for ``settle`` seconds (Flower registers nodes one by one after start)."""
    import time

    start = last_change = time.time()
    count = 0
    while time.time() - start < timeout:
        now = len(list(grid.get_node_ids()))
        if expected and now >= expected:
            return now
        if now != count:
            count, last_change = now, time.time()
        if not expected and count and time.time() - last_change >= settle:
            return count
        time.sleep(0.2)
    raise TimeoutError(f"{count} of {expected or 'any'} Flower nodes registered within {timeout:.0f} s")


@functools.lru_cache(maxsize=4)
def _handler(run_config: tuple[tuple[str, str], ...], num_partitions: int):  # noqa: ANN202
    """The node's handler for one run config (built at its first message; unknown keys refused as on the server)."""
    from fedsim.engine.node import NodeHandler

    _, config = config_from_run_config(dict(run_config))
    config = for_nodes(config, num_partitions)
    return NodeHandler(config, partitions=None, group_of=lambda context: node_group(context.node_config, config))


def _node(kind: str, msg: Message, context: Context) -> Message:
    run_config = tuple(sorted((key, str(value)) for key, value in context.run_config.items()))
    return _handler(run_config, int(context.node_config.get("num-partitions", 1)))(kind, msg, context)


def _client_app() -> ClientApp:
    from fedsim.engine.node import client_app_for

    return client_app_for(_node)


client_app = _client_app()
