"""The typed contracts between the engine and a strategy's two parts, and the checks the engine runs on them.

A strategy is a server part (``StrategySpec.server``, runs in the ServerApp) and, for federated strategies, a client
part (``StrategySpec.client``, runs on every Flower node); both are built from the strategy's parameters. The
engine builds them through ``StrategySpec.server_class()`` / ``client_class()``, which check a part against its
contract (``check_server_part`` / ``check_client_part``, defined beside the spec in ``fedsim.registry`` so that
listing strategies imports no engine) and refuse one that misses a hook with a ``PartContractError`` naming the
hook, instead of failing somewhere inside a round. A spec's ``model_codec`` is checked the same way
(``check_model_codec``).

Parts need not inherit from these classes: the contracts are ``typing.Protocol``\\ s (structural), so any class with
the hooks qualifies; ``fedsim.frameworks.model_rounds.ModelRoundsServer`` is a ready server part to subclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from flwr.app import RecordDict

from fedsim.registry import PartContractError, check_client_part, check_model_codec, check_server_part

if TYPE_CHECKING:
    from fedsim.engine.node import ClientEnv
    from fedsim.engine.server import ServerContext

__all__ = ["ServerPart", "ClientPart", "ReducibleClientPart", "ModelCodec", "PartContractError", "check_server_part",
           "check_client_part", "check_model_codec"]


@runtime_checkable
class ServerPart(Protocol):
    """A strategy's server part.

    - ``__init__(params)``: store the strategy's parameters (the dataclass the spec names) and do no work: the
      part is built on the driver before any data is loaded.
    - ``run(ctx)``: the whole run on a ``fedsim.engine.ServerContext``: send messages (``ctx.send`` /
      ``ctx.stream``), fold the replies, ``ctx.log`` metric rows, ``ctx.save_model``, and ``ctx.summary`` with at
      least ``final_accuracy``.
    """

    def __init__(self, params: Any) -> None: ...

    def run(self, ctx: ServerContext) -> None: ...


@runtime_checkable
class ClientPart(Protocol):
    """A strategy's client part, built on a node for every message from the strategy's parameters.

    - ``__init__(params)``: store the parameters, no work.
    - ``train(content, env) -> RecordDict``: answer a train message for one client: ``content`` is what the server
      sent (everything the round needs, hyperparameters included, travels in it), ``env`` the client's
      ``fedsim.engine.ClientEnv`` (its partition, seed, device and ``env.state``, kept between messages). A message
      of another type (``evaluate``) goes to the hook of that name, where the part has one.
    - optional ``reduce(replies) -> RecordDict`` (a static method; see ``ReducibleClientPart``).
    - optional ``train_group(content, envs) -> fedsim.engine.node.GroupReply | None``: a train message for all
      the clients of a node at once (``envs``, one per client, injected failures left out; not used while a
      byzantine client is in the group): the combined reply ``reduce`` would make of their replies, and each
      client's bytes, examples and train loss as if it had answered alone. None, or an exception, makes the node
      serve the clients one by one with ``train`` (so a crash is still attributed to its client); leave
      ``env.state`` untouched unless returning a reply.
    """

    def __init__(self, params: Any) -> None: ...

    def train(self, content: RecordDict, env: ClientEnv) -> RecordDict: ...


@runtime_checkable
class ReducibleClientPart(ClientPart, Protocol):
    """A client part whose replies combine exactly (declared ``reducible=True`` on the spec).

    ``reduce(replies) -> RecordDict`` (static): the replies of several clients of one node as one reply the server
    cannot tell from theirs (sums, example-weighted means); it must be associative, because a node folds early when
    its pending replies grow (``fedsim.engine.node.REDUCE_EVERY_BYTES``).
    """

    @staticmethod
    def reduce(replies: list[RecordDict]) -> RecordDict: ...


@runtime_checkable
class ModelCodec(Protocol):
    """How the model travels in a strategy's train messages and replies (``StrategySpec.model_codec``).

    The engine reads the received and the trained model through it and writes a replaced one back (the byzantine
    clients of ``simulation.byzantine_fraction``), without knowing the strategy's keys.
    """

    def read(self, content: RecordDict) -> dict[str, np.ndarray] | None:
        """The model in ``content`` as arrays, None where the message holds none."""
        ...

    def write(self, content: RecordDict, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the model in ``content``, in place."""
        ...
