"""[worker] Synchronization strategies behind one switch: ``make_strategy(config, env)``."""

from __future__ import annotations

from sparkdl.config import SyncConfig
from sparkdl.launch.context import WorkerEnv
from sparkdl.sync.base import SyncStrategy

__all__ = ["SyncStrategy", "make_strategy"]


def make_strategy(config: SyncConfig, env: WorkerEnv) -> SyncStrategy:
    """The strategy named by ``config.strategy``, built for this worker."""
    if config.strategy == "allreduce":
        from sparkdl.sync.allreduce import AllReduceStrategy

        return AllReduceStrategy(env, dict(config.options))
    from sparkdl.errors import ConfigError

    raise ConfigError(
        f"strategy must be one of the implemented strategies ('allreduce'), got {config.strategy!r}. "
        "Use strategy='allreduce'."
    )
