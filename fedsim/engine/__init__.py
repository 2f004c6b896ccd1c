"""The simulation engine: Flower apps, accounting, and the scenario runner.

A strategy's server part sees a ``ServerContext``, its client part a ``ClientEnv``; both extend
``fedsim.scenario.ScenarioView``. The parts' contracts are ``ServerPart`` and ``ClientPart``
(``fedsim.engine.parts``; ``ModelCodec`` for the model a spec declares). Registration lives in ``fedsim.registry``
(re-exported here). The server's names are imported on first use: a node (a Ray actor, a SuperNode) imports
``fedsim.engine`` for ``ClientEnv`` and would otherwise pay for the server, the checkpoint and pandas (about 0.4 s
of CPU per process, issue #26).
"""

from fedsim.engine.node import ClientEnv
from fedsim.engine.parts import ClientPart, ModelCodec, PartContractError, ReducibleClientPart, ServerPart
from fedsim.registry import StrategySpec, get_strategy, register_strategy, strategies
from fedsim.scenario import derive_seed

__all__ = [
    "ClientEnv", "ClientPart", "Exchange", "ModelCodec", "PartContractError", "ReducibleClientPart", "Reply",
    "ServerContext", "ServerPart", "StrategySpec", "derive_seed", "get_strategy", "register_strategy", "strategies",
    "run_scenario",
]


_SERVER_NAMES = ("Exchange", "Reply", "ServerContext")


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: the server's names, imported when first asked for
    if name in _SERVER_NAMES:
        from fedsim.engine import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_scenario(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See ``fedsim.engine.runner.run_scenario`` (imported lazily: it pulls in Flower's simulation)."""
    from fedsim.engine.runner import run_scenario as _run

    return _run(*args, **kwargs)
