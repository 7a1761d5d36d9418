"""[worker] Synchronization strategies behind one switch: ``make_strategy(config, env)``.

``prepare(module, strategy=..., optimizer=..., **options)`` applies the same strategies inside
your own function run by ``sparkdl.Distributor``.
"""

from __future__ import annotations

import importlib

from sparkdl.config import SyncConfig
from sparkdl.context import WorkerEnv
from sparkdl.sync.base import SyncStrategy, wire_bytes
from sparkdl.sync.prepare import Prepared, prepare

__all__ = ["Prepared", "SyncStrategy", "make_strategy", "prepare", "wire_bytes"]

_IMPLEMENTATIONS = {
    "allreduce": "sparkdl.sync.allreduce:AllReduceStrategy",
    "local_sgd": "sparkdl.sync.local_sgd:LocalSGDStrategy",
    "parameter_server": "sparkdl.sync.parameter_server:ParameterServerStrategy",
    "fsdp": "sparkdl.sync.fsdp:FSDPStrategy",
    "pipeline": "sparkdl.sync.pipeline:PipelineStrategy",
}


def make_strategy(config: SyncConfig, env: WorkerEnv) -> SyncStrategy:
    """The strategy named by ``config.strategy``, built for this worker with its typed options."""
    module_name, _, class_name = _IMPLEMENTATIONS[config.strategy].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(env, config.typed_options())
