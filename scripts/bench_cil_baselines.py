"""Tables of the issue #25 class-incremental baselines from finished runs (docs/results-cil-baselines.md).

Reads every ``<dir>/<label>/seed-<s>/summary.json`` under the run directories given (as ``fedsim run --seeds``
writes them; several directories can hold the seeds or variants of one scenario) and prints one markdown row per
label: the seeds found, last accuracy (``final_accuracy``), average incremental accuracy and forgetting as mean ±
sample standard deviation (one seed: the value alone), and the mean wall time. Runs that did not complete are
listed apart, never averaged. ``--check-equal A B`` asserts that two labels have the same accuracy matrices seed by
seed (the federated analytic rows against their centralized ones)::

    fedsim run scenarios/cil-fmnist-d512.toml --seeds 0,1,2 --out runs/cil-fmnist-d512
    python scripts/bench_cil_baselines.py runs/cil-fmnist-d512
    python scripts/bench_cil_baselines.py runs/cil-analytic-federated \\
        --check-equal acil-centralized acil-federated --check-equal ds-al-centralized ds-al-federated
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METRICS = [("last acc", "final_accuracy"), ("avg inc acc", "average_incremental_accuracy"),
           ("forgetting", "forgetting")]


def collect(dirs: list[Path]) -> tuple[dict, list]:
    """{label: {seed: summary}} of the completed runs, and the paths of the others."""
    runs: dict = defaultdict(dict)
    unfinished = []
    for root in dirs:
        for seed_dir in sorted(root.glob("*/seed-*")):
            label, seed = seed_dir.parent.name, int(seed_dir.name.split("-", 1)[1])
            path = seed_dir / "summary.json"
            summary = json.loads(path.read_text()) if path.exists() else None
            if summary is None or summary.get("status") != "completed":
                unfinished.append(str(seed_dir))
                continue
            if seed in runs[label]:
                raise SystemExit(f"{label} seed {seed} is in two directories: give one of them")
            summary["_dir"] = seed_dir
            runs[label][seed] = summary
    return runs, unfinished


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: dict) -> str:
    lines = ["| method | seeds | " + " | ".join(name for name, _ in METRICS) + " | wall s (mean) |",
             "|---" * (len(METRICS) + 3) + "|"]
    for label, by_seed in runs.items():
        seeds = sorted(by_seed)
        cells = [cell([float(by_seed[s][key]) for s in seeds]) for _, key in METRICS]
        wall = statistics.mean(float(by_seed[s]["wall_seconds"]) for s in seeds)
        lines.append(f"| {label} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + f" | {wall:,.0f} |")
    return "\n".join(lines)


def check_equal(runs: dict, a: str, b: str) -> str:
    """The two labels' accuracy matrices, seed by seed: equal to the last digit (raises otherwise)."""
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    if not seeds:
        raise SystemExit(f"--check-equal {a} {b}: no seed completed for both")
    for s in seeds:
        ma = (runs[a][s]["_dir"] / "accuracy_matrix.csv").read_text()
        mb = (runs[b][s]["_dir"] / "accuracy_matrix.csv").read_text()
        if ma != mb:
            raise SystemExit(f"{a} and {b} differ on seed {s}:\n{ma}\n{mb}")
    return f"{a} = {b}: accuracy matrices identical on seeds {', '.join(map(str, seeds))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories (fedsim run --seeds ... --out DIR)")
    parser.add_argument("--check-equal", nargs=2, action="append", default=[], metavar=("A", "B"))
    args = parser.parse_args(argv)
    runs, unfinished = collect(args.dirs)
    print(table(runs))
    for path in unfinished:
        print(f"not completed (left out): {path}")
    for a, b in args.check_equal:
        print(check_equal(runs, a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
