"""Run one scenario end to end: build the apps, run them on Flower's Ray backend (or inline), write the run dir.

The run's other jobs have homes of their own in ``fedsim.engine``: ``signals`` (SIGINT/SIGTERM end a run with its
files saying "interrupted"), ``grid`` (the server part's grid with a stop switch), ``ray_backend`` (client
resources and Flower's Ray simulation), ``ray_session`` (Ray itself), ``telemetry`` (Flower's, silenced). This
module keeps the run and its summary.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedsim import QUIET_ENV  # noqa: F401  (set in os.environ when fedsim is imported, before any flwr import)
from fedsim.config import ScenarioConfig
from fedsim.engine.accounting import node_group
from fedsim.engine.checkpoint import CHECKPOINT_FILE, RoundCheckpoint
from fedsim.engine.checkpoint import load as load_checkpoint
from fedsim.engine.grid import StoppableGrid
from fedsim.engine.node import build_client_app
from fedsim.engine.progress import RunProgress
from fedsim.engine.ray_backend import run_on_ray
from fedsim.engine.server import AccountingGrid, ServerContext
from fedsim.engine.signals import Interrupted, register_run, unregister_run
from fedsim.errors import FedsimError
from fedsim.registry import get_strategy
from fedsim.results.rundir import METRICS_FILE, REQUIRED_SUMMARY_KEYS, RunRecorder
from fedsim.scenario import partition_for, test_split, train_split

SERVER_STOP_WAIT = 10.0  # seconds the driver waits for the server part to stop after an interrupt


class RunFailed(FedsimError):
    """The server part raised; the original exception is chained."""


class _Run:
    """One run_scenario in progress: what a signal handler needs to stop it and write its summary."""

    def __init__(self, config: ScenarioConfig, spec, recorder: RunRecorder, label: str | None) -> None:  # noqa: ANN001
        self.config = config
        self.spec = spec
        self.recorder = recorder
        self.label = label
        self.stop = threading.Event()
        self.signum: list[int] = []
        self.server_done = threading.Event()
        self.outcome: dict[str, Any] = {}
        self.start = time.time()

    def summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        summary = _summary(self.config, self.outcome.get("ctx"), self.recorder, self.spec, time.time() - self.start,
                           status, self.label)
        if error is not None:
            summary["error"] = error
        return summary

    def interrupt(self, signum: int) -> None:
        """From the signal handler: stop the server loop, write the summary now (before Ray is torn down)."""
        if not self.signum:
            self.signum.append(int(signum))
        self.stop.set()
        if not self.config.simulation.verbose:  # actors dying under SIGTERM make Flower log tracebacks
            logging.getLogger("flwr").setLevel(logging.CRITICAL)
        with contextlib.suppress(Exception):
            self.recorder.write_summary(self.summary("interrupted"))


def _node_groups(node_partitions: Callable[[], dict[int, int] | None], config: ScenarioConfig
                 ) -> dict[int, list[int]] | None:
    """Node id -> the clients it serves, from each node's partition id as the simulation engine assigned it: what
    each node's handler derives itself (``fedsim.engine.node.NodeHandler._group``)."""
    partitions = node_partitions()
    if partitions is None:
        return None
    sim = config.simulation
    return {node: node_group(pid, sim.clients_per_node, config.num_clients) for node, pid in partitions.items()}


def run_scenario(config: ScenarioConfig, out_dir: str | Path, *, label: str | None = None,
                 show_progress: bool = True, grid: Grid | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``config`` and write its run directory ``out_dir``; return the summary.

    ``grid``: the Flower grid of a runtime that someone else started (``flwr run`` in simulation or on the
    deployment engine, see ``fedsim.flower_app``); the server part runs on it and ``simulation.backend`` is not
    used. Without it fedsim starts the clients itself (Ray, or inline).

    The previous run in ``out_dir`` is invalidated first (``RunRecorder.start``). Interrupting (Ctrl-C, SIGTERM)
    keeps config.json, partition.csv, the finished rows of metrics.csv and writes a summary.json with
    ``status = "interrupted"``; a failure (data loading included) writes ``status = "failed"`` and ``error``.

    ``resume``: continue from the round checkpoint an interrupted run of the same configuration left in
    ``out_dir`` (``fedsim.engine.checkpoint``; strategies whose server part sets ``resumes_mid_run``, the
    simulated clock of a ``[system]`` section included); other runs start from the beginning, with a note saying
    so.
    """
    if not config.simulation.verbose:  # Flower's per-round INFO log and run_simulation's deprecation notice
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("ray").setLevel(logging.WARNING)
    spec = get_strategy(config.strategy.name)
    recorder = RunRecorder(out_dir)
    config_entry = dict(label=label, seed=config.seed)
    payload = _checkpoint_to_resume(config, spec, out_dir, label) if resume else None
    recorder.start(config.to_dict(), keep=(CHECKPOINT_FILE,) if payload else (), **config_entry)
    run = _Run(config, spec, recorder, label)
    outcome = run.outcome
    register_run(run)
    status, error = "completed", None
    try:
        train = train_split(config)
        test = test_split(config)
        recorder.write_config(config.to_dict(), **config_entry,
                              data_files={"train": train.source or None, "test": test.source or None})
        partitions = partition_for(config)
        from fedsim.data.partition import partition_table

        table = partition_table(partitions, train.labels, train.num_classes)
        recorder.write_partition(table)
        if show_progress:
            from fedsim.data.partition import describe_partition

            print(f"partition: {describe_partition(table)}", file=sys.stderr)

        progress = RunProgress(label or config.strategy.name, total=config.rounds, enabled=show_progress)
        server = spec.server_class()(config.strategy.params)

        def server_main(grid: Grid, node_partitions: Callable[[], dict[int, int] | None] | None = None) -> None:
            try:
                stoppable = StoppableGrid(grid, run.stop, run.signum)
                outcome["grid"] = stoppable
                acc_grid = AccountingGrid(stoppable, config.num_nodes)
                ctx = ServerContext(config, acc_grid, recorder, progress, partitions)
                outcome["ctx"] = ctx
                ctx.checkpoint = RoundCheckpoint(ctx, payload)
                acc_grid.discover(known=None if node_partitions is None else
                                  functools.partial(_node_groups, node_partitions, config))
                server.run(ctx)
            except BaseException as exc:  # surfaced after the simulation returns
                outcome["error"] = exc
            finally:
                if "ctx" in outcome:
                    _record_placement(outcome["ctx"])
                run.server_done.set()

        client_app = build_client_app(config, partitions)
        run.start = time.time()
        with progress:
            if grid is not None:
                server_main(grid)
            elif config.simulation.backend == "inline":
                from fedsim.engine.inline import InlineGrid

                server_main(InlineGrid(client_app, config.num_nodes))
            else:
                run_on_ray(config, client_app, server_main)
        if "error" in outcome:
            err = outcome["error"]
            if isinstance(err, KeyboardInterrupt):
                raise err
            if isinstance(err, FedsimError):
                raise err
            raise _server_failure(spec.name, outcome, err) from err
        if "ctx" not in outcome:
            raise RunFailed("the Flower simulation ended before the server started (see the log above)")
        grid = outcome.get("grid")
        if grid is not None and grid.replies_failed and not grid.replies_ok:
            # no client ever contributed: whatever the server part reports is its initial model, not a result
            lines = grid.first_error.strip().splitlines()
            raise RunFailed(f"simulation: every client failed in every round ({grid.replies_failed} error "
                            f"replies, none answered), so {spec.name!r} learned nothing; first error: "
                            f"{lines[-1] if lines else '?'}")
        outcome["ctx"].checkpoint.remove()  # completed: nothing to resume
    except KeyboardInterrupt as exc:
        status = "interrupted"
        run.stop.set()
        run.server_done.wait(SERVER_STOP_WAIT if "ctx" in outcome else 0)
        if not isinstance(exc, Interrupted):
            raise Interrupted(run.signum[0] if run.signum else signal.SIGINT) from None
        raise
    except BaseException as exc:
        status, error = "failed", _error_text(exc)
        run.stop.set()
        raise
    finally:
        unregister_run(run)
        summary = run.summary(status, error)
        try:
            recorder.write_summary(summary)
        finally:
            recorder.close()
    missing = [k for k in REQUIRED_SUMMARY_KEYS if summary.get(k) is None]
    if missing:
        raise RunFailed(f"strategy {spec.name!r} did not report {', '.join(missing)} (call ctx.summary)")
    return summary


def _checkpoint_to_resume(config: ScenarioConfig, spec, out_dir: str | Path, label: str | None) -> dict | None:  # noqa: ANN001
    """The round checkpoint ``--resume`` continues from (``CheckpointMismatch`` for one of another configuration);
    None, with a note on stderr, where the strategy or the scenario cannot resume mid-run."""
    payload = load_checkpoint(out_dir, config.to_dict())
    why = None
    if not getattr(spec.server_class(), "resumes_mid_run", False):
        why = f"strategy {spec.name!r} does not resume mid-run"
    elif payload is None:
        why = "the interrupted run finished no round"
    if why is not None:
        if payload is None and not (Path(out_dir) / METRICS_FILE).exists():
            return None  # nothing was run there before
        print(f"note: {label or spec.name}: {why}; running it again from the beginning", file=sys.stderr)
        return None
    print(f"{label or spec.name}: resuming after round {payload['round']} from {Path(out_dir) / CHECKPOINT_FILE}",
          file=sys.stderr)
    return payload


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FedsimError) else f"{type(exc).__name__}: {exc}"


def _server_failure(name: str, outcome: dict, err: BaseException) -> RunFailed:
    """The error a server part's unexpected exception becomes; "every client failed" when that is the cause
    (the latest messages got no good reply), which Flower's strategies report as a confusing aggregation error."""
    grid = outcome.get("grid")
    if grid is not None and grid.batch and grid.batch_ok == 0 and grid.batch_errors:
        first = grid.batch_errors[0].strip().splitlines()
        reason = f"; first error: {first[-1] if first else '?'}"
        where = f" in round {grid.batch_group}" if grid.batch_group.isdigit() else ""
        return RunFailed(
            f"simulation: every client failed{where} ({len(grid.batch_errors)} of {len(grid.batch)} nodes "
            f"answered with an error), so {name!r} had nothing to aggregate{reason}"
        )
    return RunFailed(f"strategy: {name!r} failed on the server: {type(err).__name__}: {err}")


def _summary(config: ScenarioConfig, ctx: ServerContext | None, recorder: RunRecorder, spec, wall: float,  # noqa: ANN001
             status: str, label: str | None) -> dict[str, Any]:
    traffic = ctx.grid.traffic if ctx is not None else None
    rows = list(recorder.rows)
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
    if spread:  # the final model on each client's label mix (fedsim.results.client_metrics)
        summary["worst_client_accuracy"] = spread[-1]["client_acc_min"]
        summary["client_accuracy_std"] = spread[-1]["client_acc_std"]
    if traffic is not None and config.num_clients:
        summary["bytes_up_per_client"] = traffic.up / config.num_clients
        summary["bytes_down_per_client"] = traffic.down / config.num_clients
    if ctx is not None:
        summary.update(ctx.extra_summary)
        summary["model_file"] = "model.pt" if ctx.model_saved else None
    return summary


def _record_placement(ctx: ServerContext) -> None:
    """nodes.csv (which Flower node, host and Ray node served each client) and, under Ray, ``ray_nodes`` in the
    summary: how many Ray nodes ran this run's clients."""
    from fedsim.engine.server import placement_table

    with contextlib.suppress(Exception):  # a report: never the reason a finished run fails
        table = placement_table(ctx.grid)
        if len(table):
            ctx.save_table("nodes.csv", table, index=False)
        ray_nodes = set().union(*(seen["ray_nodes"] for seen in ctx.grid.placement.values()))
        if ray_nodes:
            ctx.extra_summary["ray_nodes"] = len(ray_nodes)
