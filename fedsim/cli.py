"""Command line: ``fedsim run``, ``fedsim deploy``, ``fedsim list``, ``fedsim report``, ``fedsim validate``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from fedsim.errors import ConfigError, DataUnavailableError, FedsimError


def _out_dir(args: argparse.Namespace) -> Path:
    """``--out``, else the default run directory (``fedsim.results.rundir.default_out``, imported here: it pulls
    in pandas, which ``fedsim list`` and ``validate`` do not need)."""
    if args.out:
        return Path(args.out)
    from fedsim.results.rundir import default_out

    return default_out(args.scenario)


_HELD_DIRS = contextlib.ExitStack()  # the run directories this command holds (released when main returns)
_WATCHED: list[tuple[Path, bool]] = []  # run directories of this command (, whether their subfolders are too)
_STARTED = [0.0]  # when main began: a summary.json older than that is not this command's


def _hold(run_dir: Path) -> None:
    """Lock ``run_dir`` for this command (``fedsim.results.rundir.lock_run_dir``: a second fedsim run into it is
    refused) until ``main`` returns; the kernel drops it if the process dies."""
    from fedsim.results.rundir import lock_run_dir

    _WATCHED.append((Path(run_dir), False))
    _HELD_DIRS.enter_context(lock_run_dir(run_dir))


def _summaries_since_start() -> dict[Path, object]:
    """The run directories of this command with a summary.json written since it started: their status."""
    if not _WATCHED:
        return {}
    import json

    found: dict[Path, object] = {}
    for where, children in _WATCHED:
        candidates = [where]
        if children:
            with contextlib.suppress(OSError):
                candidates += sorted(p for p in where.iterdir() if p.is_dir())
        for run_dir in candidates:
            summary = run_dir / "summary.json"
            try:
                if summary.stat().st_mtime < _STARTED[0] - 1:
                    continue
                status = json.loads(summary.read_text(encoding="utf-8")).get("status")
            except (OSError, ValueError, AttributeError):
                continue
            found.setdefault(run_dir, status)
    return found


def _interrupt_line(code: int) -> str:
    """The one line a signal that ended the command prints: what the run directories really say. Imports
    nothing (an interrupt may come while a module is half imported)."""
    name = {130: "interrupted (SIGINT)", 143: "terminated (SIGTERM)"}.get(code, "interrupted")
    written = _summaries_since_start()
    dirs = [run_dir for run_dir, status in written.items() if status == "interrupted"]
    if dirs:
        where = str(dirs[0]) if len(dirs) == 1 else f"{dirs[0]} and {len(dirs) - 1} more"
        return f"{name}: the run directory keeps what was written so far ({where}; summary.json: status interrupted)"
    if not written:
        return f"{name}: before any run started; no summary.json was written"
    return f"{name}: between runs; the runs that ended are kept, no summary.json says interrupted"


def _writable_dir(path: Path) -> None:
    """``--out`` must be (or become) a directory fedsim can write; a ConfigError naming it otherwise. Creates
    nothing: the nearest existing folder on the path must be a writable directory."""
    import os

    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file, not a directory" if probe == path else f"cannot be created: {probe} is a file"
        raise ConfigError(f"--out: {path} {what}; give a directory for the runs")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: cannot write into {path}: {probe} is not writable (read-only file system or "
                          "no permission)")


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.config import load_scenarios, scenario_seeds, select_variants

    if getattr(args, "tensorboard", False):
        args.set = [*args.set, "logging.tensorboard=true"]
    if getattr(args, "mlflow", False):
        args.set = [*args.set, "logging.mlflow=true"]

    if getattr(args, "seeds", None) or getattr(args, "sweep", None) or scenario_seeds(args.scenario):
        return _run_many(args)

    notes: list[str] = []
    every = load_scenarios(args.scenario, args.set, notes=notes)  # torch-free: a bad scenario fails here, fast
    variants = select_variants(every, args.only)
    if not args.quiet:
        _print_notes(notes)
    _check_parts(variants)
    out = _out_dir(args)
    # a scenario without [[variants]] writes into --out itself; one with variants, one folder per label (also
    # under --only, so a later --resume or report finds every variant where the full run puts it)
    single = len(every) == 1
    from fedsim.results import rundir as results
    from fedsim.engine.checkpoint import check_compatible as check_checkpoint

    _writable_dir(out)
    plan = []
    for label, config in variants:
        run_dir = out if single else out / label
        _hold(run_dir)  # from the checks to the end: another fedsim run into it is refused
        todo = results.check_run_dir(run_dir, config.to_dict(), resume=args.resume, overwrite=args.overwrite,
                                     label=None if single else label)
        if todo and args.resume and not args.overwrite:  # its checkpoint must be of this configuration
            check_checkpoint(run_dir, config.to_dict(), None if single else label)
        plan.append((label, config, run_dir, todo))
    if not single and not args.overwrite:  # the report files fedsim writes into --out beside the variants
        results.refuse_foreign_report_files(out)
    from fedsim.engine.ray_session import ray_session
    from fedsim.engine.runner import run_scenario
    from fedsim.engine.signals import signals_interrupt_runs
    from fedsim.preflight import preflight
    from fedsim.results.report import report

    # SIGINT and SIGTERM: exit 130 / 143, the run directory says "interrupted"; one Ray for every variant
    with signals_interrupt_runs(), ray_session():
        for label, config, _, todo in plan:
            if todo:
                preflight(config, label=None if single else label)
        for i, (label, config, run_dir, todo) in enumerate(plan, 1):
            if not todo:
                if not args.quiet:
                    print(f"[{i}/{len(plan)}] {label}: completed earlier in {run_dir}, skipped", file=sys.stderr)
                continue
            if not args.quiet:
                print(f"[{i}/{len(plan)}] {label}: {config.strategy.name} on {config.data.name}, "
                      f"{config.num_clients} clients ({config.partition.kind}) -> {run_dir}", file=sys.stderr)
            run_scenario(config, run_dir, label=label, show_progress=not args.quiet, resume=args.resume)
        try:
            report([out], out_dir=out, show=not args.quiet)
        except (FedsimError, OSError) as exc:  # the runs are complete; only the comparison is missing
            print(f"warning: report: {exc}", file=sys.stderr)
    return 0


def _run_many(args: argparse.Namespace) -> int:
    """``fedsim run`` with ``--seeds`` / ``--sweep`` / a scenario's ``seeds``: one run per (variant, sweep point,
    seed), each a normal run directory (see fedsim.sweep). A run that fails does not stop the others; the command
    exits 1 after the rest ran and the report named what is missing."""
    from fedsim.results import rundir as results
    from fedsim.sweep import parse_seeds, plan_jobs

    seeds = parse_seeds(args.seeds) if getattr(args, "seeds", None) else None
    out = _out_dir(args)
    jobs, _ = plan_jobs(args.scenario, args.set, args.only, out, seeds=seeds, sweeps=getattr(args, "sweep", []),
                        show=not args.quiet)
    _check_parts([(job.label, job.config) for job in jobs])
    _writable_dir(out)
    for job in jobs:  # from the checks to the end: another fedsim run into one of them is refused
        _hold(job.run_dir)
    todo = [results.check_run_dir(j.run_dir, j.config.to_dict(), resume=args.resume, overwrite=args.overwrite,
                                  label=j.name) for j in jobs]
    if args.resume and not args.overwrite:  # an interrupted run's checkpoint must be of its configuration
        from fedsim.engine.checkpoint import check_compatible

        for job, run in zip(jobs, todo):
            if run:
                check_compatible(job.run_dir, job.config.to_dict(), job.name)
    if not args.overwrite:
        results.refuse_foreign_report_files(out)
    from fedsim.engine.ray_session import ray_session
    from fedsim.engine.runner import run_scenario
    from fedsim.engine.signals import signals_interrupt_runs
    from fedsim.preflight import preflight
    from fedsim.results.report import report, write_plan

    write_plan(out, [{"group": job.name.rsplit("/seed-", 1)[0] if job.seed is not None else job.name,
                      "seed": job.seed} for job in jobs])
    failed: list[str] = []
    with signals_interrupt_runs(), ray_session():  # one Ray for every run
        checked = set()
        for job, run_it in zip(jobs, todo, strict=True):
            if run_it and (job.label, job.point) not in checked:
                checked.add((job.label, job.point))
                preflight(job.config, label=job.name)
        for i, (job, run_it) in enumerate(zip(jobs, todo, strict=True), 1):
            if not run_it:
                if not args.quiet:
                    print(f"[{i}/{len(jobs)}] {job.name}: completed earlier in {job.run_dir}, skipped",
                          file=sys.stderr)
                continue
            if not args.quiet:
                print(f"[{i}/{len(jobs)}] {job.name}: {job.config.strategy.name} on {job.config.data.name}, "
                      f"{job.config.num_clients} clients ({job.config.partition.kind}), seed {job.config.seed} "
                      f"-> {job.run_dir}", file=sys.stderr)
            try:
                run_scenario(job.config, job.run_dir, label=job.label, show_progress=not args.quiet,
                             resume=args.resume)
            except Exception as exc:  # noqa: BLE001 -- one seed failing must not lose the others
                failed.append(job.name)
                print(f"error: {job.name}: {exc}", file=sys.stderr)
        try:
            report([out], out_dir=out, show=not args.quiet)
        except (FedsimError, OSError) as exc:
            print(f"warning: report: {exc}", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} runs failed: {', '.join(failed)} (the others are in {out}; "
              "rerun with --resume to retry only those)", file=sys.stderr)
        return 1
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """The scenario on Flower's deployment engine: a SuperLink and --nodes SuperNodes on loopback (fedsim.deploy)."""
    import signal

    from fedsim.deploy import deploy
    from fedsim.engine.signals import Interrupted

    # fedsim.deploy checks the parts as the SuperNodes will serve them (a node of several clients needs reduce)
    # before anything starts, on the one load of the scenario
    out = _out_dir(args)
    _writable_dir(out)
    _WATCHED.append((out, True))  # fedsim.deploy locks its run directories (out or out/<label>) itself

    def _terminate(signum: int, frame: object) -> None:  # SIGTERM as Ctrl-C: the federation is stopped on the way out
        raise Interrupted(signum)

    # Both installed explicitly, as `fedsim run` does: started as a background job of a non-interactive shell (a CI
    # runner, `cmd &` in a script) the process inherits SIGINT ignored, and Python then keeps it ignored, so a Ctrl-C
    # or `kill -INT` would leave the federation running to its end
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        results = deploy(args.scenario, args.nodes, out, overrides=args.set, only=args.only,
                         verbose=args.verbose, timeout=args.timeout, resume=args.resume, overwrite=args.overwrite)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    for label, run_dir, summary in results:
        print(f"{label or summary.get('label')}: {summary.get('status')}, final accuracy "
              f"{summary.get('final_accuracy')}, {summary.get('bytes_up', 0) / 1e6:.1f} MB up -> {run_dir}",
              file=sys.stderr)
    if len(results) > 1:
        from fedsim.results.report import report

        report([out], out_dir=out, show=not args.quiet)
    return 0


def _check_parts(loaded: list, nodes: int | None = None) -> None:
    """``fedsim.registry.check_variants``, imported on use (the CLI starts without the registry)."""
    from fedsim.registry import check_variants

    check_variants(loaded, nodes)


def _print_notes(notes: list[str]) -> None:
    for line in dict.fromkeys(notes):
        print(f"note: {line}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.config import load_scenarios

    notes: list[str] = []
    loaded = load_scenarios(args.scenario, args.set, notes=notes)  # torch-free
    _print_notes(notes)
    _check_parts(loaded, getattr(args, "nodes", None))
    from fedsim.preflight import preflight

    for label, config in loaded:
        preflight(config, label=None if len(loaded) == 1 else label)
        print(f"{label}: ok ({config.strategy.name}, {config.data.name}, {config.num_clients} clients, "
              f"{config.rounds} rounds)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from fedsim.catalog import DATASETS, MODELS, PARTITIONS
    from fedsim.registry import strategies

    def section(title: str, items: dict) -> None:
        print(title)
        for name, text in items.items():
            desc = getattr(text, "description", text)
            print(f"  {name:<22} {desc}")
        print()

    section("datasets (data.name)", DATASETS)
    section("partitions (partition.kind)", PARTITIONS)
    section("streams (stream.kind)", {
        "none": "no stream: federated training on a static partition",
        "class-incremental": "T tasks of disjoint classes (stream.tasks, stream.first_task_classes), seeded order",
        "online": "one pass in mini-batches (stream.batch_size), optional long-tail imbalance, classes over time",
    })
    section("models (model.name)", MODELS)
    print("strategies (strategy.name; their settings go under [strategy])")
    for name, spec in strategies().items():
        print(f"  {name:<22} {spec.description}")
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.params))
        if params:
            print(f"  {'':<22} [{spec.kind}] {params}")
    print()
    from fedsim.registry import broken_strategy_modules

    for path, err in broken_strategy_modules().items():
        print(f"warning: {path} failed to import: {err}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.results.report import report

    report(args.dirs, out_dir=args.out, csv=args.csv, latex=args.latex, markdown=args.markdown, band=args.band)
    return 0


def _plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="import this Python file first (repeatable): it may register strategies "
                             "(fedsim.registry.register_strategy) and names; Ray workers and SuperNodes import it too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario file (all its variants) and print the comparison")
    run.add_argument("scenario", help="scenario TOML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set partition.alpha=0.1 (repeatable); a variant's own set wins "
                          "over it; --set LABEL:key=value sets one variant (wins over its set)")
    run.add_argument("--out", help="run directory (default: runs/<scenario>-<time>)")
    run.add_argument("--only", action="append", default=[], metavar="LABEL",
                     help="run only this variant (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--resume", action="store_true",
                     help="with --out of an earlier (interrupted) run: skip the variants it completed with the same "
                          "configuration, continue an interrupted one from its last finished round (model-rounds "
                          "and FedAvg-family strategies; docs/run-files.md), run the others again")
    run.add_argument("--overwrite", action="store_true",
                     help="allow --out to hold a completed run of another configuration or files fedsim did not "
                          "write (fedsim replaces its own file names there and deletes nothing it did not write)")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log every metrics row as TensorBoard scalars in <run dir>/tensorboard/ (as "
                          "[logging] tensorboard = true; needs the tensorboard extra)")
    run.add_argument("--mlflow", action="store_true",
                     help="also track the run in MLflow: <run dir>/mlflow.db unless [logging] mlflow_tracking_uri "
                          "names a store (as [logging] mlflow = true; needs the mlflow extra)")
    run.add_argument("--seeds", metavar="N|S1,S2,...",
                     help="run every variant once per seed: a count (5 = seeds 0..4) or a list (0,1,2); writes "
                          "OUT/<label>/seed-<s>/ (replaces the scenario's `seeds = [...]`)")
    run.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="run every variant at each value of a setting (repeatable: the grid over several keys); "
                          "writes OUT/<label>/<key>=<v>/[seed-<s>/]")
    _plugin_flag(run)
    run.set_defaults(func=cmd_run)

    dep = sub.add_parser("deploy", help="run a scenario on Flower's deployment engine: a SuperLink and N "
                                        "SuperNodes on this machine (loopback), through flwr run")
    dep.add_argument("scenario", help="scenario TOML file")
    dep.add_argument("--nodes", type=int, default=2, help="SuperNodes to start (each serves an equal block of "
                                                         "clients; default 2)")
    dep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set rounds=3 (repeatable)")
    dep.add_argument("--out", help="run directory (default: runs/<scenario>-<time>)")
    dep.add_argument("--only", action="append", default=[], metavar="LABEL", help="run only this variant")
    dep.add_argument("--timeout", type=float, default=None, help="seconds one variant's run may take")
    dep.add_argument("--verbose", action="store_true", help="show flwr run's output (the run's log)")
    dep.add_argument("--quiet", action="store_true", help="no report table")
    dep.add_argument("--resume", action="store_true", help="as fedsim run --resume: skip the variants completed "
                                                          "in --out with the same configuration")
    dep.add_argument("--overwrite", action="store_true", help="as fedsim run --overwrite: allow --out to hold a "
                                                             "completed run of another configuration or foreign files")
    _plugin_flag(dep)
    dep.set_defaults(func=cmd_deploy)

    val = sub.add_parser("validate", help="check a scenario file without running it")
    val.add_argument("scenario")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--nodes", type=int, default=None, help="also check the scenario for fedsim deploy --nodes N "
                                                              "(a SuperNode serving several clients needs reduce)")
    _plugin_flag(val)
    val.set_defaults(func=cmd_validate)

    lst = sub.add_parser("list", help="datasets, partitions, streams, models and strategies")
    _plugin_flag(lst)
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="compare run directories: table + accuracy plots")
    rep.add_argument("dirs", nargs="+", help="run directories, or folders holding them")
    rep.add_argument("--out", help="where to write the plots and report.csv")
    rep.add_argument("--csv", metavar="FILE",
                     help="write the statistics per label (and sweep point): label, n, <metric>_mean, _std, _ci95")
    rep.add_argument("--latex", nargs="?", const="-", metavar="FILE",
                     help="the tables for a paper as LaTeX (booktabs; mean +- std, best per column in bold) into "
                          "FILE, or printed alone (no terminal table) without FILE")
    rep.add_argument("--markdown", nargs="?", const="-", metavar="FILE",
                     help="the same tables as Markdown into FILE, or printed alone without FILE")
    rep.add_argument("--band", choices=("std", "ci95"), default="std",
                     help="the shaded band of the curves over seeds: +- 1 std (default) or the 95%% CI of the mean")
    rep.set_defaults(func=cmd_report)
    return parser


def _leave_without_waiting_for_threads(code: int, grace: float = 1.0) -> None:
    """After an interrupt, Flower's non-daemon threads may still wait on replies that will never come; give them
    ``grace`` seconds, then exit without joining them (the run files are written already)."""
    import threading
    import time

    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon and t is not threading.current_thread() for t in threading.enumerate()):
        _hard_exit(code)


def main(argv: list[str] | None = None) -> int:
    """The ``fedsim`` command. Called as the program (``argv`` None), an interrupt exits the process at once once
    the run files are written: tearing down an interpreter holding torch, Flower and Ray took 1-7 s on a busy
    machine; called with ``argv`` (tests, scripts), it returns the exit status instead."""
    as_program = argv is None
    _STARTED[0] = time.time()
    _WATCHED.clear()
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "plugin", None):  # before the scenario is read: a plugin may add names and strategies
            from fedsim.registry import load_plugins

            load_plugins(args.plugin)
        return args.func(args)
    except DataUnavailableError as exc:  # its messages name the dataset and files; the field is data (or weights)
        field = "model.weights" if str(exc).startswith("Pretrained weights") else "data"
        print(f"error: {field}: {exc}", file=sys.stderr)
        return 2
    except FedsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # one line, no traceback, and no import: the interrupt may have come in the middle of one (torch, numpy),
        # which a second import of the same module turns into an ImportError
        code = getattr(exc, "exit_code", 130)
        code = code if isinstance(code, int) else 130
        with contextlib.suppress(Exception):
            print(_interrupt_line(code), file=sys.stderr)
        if as_program:
            with contextlib.suppress(Exception):
                _HELD_DIRS.close()
            _hard_exit(code)
        _leave_without_waiting_for_threads(code)
        return code
    finally:
        _HELD_DIRS.close()  # the run directories' locks


def _hard_exit(code: int) -> None:
    """Flush and leave now (as ``fedsim.engine.processes.hard_exit``, without importing it)."""
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
