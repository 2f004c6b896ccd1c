"""Run one scenario end to end: build the apps, run them on Flower's Ray backend (or inline), write the run dir.

Signals: inside ``signals_interrupt_runs()`` (what ``fedsim run`` uses), SIGINT and SIGTERM end a run the same way.
The handler writes the run's summary.json with ``status = "interrupted"`` at once (the finished rows of
metrics.csv stay) and stops the server loop at its next message. With a local Ray node it then stops that node and
every process below it and exits with 128 + the signal number (130, 143); otherwise (inline, a joined cluster) it
raises ``Interrupted`` in the main thread, which unwinds the run to the same exit status. A second signal exits at
once (the files are already written).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedsim import QUIET_ENV  # noqa: F401  (set in os.environ when fedsim is imported, before any flwr import)
from fedsim.config import ScenarioConfig
from fedsim.engine.node import build_client_app
from fedsim.engine.processes import alive, descendants, hard_exit  # noqa: F401
from fedsim.engine.progress import RunProgress
from fedsim.engine.server import AccountingGrid, ServerContext
from fedsim.errors import ConfigError, FedsimError
from fedsim.registry import get_strategy
from fedsim.results.rundir import REQUIRED_SUMMARY_KEYS, RunRecorder
from fedsim.scenario import partition_for, test_split, train_split

SERVER_STOP_WAIT = 10.0  # seconds the driver waits for the server part to stop after an interrupt
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run; ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RunFailed(FedsimError):
    """The server part raised; the original exception is chained."""


_ACTIVE_RUNS: list["_Run"] = []  # the run_scenario calls in progress in this process
_SIGNALLED: list[int] = []  # the signal being handled (at most one)


def interrupt_message(code: int) -> str:
    """What ``fedsim run`` prints when a signal ended it (exit status ``code``)."""
    name = {130: "interrupted (SIGINT)", 143: "terminated (SIGTERM)"}.get(code, "interrupted")
    return f"{name}: the run directory keeps what was written so far (summary.json: status interrupted)"


def _on_signal(signum: int, frame: Any) -> None:
    if _SIGNALLED:  # a second signal while the first is handled: the run files are written already
        hard_exit(128 + _SIGNALLED[0])
    _SIGNALLED.append(signum)
    for run in list(_ACTIVE_RUNS):
        run.interrupt(signum)
    if _ACTIVE_RUNS and _teardown_local_ray():
        # The summary is written and Ray's processes are gone: leave now. Going through Flower's and Ray's own
        # shutdown took 2-8 s after SIGINT on a busy machine, and after a SIGTERM to the process group (timeout,
        # Slurm), which kills the raylet first, Ray's shutdown waits ~8 s on it.
        print(interrupt_message(128 + signum), file=sys.stderr)
        hard_exit(128 + signum)
    raise Interrupted(signum)


def _teardown_local_ray(timeout: float = 2.0) -> bool:
    """Stop the Ray node this process started and every process below it (raylet, dashboard, log monitor, workers,
    agents: SIGTERM, then SIGKILL after ``timeout`` s; the GCS server last, killed), and wait until they are gone;
    True when it did.
    A joined cluster (``simulation.ray_address``) is left alone (False), as is anything this Ray version does not
    expose."""
    try:
        worker = sys.modules.get("ray._private.worker")
        node = getattr(worker, "_global_node", None) if worker is not None else None
        if node is None or not node.is_head():
            return False
        procs = [info.process for kind, infos in node.all_processes.items() for info in infos if kind != "gcs_server"]
        gcs = [info.process for info in node.all_processes.get("gcs_server", [])]
    except Exception:  # noqa: BLE001 - private Ray API: fall back to Ray's own shutdown
        return False
    below = set(descendants(os.getpid()))  # before the raylet dies and its workers are re-parented
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(max(0.0, deadline - time.monotonic()))
    # the GCS server holds only this run's in-memory cluster state, and its graceful exit waits seconds on the
    # raylet it outlived: once everything else is gone, it is killed
    gcs_pids = {proc.pid for proc in gcs}
    while time.monotonic() < deadline and any(alive(pid) for pid in below - gcs_pids):
        time.sleep(0.05)
    procs += gcs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
    for pid in below:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(1.0)
    end = time.monotonic() + 1.0  # a killed process takes a moment to go
    while time.monotonic() < end and any(alive(pid) for pid in below):
        time.sleep(0.02)
    return True


_handlers_installed = [False]  # inside signals_interrupt_runs()


def _install_signal_handlers() -> None:
    """(Re)install fedsim's handlers, inside ``signals_interrupt_runs`` only (``ray.init`` replaces them)."""
    if _handlers_installed[0] and threading.current_thread() is threading.main_thread():
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def signals_interrupt_runs() -> Iterator[None]:
    """Within: SIGINT and SIGTERM interrupt the running scenario (see the module docstring). Main thread only;
    elsewhere (and nested) it changes nothing."""
    if threading.current_thread() is not threading.main_thread() or _handlers_installed[0]:
        yield
        return
    _SIGNALLED.clear()
    previous = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    _handlers_installed[0] = True
    try:
        _install_signal_handlers()
        yield
    finally:
        _handlers_installed[0] = False
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _SIGNALLED.clear()


class StoppableGrid(Grid):
    """Flower's grid as the server part sees it, with a stop switch: once ``stop`` is set (an interrupt), the
    next call raises ``Interrupted`` in the server thread, so the server part ends within one poll instead of
    waiting ``simulation.timeout`` for replies that will never come. Also notes how the latest batch of messages
    went, to explain a failure of every client."""

    POLL = 0.05

    def __init__(self, inner: Grid, stop: threading.Event, signum: list[int]) -> None:
        self.inner = inner
        self.stop = stop
        self._signum = signum
        # the latest batch of messages pushed, and how their replies went (to explain "every client failed")
        self.batch: set[str] = set()
        self.batch_group = ""
        self.batch_ok = 0
        self.batch_errors: list[str] = []
        self.replies_ok = 0  # over the whole run, discovery aside
        self.replies_failed = 0
        self.first_error = ""

    def _check(self) -> None:
        if self.stop.is_set():
            raise Interrupted(self._signum[0] if self._signum else signal.SIGINT)

    def set_run(self, run) -> None:  # noqa: ANN001
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        # (Flower's strategies push empty batches too, e.g. with fraction_evaluate = 0; discovery is no round)
        if ids and messages[0].metadata.message_type != MessageType.QUERY:
            self.batch, self.batch_ok, self.batch_errors = set(ids), 0, []
            self.batch_group = _round_of(messages[0])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        replies = list(self.inner.pull_messages(message_ids))
        for msg in replies:
            if msg.metadata.reply_to_message_id in self.batch:
                if msg.has_error():
                    self.batch_errors.append(msg.error.reason)
                    self.replies_failed += 1
                    self.first_error = self.first_error or msg.error.reason
                else:
                    self.batch_ok += 1
                    self.replies_ok += 1
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        out: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            out += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.time() > deadline):
                break
            if not got:
                self.stop.wait(self.POLL)
        return out


def _round_of(msg: Message) -> str:
    """The round a server message belongs to: fedsim's engine record, Flower's ``server-round``, or the group."""
    with contextlib.suppress(Exception):
        for record in msg.content.config_records.values():
            for key in ("round", "server-round"):
                if key in record:
                    return str(int(record[key]))
    return str(msg.metadata.group_id or "")


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
    from fedsim.engine.ray_session import ray_address

    if num_gpus > 0 and gpus == 0 and ray_address(config) is None:  # a cluster has GPUs of its own
        raise ConfigError(
            f"simulation.num_gpus: {num_gpus} GPUs per client requested but no GPU is visible on this machine "
            "(Flower's Ray backend would fail with 'ActorPool is empty'); set it to 0 or leave it unset"
        )
    return {"num_cpus": float(sim.num_cpus), "num_gpus": float(num_gpus)}


def run_scenario(config: ScenarioConfig, out_dir: str | Path, *, label: str | None = None,
                 show_progress: bool = True, grid: Grid | None = None) -> dict[str, Any]:
    """Run ``config`` and write its run directory ``out_dir``; return the summary.

    ``grid``: the Flower grid of a runtime that someone else started (``flwr run`` in simulation or on the
    deployment engine, see ``fedsim.flower_app``); the server part runs on it and ``simulation.backend`` is not
    used. Without it fedsim starts the clients itself (Ray, or inline).

    The previous run in ``out_dir`` is invalidated first (``RunRecorder.start``). Interrupting (Ctrl-C, SIGTERM)
    keeps config.json, partition.csv, the finished rows of metrics.csv and writes a summary.json with
    ``status = "interrupted"``; a failure (data loading included) writes ``status = "failed"`` and ``error``.
    """
    if not config.simulation.verbose:  # Flower's per-round INFO log and run_simulation's deprecation notice
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("ray").setLevel(logging.WARNING)
    spec = get_strategy(config.strategy.name)
    recorder = RunRecorder(out_dir)
    config_entry = dict(label=label, seed=config.seed)
    recorder.start(config.to_dict(), **config_entry)
    run = _Run(config, spec, recorder, label)
    outcome = run.outcome
    _ACTIVE_RUNS.append(run)
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

        def server_main(grid: Grid) -> None:
            try:
                stoppable = StoppableGrid(grid, run.stop, run.signum)
                outcome["grid"] = stoppable
                acc_grid = AccountingGrid(stoppable, config.num_nodes)
                ctx = ServerContext(config, acc_grid, recorder, progress, partitions)
                outcome["ctx"] = ctx
                acc_grid.discover()
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
                _run_on_ray(config, client_app, server_main)
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
        _ACTIVE_RUNS.remove(run)
        summary = run.summary(status, error)
        try:
            recorder.write_summary(summary)
        finally:
            recorder.close()
    missing = [k for k in REQUIRED_SUMMARY_KEYS if summary.get(k) is None]
    if missing:
        raise RunFailed(f"strategy {spec.name!r} did not report {', '.join(missing)} (call ctx.summary)")
    return summary


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


def _run_on_ray(config: ScenarioConfig, client_app, server_main) -> None:  # noqa: ANN001
    """Flower's simulation engine with the Ray backend; configuration travels inside the apps. Ray comes from the
    command's ``ray_session`` (one Ray for all variants) or, called alone, from a session of this run's own."""
    from flwr.simulation import run_simulation

    from fedsim.engine.ray_session import ray_session

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
    """Start (or join) Ray once per session (``fedsim.engine.ray_session.ensure_ray``), then take SIGINT/SIGTERM
    back: ``ray.init`` replaces the driver's SIGTERM handler (with ``sys.exit``, and a C++ failure handler that
    aborts: exit 134 without a summary), so fedsim starts Ray itself (Flower's backend then finds it running)."""
    from fedsim.engine.ray_session import ensure_ray

    init_args = ensure_ray(config)
    _install_signal_handlers()
    return init_args
