"""What one Ray session per command saves: the main job's Ray-backed variants in one ``fedsim run`` against one
command per variant (each then starts and stops its own Ray, as fedsim did before the session).

Both on the main job's federation part (``scenarios/demo-fmnist.toml``: afl, fusefl, fedavg-oneshot, fedavg,
centralized; the continual variants run inline and start no Ray), on a small slice so that the start-up cost is
visible beside the training (``--max-train``, default 2000 images). Prints the wall time of each way and the
difference per variant.

    python scripts/bench_ray_session.py                 # about 3 minutes on 2 cores
    python scripts/bench_ray_session.py --max-train 10000   # the main job's own slice
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "demo-fmnist.toml"
RAY_VARIANTS = ("afl", "fusefl", "fedavg-oneshot", "fedavg", "centralized")


def fedsim_run(out: Path, only: list[str], max_train: int) -> float:
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(SCENARIO), "--out", str(out), "--quiet", "--overwrite",
           "--set", f"data.max_train={max_train}"]
    for label in only:
        cmd += ["--only", label]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-ray-session-"))
    print(f"one command, {len(RAY_VARIANTS)} Ray-backed variants ...", file=sys.stderr, flush=True)
    together = fedsim_run(out / "together", list(RAY_VARIANTS), args.max_train)
    separate = {}
    for label in RAY_VARIANTS:
        print(f"one command for {label} ...", file=sys.stderr, flush=True)
        separate[label] = fedsim_run(out / f"separate-{label}", [label], args.max_train)
    total = sum(separate.values())
    row = {"variants": len(RAY_VARIANTS), "max_train": args.max_train, "one_command_s": round(together, 1),
           "one_command_per_variant_s": round(total, 1),
           "saved_per_extra_variant_s": round((total - together) / (len(RAY_VARIANTS) - 1), 1),
           "separate_s": {k: round(v, 1) for k, v in separate.items()}}
    print(json.dumps(row))
    print(f"\n{len(RAY_VARIANTS)} Ray-backed variants: one command {together:.1f} s, one command each {total:.1f} s "
          f"(each command also pays Python/torch imports and data loading)")


if __name__ == "__main__":
    main()
