"""[driver] Launching workers: Distributor (Spark barrier stage or local processes).

Only the driver-side entry points are re-exported here; the worker view lives in
``sparkdl.launch.context`` and the task adapter in ``sparkdl.launch.rendezvous``.
"""

from sparkdl.launch.launcher import Distributor

__all__ = ["Distributor"]
