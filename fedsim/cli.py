"""Command line: ``fedsim run``, ``fedsim list``, ``fedsim report``, ``fedsim validate``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
from pathlib import Path

from fedsim.errors import FedsimError


def _default_out(scenario: str | None) -> Path:
    stem = Path(scenario).stem if scenario else "run"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stem}-{stamp}"


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.config import load_scenarios, select_variants
    from fedsim.engine.runner import run_scenario
    from fedsim.report import report
    from fedsim.results import completed_run_of

    every = load_scenarios(args.scenario, args.set)
    variants = select_variants(every, args.only)
    out = Path(args.out) if args.out else _default_out(args.scenario)
    # a scenario without [[variants]] writes into --out itself; one with variants, one folder per label (also
    # under --only, so a later --resume or report finds every variant where the full run puts it)
    single = len(every) == 1
    for i, (label, config) in enumerate(variants, 1):
        run_dir = out if single else out / label
        if args.resume:
            done = completed_run_of(run_dir, config.to_dict())
            if done is False:
                raise FedsimError(f"--resume: {run_dir} holds a completed run of a different configuration "
                                  f"(variant {label!r}); choose another --out or remove that directory")
            if done:
                if not args.quiet:
                    print(f"[{i}/{len(variants)}] {label}: completed earlier in {run_dir}, skipped", file=sys.stderr)
                continue
        if not args.quiet:
            print(f"[{i}/{len(variants)}] {label}: {config.strategy.name} on {config.data.name}, "
                  f"{config.num_clients} clients ({config.partition.kind}) -> {run_dir}", file=sys.stderr)
        run_scenario(config, run_dir, label=label, show_progress=not args.quiet)
    report([out], show=not args.quiet)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.config import load_scenarios

    for label, config in load_scenarios(args.scenario, args.set):
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
    from fedsim.report import report

    report(args.dirs, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario file (all its variants) and print the comparison")
    run.add_argument("scenario", help="scenario TOML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set partition.alpha=0.1 (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/<scenario>-<time>)")
    run.add_argument("--only", action="append", default=[], metavar="LABEL",
                     help="run only this variant (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--resume", action="store_true",
                     help="with --out of an earlier (interrupted) run: skip the variants it completed with the same "
                          "configuration, run the others again")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a scenario file without running it")
    val.add_argument("scenario")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.set_defaults(func=cmd_validate)

    lst = sub.add_parser("list", help="datasets, partitions, streams, models and strategies")
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="compare run directories: table + accuracy plots")
    rep.add_argument("dirs", nargs="+", help="run directories, or folders holding them")
    rep.add_argument("--out", help="where to write the plots and report.csv")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run directory keeps what was written so far", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
