"""[driver] Launching workers: Distributor (Spark barrier stage or local processes).

Only the driver-side entry point is re-exported here, and only on first use, so a worker that
imports ``sparkdl.context`` (its view of the group) or the task adapter
``sparkdl.launch.rendezvous`` never loads the launcher.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Distributor"]


def __getattr__(name: str) -> Any:
    if name == "Distributor":
        return importlib.import_module("sparkdl.launch.launcher").Distributor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from sparkdl.launch.launcher import Distributor
