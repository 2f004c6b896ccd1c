"""Every ``fedsim ...`` command of the README's "Command line" block (and of "Bring your own model, data and
method") keeps working (issue #21): each is parsed by the real argument parser and passes the checks ``fedsim
validate`` makes (the scenario with its --set/--only/--seeds/--sweep, the parts, for deploy the SuperNodes, the
preflight); the cheap ones run for real (``fedsim list``, ``validate``, the README's plugin example, and the
seeds/sweep/report chain with small data overrides on the bundled digits set: about 20 s)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import inline_digits_scenario

from fedsim.cli import _check_parts, build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")

PLUGIN_SCENARIO = inline_digits_scenario("count")


def _block(heading: str, lang: str, index: int = 0) -> str:
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, re.S)
    return blocks[index]


def readme_commands() -> list[str]:
    lines = _block("Command line", "bash").splitlines() + _block("Bring your own model, data and method",
                                                                   "bash").splitlines()
    out = []
    for line in lines:
        line = line.split("  #", 1)[0].strip()
        if line.startswith("fedsim "):
            out.append(line)
    return out


COMMANDS = readme_commands()


def test_the_readme_has_the_commands():
    assert len(COMMANDS) >= 12 and any("--plugin" in c for c in COMMANDS) and any("LABEL" not in c and ":" in c
                                                                                  for c in COMMANDS)


@pytest.fixture(scope="module")
def plugin_files(tmp_path_factory):
    """The README's plugin example as a file outside the repository (one per test process: a plugin's module
    name is taken once it is imported), and a scenario using it."""
    import os

    before = os.environ.get("FEDSIM_PLUGINS")
    folder = tmp_path_factory.mktemp("elsewhere")
    plugin = folder / "my_method.py"
    plugin.write_text(_block("Bring your own model, data and method", "python"))
    scenario = folder / "my_scenario.toml"
    scenario.write_text(PLUGIN_SCENARIO)
    yield plugin, scenario
    if before is None:  # the plugin records itself for the processes fedsim starts; not for the other tests
        os.environ.pop("FEDSIM_PLUGINS", None)
    else:
        os.environ["FEDSIM_PLUGINS"] = before


def _argv(command: str, plugin: Path, scenario: Path, tmp_path: Path) -> list[str]:
    argv = []
    for word in shlex.split(command)[1:]:
        word = {"my_method.py": str(plugin), "path/to/my_method.py": str(plugin),
                "my_scenario.toml": str(scenario)}.get(word, word)
        if word.startswith("scenarios/"):
            word = str(REPO / word)
        argv.append(word)
    if argv[0] in ("run", "deploy") and "--out" in argv:  # never into the repository
        i = argv.index("--out") + 1
        argv[i] = str(tmp_path / "out" / Path(argv[i]).name)
    return argv


def _validate_level(argv: list[str], tmp_path: Path) -> None:
    """What fedsim run / deploy / report check before they start, without running anything."""
    from fedsim.preflight import preflight
    from fedsim.registry import load_plugins
    from fedsim.sweep import parse_seeds, plan_jobs

    args = build_parser().parse_args(argv)
    load_plugins(args.plugin if hasattr(args, "plugin") else [])
    if args.command == "run":
        seeds = parse_seeds(args.seeds) if args.seeds else None
        jobs, _ = plan_jobs(args.scenario, args.set, args.only, tmp_path / "plan", seeds=seeds, sweeps=args.sweep)
        _check_parts([(job.label, job.config) for job in jobs])
        for job in {(j.label, j.point): j for j in jobs}.values():
            preflight(job.config, label=job.name)
    elif args.command == "deploy":
        from fedsim.config import load_scenarios, select_variants

        loaded = select_variants(load_scenarios(args.scenario, args.set), args.only)
        _check_parts(loaded, args.nodes)
        for label, config in loaded:
            preflight(config, label=label)
    elif args.command == "report":
        assert args.dirs  # the directories come from earlier runs: test_the_seeds_sweep_and_report_commands_run
    else:
        assert main(argv) == 0, argv


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_passes_validation(command, plugin_files, tmp_path):
    plugin, scenario = plugin_files
    _validate_level(_argv(command, plugin, scenario, tmp_path), tmp_path)


def test_the_readme_plugin_example_runs(plugin_files, tmp_path):
    import json

    plugin, scenario = plugin_files
    command = next(c for c in COMMANDS if c.startswith("fedsim run my_scenario.toml"))
    argv = _argv(command, plugin, scenario, tmp_path) + ["--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["examples"] == 1437.0


def test_the_seeds_sweep_and_report_commands_run(plugin_files, tmp_path):
    """The README's seeds, sweep and report commands for real, on digits (small data overrides)."""
    plugin, scenario = plugin_files
    small = ["--set", "data.name=digits", "--set", "partition.num_clients=5", "--set", "model.feature_dim=64",
             "--set", "simulation.backend=inline", "--quiet"]
    sweep = next(c for c in COMMANDS if "--sweep" in c)
    argv = _argv(sweep, plugin, scenario, tmp_path) + ["--out", str(tmp_path / "s")] + small
    assert main(argv) == 0
    report = next(c for c in COMMANDS if c.startswith("fedsim report") and "--csv" in c)
    argv = [w if w != "runs/s" else str(tmp_path / "s") for w in _argv(report, plugin, scenario, tmp_path)]
    argv = [str(tmp_path / "stats.csv") if w == "stats.csv" else w for w in argv]
    assert main(argv) == 0 and (tmp_path / "stats.csv").is_file()
