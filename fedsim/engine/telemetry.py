"""Flower's telemetry, silenced: with ``FLWR_TELEMETRY_ENABLED=0`` (fedsim's default) no event is even built.

Disabled, Flower still builds each event (platform and hardware details, a persistent id it writes to
``~/.flwr/source``) and only skips the POST; and a flwr imported before fedsim read the variable too early. So the
runner replaces Flower's ``event`` by a no-op right before the simulation starts.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future
from typing import Any

__all__ = ["silence_flower_telemetry"]


def _no_telemetry_event(event_type: Any, event_details: Any = None) -> Future:
    """Stands in for Flower's telemetry ``event``: builds nothing, sends nothing."""
    done: Future = Future()
    done.set_result("disabled")
    return done


def silence_flower_telemetry() -> bool:
    """With telemetry disabled (``FLWR_TELEMETRY_ENABLED=0``), make Flower's telemetry ``event`` a no-op in every
    loaded flwr module; return whether it did. Called right before the simulation starts, when the modules that
    call ``event`` are loaded."""
    if os.environ.get("FLWR_TELEMETRY_ENABLED", "1") != "0":
        return False
    import flwr.supercore.telemetry as telemetry

    telemetry.FLWR_TELEMETRY_ENABLED = "0"
    original = getattr(telemetry, "_fedsim_original_event", telemetry.event)
    telemetry._fedsim_original_event = original
    for name, module in list(sys.modules.items()):
        if (name == "flwr" or name.startswith("flwr.")) and getattr(module, "event", None) is original:
            module.event = _no_telemetry_event
    return True
