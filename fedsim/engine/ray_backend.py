"""A run on Flower's simulation engine with the Ray backend: the resources each client gets, and the driver's Ray.

Starting, joining and stopping Ray itself is ``fedsim.engine.ray_session``'s (one Ray for a whole ``fedsim run``);
this module asks it for a Ray, takes SIGINT/SIGTERM back from ``ray.init`` and hands the apps to
``flwr.simulation.run_simulation``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from fedsim.config import ScenarioConfig
from fedsim.engine.ray_session import ensure_ray, ray_address, ray_session
from fedsim.engine.signals import install_signal_handlers
from fedsim.engine.telemetry import silence_flower_telemetry
from fedsim.errors import ConfigError
from fedsim.preflight import gpu_count

__all__ = ["client_resources", "run_on_ray"]


def client_resources(config: ScenarioConfig) -> dict[str, float]:
    """CPUs and GPU fraction per simulated client; GPUs are used automatically when visible."""
    sim = config.simulation
    gpus = gpu_count()
    num_gpus = sim.num_gpus
    if num_gpus is None:  # share the visible GPUs among the clients that can run at once on the CPUs
        concurrent = max(1, min(config.num_nodes, int((os.cpu_count() or 1) // sim.num_cpus)))
        num_gpus = 0.0 if gpus == 0 or sim.device == "cpu" else max(0.1, min(1.0, gpus / concurrent))
    if num_gpus > 0 and gpus == 0 and ray_address(config) is None:  # a cluster has GPUs of its own
        raise ConfigError(
            f"simulation.num_gpus: {num_gpus} GPUs per client requested but no GPU is visible on this machine "
            "(Flower's Ray backend would fail with 'ActorPool is empty'); set it to 0 or leave it unset"
        )
    return {"num_cpus": float(sim.num_cpus), "num_gpus": float(num_gpus)}


def run_on_ray(config: ScenarioConfig, client_app: Any, server_main: Callable[[Any], None]) -> None:
    """Flower's simulation engine with the Ray backend; configuration travels inside the apps. Ray comes from the
    command's ``ray_session`` (one Ray for all variants) or, called alone, from a session of this run's own.
    ``server_main(grid)`` is the server part's loop."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    silence_flower_telemetry()
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(grid)

    with ray_session():
        init_args = _init_ray(config) or {}
        backend_config = {"client_resources": client_resources(config), "init_args": init_args}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_nodes,
                           backend_name="ray", backend_config=backend_config,
                           verbose_logging=bool(config.simulation.verbose))


def _init_ray(config: ScenarioConfig) -> dict[str, Any]:
    """Start (or join) Ray once per session (``fedsim.engine.ray_session.ensure_ray``), then (re)install fedsim's
    SIGINT/SIGTERM handlers: for the private Ray ``ensure_ray`` keeps Ray from replacing them (``sys.exit``, a C++
    failure handler that aborts with 134), a joined cluster's ``ray.init`` may still do it. fedsim starts Ray itself
    (Flower's backend then finds it running)."""
    init_args = ensure_ray(config)
    install_signal_handlers()
    return init_args
