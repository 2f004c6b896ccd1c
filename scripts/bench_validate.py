"""How long ``fedsim validate`` takes on each shipped scenario, and ``fedsim list`` (target: under 1 s each).

Each command runs as the user runs it, a fresh process of the ``fedsim`` entry point (``python -m fedsim.cli``
where the venv has none), ``--repeat`` times; prints the best and the median wall time and marks those above the
target. Exits 1 when a median is above it (a check to run by hand or in CI, never inside the unit tests: timings
on a shared machine vary).

    python scripts/bench_validate.py                  # every scenarios/*.toml and fedsim list, 3 runs each
    python scripts/bench_validate.py --repeat 5 scenarios/afl-fmnist.toml
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0


def fedsim_command() -> list[str]:
    entry = Path(sys.executable).with_name("fedsim")
    return [str(entry)] if entry.is_file() else [sys.executable, "-m", "fedsim.cli"]


def wall_time(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(fedsim_command() + argv, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help="scenario files (default: every scenarios/*.toml)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (default 3)")
    args = parser.parse_args()
    scenarios = args.scenarios or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scenarios").glob("*.toml"))
    commands = [["validate", s] for s in scenarios] + [["list"]]
    slow = 0
    print(f"{'command':<52} {'best':>7} {'median':>7}  (target < {TARGET_S:.1f} s)")
    for argv in commands:
        times = [wall_time(argv) for _ in range(args.repeat)]
        median = statistics.median(times)
        over = median >= TARGET_S
        slow += over
        print(f"fedsim {' '.join(argv):<45} {min(times):>6.2f}s {median:>6.2f}s{'  SLOW' if over else ''}")
    if slow:
        print(f"{slow} of {len(commands)} commands took {TARGET_S:.1f} s or more", file=sys.stderr)
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
