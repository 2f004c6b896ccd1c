"""Seeds and sweeps for ``fedsim run``: expand a scenario's variants into one run per (variant, sweep point, seed).

Layout under ``--out`` (each leaf a normal run directory)::

    DIR/<label>/seed-<s>/                         --seeds
    DIR/<label>/<key>=<v>[,<key2>=<v2>]/seed-<s>/ --sweep key=...  (and --seeds)
    DIR/<label>/<key>=<v>/                        --sweep without seeds

A sweep point wins over a variant's own ``set``. A variant whose configuration a sweep leaves unchanged (e.g.
``--sweep strategy.gamma=...`` on a FedAvg variant, which has no gamma) runs once, without the point level, with a
printed line naming it, instead of once per point. Torch-free (only the config is read).
"""

from __future__ import annotations

import re
import sys
import typing
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from fedsim.config import (ScenarioConfig, load_scenarios, override_skip_reason, parse_value, scenario_seeds,
                           select_variants)
from fedsim.errors import ConfigError

SEED_DIR = re.compile(r"^seed-(\d+)$")
POINT_PATTERN = re.compile(r"[A-Za-z0-9._=,+-]+")  # fullmatch: the whole name, no trailing newline
MAX_POINT_LENGTH = 200  # a sweep point is one directory name (< 255 bytes)


@dataclass
class Job:
    """One run of the expanded plan."""

    label: str  # the variant label
    point: str | None  # the sweep point's directory name ("key=v,..."), None outside a sweep
    seed: int | None  # None: the scenario's own `seed`, no seed level
    config: ScenarioConfig
    run_dir: Path

    @property
    def name(self) -> str:
        """How progress lines and errors name the run: label[/point][/seed-s]."""
        parts = [self.label] + ([self.point] if self.point else []) + ([f"seed-{self.seed}"] if self.seed is not None
                                                                        else [])
        return "/".join(parts)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2]; ``--seeds 5`` -> [0, 1, 2, 3, 4]."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is not a seed count (5 = seeds 0..4) or a comma list of seeds "
                          "(0,1,2)") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"--seeds: {text!r}: seeds must be integers >= 0 (a count > 0, or a list)")
    if len(values) == 1:
        if values[0] == 0:
            raise ConfigError("--seeds: 0 seeds; give a count > 0 (5 = seeds 0..4) or a list (0,1,2)")
        values = list(range(values[0]))
    if len(set(values)) != len(values):
        raise ConfigError(f"--seeds: {text!r} lists a seed twice")
    return values


def parse_sweeps(items: typing.Iterable[str]) -> list[tuple[str, list[str]]]:
    """``--sweep key=v1,v2`` (repeatable) -> [(key, ["v1", "v2"])]: the grid's axes, values as typed."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ConfigError(f"--sweep {item!r}: expected key=v1,v2,..., e.g. --sweep partition.alpha=0.1,0.5")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--sweep {key}: swept twice; give all its values in one --sweep")
        if key in ("seed", "seeds"):
            raise ConfigError(f"--sweep {key}: use --seeds for seeds")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--sweep {key}: a value is listed twice")
        for v in vals:
            name = f"{key}={v}"
            if not POINT_PATTERN.fullmatch(name):
                raise ConfigError(f"--sweep {name}: sweep points name run directories, so keys and values may use "
                                  "letters, digits, '.', '_', '+' and '-' only")
            if isinstance(parse_value(v), (list, dict)):
                raise ConfigError(f"--sweep {name}: arrays and tables cannot be swept")
        axes.append((key, vals))
    return axes


def grid(axes: list[tuple[str, list[str]]]) -> list[tuple[str | None, list[str]]]:
    """Every point of the grid as (directory name, ``--set`` items); [(None, [])] without axes."""
    if not axes:
        return [(None, [])]
    points = []
    for values in product(*(vals for _, vals in axes)):
        pairs = [f"{key}={v}" for (key, _), v in zip(axes, values, strict=True)]
        name = ",".join(pairs)
        if len(name) > MAX_POINT_LENGTH:
            raise ConfigError(f"--sweep: the sweep point {name[:40] + '...'!r} is {len(name)} characters long; it "
                              f"names a run directory, so at most {MAX_POINT_LENGTH} (sweep fewer keys or shorter "
                              "values)")
        points.append((name, pairs))
    return points


def plan_jobs(scenario: str | Path, overrides: list[str], only: list[str], out: Path,
              seeds: list[int] | None = None, sweeps: typing.Iterable[str] = (),
              show: bool = False) -> tuple[list[Job], bool]:
    """The runs of ``fedsim run`` with seeds and sweeps, and whether the scenario has a single unnamed variant
    (then its runs go directly under ``out``). ``seeds`` None: the scenario's ``seeds`` key, if any.

    A sweep point is applied to every variant after its own ``set`` (a sweep is the experiment's axis: it wins),
    except to a variant that cannot take the key (``fedsim.config.override_skip_reason``: a strategy parameter its
    strategy lacks, rounds its strategy defines): that variant runs once, without the point level, and ``show``
    prints one line naming it; never the same run twice. ``--set`` notes (a variant's set winning) are printed
    too."""
    axes = parse_sweeps(sweeps)
    if seeds is None:
        seeds = scenario_seeds(scenario)
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    points = grid(axes)
    # label -> point -> config (each loaded through the same validation as --set)
    loaded: dict[str, dict[str | None, ScenarioConfig]] = {}
    single = True
    notes: list[str] = []
    for point, items in points:
        every = load_scenarios(scenario, list(overrides), sweep=items, notes=notes if point == points[0][0] else None)
        single = len(every) == 1
        chosen = {label for label, _ in select_variants(every, only)} if only else None
        for label, config in every:
            if chosen is None or label in chosen:
                loaded.setdefault(label, {})[point] = config
    cache: dict[tuple[str | None, int], dict[str, ScenarioConfig]] = {}

    def at_seed(point: str | None, seed: int) -> dict[str, ScenarioConfig]:
        # the variants at sweep ``point`` with ``seed = seed``, validated like ``--set seed=...``
        if (point, seed) not in cache:
            items = dict(points)[point]
            cache[point, seed] = dict(load_scenarios(scenario, list(overrides) + [f"seed={seed}"], sweep=items))
        return cache[point, seed]

    if show:
        for line in dict.fromkeys(notes):
            print(f"note: {line}", file=sys.stderr)
    jobs = []
    for label, by_point in loaded.items():
        dicts = [c.to_dict() for c in by_point.values()]
        unchanged = all(d == dicts[0] for d in dicts)
        if show and unchanged and axes and not single:
            first = next(iter(by_point.values()))
            reasons = [f"{key}: {override_skip_reason(first.to_dict(), key) or 'leaves it unchanged'}"
                       for key, _ in axes]
            print(f"note: --sweep: variant {label!r} runs once, without the sweep point ({'; '.join(reasons)})",
                  file=sys.stderr)
        base = out if single else out / label
        for point, config in by_point.items():
            if point is not None and unchanged and point != points[0][0]:
                continue  # the sweep does not touch this variant: one run, no point level
            shown = None if (point is None or unchanged) else point
            where = base / shown if shown else base
            for seed in seed_list:
                cfg = config if seed is None else at_seed(point, seed)[label]
                jobs.append(Job(label, shown, seed, cfg, where / f"seed-{seed}" if seed is not None else where))
    return jobs, single
