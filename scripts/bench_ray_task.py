"""What one Ray actor call costs the machine: CPU of the whole process tree per call, with a model-sized argument
and result, under fedsim's private-Ray system settings and under Ray's defaults (issue #26, docs/performance.md).

Each side is a fresh process that starts a private Ray on loopback with two 1-CPU actors and sends them
``--calls`` calls of ``--payload`` bytes (each returns as many), two in flight, after one warm-up call each. The
figure is the CPU time (user + system, from /proc) that the driver and every process below it spent during the
calls, divided by the calls. The sides alternate, ``--repeats`` times each, in one invocation:

- ``ray-defaults``: Ray's defaults, except ``max_direct_call_object_size`` set as fedsim sets it (so both sides
  move the payload the same way, inside the call);
- ``fedsim``: ``fedsim.engine.ray_session.PRIVATE_SYSTEM_CONFIG`` (no task events, profile events, event-loop
  statistics or metrics).

    python scripts/bench_ray_task.py                      # 2,000 calls of 400 KB, 3 repeats
    python scripts/bench_ray_task.py --payload 100 --calls 5000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_cpu() -> dict[int, float]:
    """CPU seconds of this process and each one below it, by PID."""
    from fedsim.engine.processes import descendants

    tick = os.sysconf("SC_CLK_TCK")
    seen = {}
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seen[pid] = (int(fields[11]) + int(fields[12])) / tick
    return seen


def child(side: str, calls: int, payload_bytes: int) -> None:
    """One side in this (fresh) process: print its per-call CPU as JSON."""
    import ray

    from fedsim.engine.ray_session import DIRECT_CALL_BYTES, PRIVATE_SYSTEM_CONFIG

    system = dict(PRIVATE_SYSTEM_CONFIG) if side == "fedsim" else {"max_direct_call_object_size": DIRECT_CALL_BYTES}
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=2,
             _system_config=system, logging_level="WARNING", log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        class Echo:
            def call(self, payload: bytes) -> bytes:
                return bytes(len(payload))

        actors = [Echo.remote(), Echo.remote()]
        ray.get([actor.call.remote(b"") for actor in actors])
        time.sleep(1.0)  # the actors' start-up is not counted
        payload = os.urandom(payload_bytes)
        before, start = tree_cpu(), time.perf_counter()
        pending = []
        for i in range(calls):
            pending.append(actors[i % 2].call.remote(payload))
            if len(pending) >= 2:
                ray.get(pending.pop(0))
        ray.get(pending)
        wall = time.perf_counter() - start
        time.sleep(1.5)  # what the calls left to the background threads (batched reports) is counted too
        after = tree_cpu()
        cpu = sum(after[pid] - before.get(pid, 0.0) for pid in after)
        print(json.dumps({"side": side, "calls": calls, "payload": payload_bytes, "wall_s": round(wall, 3),
                          "cpu_s": round(cpu, 3), "ms_per_call": round(1000 * cpu / calls, 3)}))
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--payload", type=int, default=400_000, help="bytes each way per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls, args.payload)
        return
    results: dict[str, list[float]] = {"ray-defaults": [], "fedsim": []}
    for _ in range(args.repeats):
        for side in results:
            out = subprocess.run([sys.executable, __file__, "--child", side, "--calls", str(args.calls),
                                  "--payload", str(args.payload)], capture_output=True, text=True, timeout=600)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"{side}: exit {out.returncode}\n{out.stderr[-3000:]}")
            row = json.loads(lines[-1])
            print(json.dumps(row), flush=True)
            results[side].append(row["ms_per_call"])
    summary = {side: {"mean_ms": round(statistics.mean(v), 3), "min_ms": min(v), "max_ms": max(v)}
               for side, v in results.items()}
    ratio = summary["fedsim"]["mean_ms"] / summary["ray-defaults"]["mean_ms"]
    print(json.dumps({"summary": summary, "fedsim_over_defaults": round(ratio, 3), "load": os.getloadavg()}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
