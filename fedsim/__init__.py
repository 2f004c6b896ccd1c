"""fedsim: federated and continual learning simulation on Flower + Ray.

Importing fedsim turns off Flower's telemetry and Ray's usage statistics (unless the user set those variables
explicitly) *before* anything imports flwr or ray: Flower reads ``FLWR_TELEMETRY_ENABLED`` once, when
``flwr.supercore.telemetry`` is imported, so setting it later (at run time) is too late. The values go into
``os.environ``, so every process fedsim starts (Ray's raylet and workers, subprocesses) inherits them, and a Ray
worker that unpickles a fedsim ClientApp imports this module again.
"""

import os

__version__ = "0.1.0"

# No network at run time: Flower's telemetry and Ray's usage stats stay off unless the user turns them on.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TOKENIZERS_PARALLELISM": "false",
}

for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)
del _key, _value
