"""Run one scenario end to end: build the apps, run them on Flower's Ray backend (or inline), write the run dir."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.config import ScenarioConfig
from fedsim.engine.node import build_client_app
from fedsim.engine.progress import RunProgress
from fedsim.registry import get_strategy
from fedsim.scenario import partition_for, train_split
from fedsim.engine.server import AccountingGrid, ServerContext
from fedsim.errors import ConfigError, FedsimError
from fedsim.results import REQUIRED_SUMMARY_KEYS, RunRecorder

from fedsim import QUIET_ENV  # noqa: F401  (set in os.environ when fedsim is imported, before any flwr import)


def _no_telemetry_event(event_type: Any, event_details: Any = None) -> Future:
    """Stands in for Flower's telemetry ``event``: builds nothing, sends nothing."""
    done: Future = Future()
    done.set_result("disabled")
    return done


def silence_flower_telemetry() -> bool:
    """With telemetry disabled (fedsim's default, ``FLWR_TELEMETRY_ENABLED=0``), make Flower's telemetry ``event``
    a no-op in every loaded flwr module; return whether it did.

    Disabled, Flower still builds each event (platform and hardware details, a persistent id it writes to
    ``~/.flwr/source``) and only skips the POST; and a flwr imported before fedsim read the variable too early.
    Called right before the simulation starts, when the modules that call ``event`` are loaded.
    """
    if os.environ.get("FLWR_TELEMETRY_ENABLED", "1") != "0":
        return False
    import flwr.supercore.telemetry as telemetry

    telemetry.FLWR_TELEMETRY_ENABLED = "0"
    original = getattr(telemetry, "_fedsim_original_event", telemetry.event)
    telemetry._fedsim_original_event = original
    for name, module in list(sys.modules.items()):
        if (name == "flwr" or name.startswith("flwr.")) and getattr(module, "event", None) is original:
            module.event = _no_telemetry_event
    return True


class RunFailed(FedsimError):
    """The server part raised; the original exception is chained."""


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


def client_resources(config: ScenarioConfig) -> dict[str, float]:
    """CPUs and GPU fraction per simulated client; GPUs are used automatically when visible."""
    sim = config.simulation
    gpus = _gpu_count()
    num_gpus = sim.num_gpus
    if num_gpus is None:  # share the visible GPUs among the clients that can run at once on the CPUs
        concurrent = max(1, min(config.num_nodes, int((os.cpu_count() or 1) // sim.num_cpus)))
        num_gpus = 0.0 if gpus == 0 or sim.device == "cpu" else max(0.1, min(1.0, gpus / concurrent))
    if num_gpus > 0 and gpus == 0 and sim.ray_address is None:
        raise ConfigError(
            f"simulation.num_gpus: {num_gpus} GPUs per client requested but no GPU is visible on this machine "
            "(Flower's Ray backend would fail with 'ActorPool is empty'); set it to 0 or leave it unset"
        )
    return {"num_cpus": float(sim.num_cpus), "num_gpus": float(num_gpus)}


def run_scenario(config: ScenarioConfig, out_dir: str | Path, *, label: str | None = None,
                 show_progress: bool = True) -> dict[str, Any]:
    """Run ``config`` and write its run directory ``out_dir``; return the summary.

    Interrupting (Ctrl-C) keeps config.json, partition.csv, the finished rows of metrics.csv and writes a
    summary.json with ``status = "interrupted"``.
    """
    if not config.simulation.verbose:  # Flower's per-round INFO log and run_simulation's deprecation notice
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("ray").setLevel(logging.WARNING)
    spec = get_strategy(config.strategy.name)
    recorder = RunRecorder(out_dir)
    recorder.write_config(config.to_dict(), label=label, seed=config.seed)

    train = train_split(config)
    partitions = partition_for(config)
    from fedsim.partition import partition_table

    table = partition_table(partitions, train.labels, train.num_classes)
    recorder.write_partition(table)
    if show_progress:
        from fedsim.partition import describe_partition

        print(f"partition: {describe_partition(table)}", file=sys.stderr)

    progress = RunProgress(label or config.strategy.name, total=config.rounds, enabled=show_progress)
    outcome: dict[str, Any] = {}
    server = spec.server_class()(config.strategy.params)

    def server_main(grid: Grid) -> None:
        acc_grid = AccountingGrid(grid, config.num_nodes)
        ctx = ServerContext(config, acc_grid, recorder, progress, partitions)
        outcome["ctx"] = ctx
        try:
            acc_grid.discover()
            server.run(ctx)
        except BaseException as exc:  # surfaced after the simulation returns
            outcome["error"] = exc

    client_app = build_client_app(config, partitions)
    start = time.time()
    status = "completed"
    try:
        with progress:
            if config.simulation.backend == "inline":
                from fedsim.engine.inline import InlineGrid

                server_main(InlineGrid(client_app, config.num_nodes))
            else:
                _run_on_ray(config, client_app, server_main)
        if "error" in outcome:
            err = outcome["error"]
            if isinstance(err, KeyboardInterrupt):
                raise err
            if isinstance(err, FedsimError):
                raise err
            raise RunFailed(f"{spec.name} failed on the server: {type(err).__name__}: {err}") from err
        if "ctx" not in outcome:
            raise RunFailed("the Flower simulation ended before the server started (see the log above)")
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        summary = _summary(config, outcome.get("ctx"), spec, time.time() - start, status, label)
        recorder.write_summary(summary)
    missing = [k for k in REQUIRED_SUMMARY_KEYS if summary.get(k) is None]
    if missing:
        raise RunFailed(f"strategy {spec.name!r} did not report {', '.join(missing)} (call ctx.summary)")
    return summary


def _summary(config: ScenarioConfig, ctx: ServerContext | None, spec, wall: float, status: str,
             label: str | None) -> dict[str, Any]:
    traffic = ctx.grid.traffic if ctx is not None else None
    rows = ctx.recorder.rows if ctx is not None else []
    accs = [r["accuracy"] for r in rows if r.get("accuracy") == r.get("accuracy")]
    summary: dict[str, Any] = {
        "label": label or config.strategy.name,
        "status": status,
        "strategy": config.strategy.name,
        "kind": spec.kind,
        "dataset": config.data.name,
        "num_clients": config.num_clients,
        "partition": config.partition.kind,
        "rounds": max(r["round"] for r in rows) if rows else 0,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "wall_seconds": round(wall, 3),
        "bytes_up": traffic.up if traffic else 0,
        "bytes_down": traffic.down if traffic else 0,
        "messages_up": traffic.messages_up if traffic else 0,
        "messages_down": traffic.messages_down if traffic else 0,
        "failed_client_rounds": traffic.failed if traffic else 0,
        "seed": config.seed,
    }
    spread = [r for r in rows if r.get("client_acc_min") == r.get("client_acc_min") and "client_acc_min" in r]
    if spread:  # the final model on each client's label mix (fedsim.client_metrics)
        summary["worst_client_accuracy"] = spread[-1]["client_acc_min"]
        summary["client_accuracy_std"] = spread[-1]["client_acc_std"]
    if traffic is not None and config.num_clients:
        summary["bytes_up_per_client"] = traffic.up / config.num_clients
        summary["bytes_down_per_client"] = traffic.down / config.num_clients
    if ctx is not None:
        summary.update(ctx.extra_summary)
        summary["model_file"] = "model.pt" if ctx.model_saved else None
    return summary


def _run_on_ray(config: ScenarioConfig, client_app, server_main) -> None:  # noqa: ANN001
    """Flower's simulation engine with the Ray backend; configuration travels inside the apps."""
    from flwr.simulation import run_simulation

    silence_flower_telemetry()
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(grid)

    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                 "log_to_driver": bool(config.simulation.verbose)}
    if config.simulation.ray_address:
        init_args["address"] = config.simulation.ray_address
    backend_config = {"client_resources": client_resources(config), "init_args": init_args}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_nodes,
                       backend_name="ray", backend_config=backend_config,
                       verbose_logging=bool(config.simulation.verbose))
