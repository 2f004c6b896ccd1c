"""The Ray actor that runs the ClientApp in Flower's simulation: Flower's ``ClientAppActor``, importable without
``flwr.simulation``.

Ray makes an actor class available in a worker by importing the class's module there. Flower's actor lives in
``flwr.simulation.ray_transport.ray_actor``, so each worker first runs ``flwr/simulation/__init__.py``, which
imports ``run_simulation`` and with it the SuperLink's link state (SQLAlchemy), FastAPI, ``flwr.cli`` and httpx:
1.2-1.6 CPU-s and as much wall time per actor that none of its calls needs (``import ray,
flwr.simulation.ray_transport.ray_actor`` 2.9-3.3 CPU-s in a fresh process against 1.5-1.6 for ``import ray,
flwr.clientapp.client_app``; issue #26, docs/performance.md). This actor does what Flower's does, call for call
(``run`` and ``terminate``, the same exceptions); ``fedsim.engine.ray_backend`` hands it to Flower's Ray backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

from fedsim.engine.processes import exit_after_handlers

__all__ = ["NodeActor"]


@ray.remote
class NodeActor:
    """Runs one message through the ClientApp per call, as Flower's ``ClientAppActor`` does."""

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        if on_actor_init_fn:
            on_actor_init_fn()

    def run(self, client_app_fn: Callable[[], Any], message: Any, cid: str, context: Any) -> tuple[str, Any, Any]:
        """The ClientApp's reply to ``message``; ``cid`` and the (updated) ``context`` travel back with it."""
        try:
            app = client_app_fn()
            out_message = app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        return cid, out_message, context

    def terminate(self) -> None:
        """Leave the actor's process (Flower's pool calls this when the simulation ends): Ray's intended exit,
        every exit handler, then no interpreter teardown (``fedsim.engine.processes.exit_after_handlers``)."""
        exit_after_handlers()
        ray.actor.exit_actor()
