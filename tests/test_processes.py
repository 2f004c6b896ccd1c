"""fedsim.engine.processes.exit_after_handlers: every exit handler runs, stdout is flushed, the status is 0, and
the interpreter's teardown is skipped (a Ray actor with torch loaded spent ~1.5 CPU-s in it, issue #26)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import atexit, sys, types
    sys.path.insert(0, sys.argv[1])
    from fedsim.engine.processes import exit_after_handlers
    out = sys.argv[2]
    atexit.register(lambda: open(out + "/before", "w").write("ran"))  # registered before, as Ray's is

    class Probe:  # freed only by the interpreter's teardown (holds what it needs: globals are gone by then)
        def __init__(self, path, opener=open):
            self.path, self.opener = path, opener

        def __del__(self):
            with self.opener(self.path, "w") as f:
                f.write("ran")

    module = types.ModuleType("probe_holder")
    module.probe = Probe(out + "/teardown")
    sys.modules["probe_holder"] = module
    if sys.argv[3] == "fast":
        assert exit_after_handlers()
    atexit.register(lambda: open(out + "/after", "w").write("ran"))  # registered after: runs too
    sys.stdout.write("unflushed")  # no newline, a pipe: still in the buffer at exit
""")


@pytest.mark.parametrize("mode", ["fast", "normal"])
def test_exit_after_handlers_runs_every_handler_and_skips_only_the_teardown(tmp_path, mode):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path), mode], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "unflushed"
    assert (tmp_path / "before").read_text() == "ran" and (tmp_path / "after").read_text() == "ran"
    # the control ("normal") shows the probe does see a teardown; the fast exit has none
    assert (tmp_path / "teardown").exists() == (mode == "normal")


BLAS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from fedsim.engine.node import _limit_threads
    _limit_threads(1.0)
    before = "scipy" in sys.modules
    import scipy.linalg  # loaded after the limit, as a client part using scipy would
    from threadpoolctl import threadpool_info
    print(json.dumps({"scipy_before": before, "blas": [(i["filepath"], i["num_threads"]) for i in threadpool_info()
                                                      if i["user_api"] == "blas"]}))
""")


def test_a_clients_blas_threads_are_capped_also_when_scipy_loads_after_the_limit(tmp_path):
    """A node caps BLAS at its CPUs without importing scipy: numpy's loaded BLAS is limited at run time, scipy's,
    loaded later, reads OPENBLAS_NUM_THREADS. The process starts without any thread variable set."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", BLAS, str(ROOT)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not seen["scipy_before"]
    assert len(seen["blas"]) >= 2 and all(n == 1 for _, n in seen["blas"]), seen
