"""The simulation engine: strategy registry, Flower apps, accounting, and the scenario runner."""

from fedsim.engine.client import ClientEnv, derive_seed
from fedsim.engine.registry import StrategySpec, get_strategy, register_strategy, strategies
from fedsim.engine.server import Reply, ServerContext

__all__ = [
    "ClientEnv", "Reply", "ServerContext", "StrategySpec", "derive_seed", "get_strategy", "register_strategy",
    "strategies", "run_scenario",
]


def run_scenario(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See ``fedsim.engine.runner.run_scenario`` (imported lazily: it pulls in Flower's simulation)."""
    from fedsim.engine.runner import run_scenario as _run

    return _run(*args, **kwargs)
