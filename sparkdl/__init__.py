"""Train PyTorch models on Spark data.

sparkdl shards a Spark DataFrame into Parquet (``materialize``), starts one torch worker per
task of a barrier-mode Spark stage (``Distributor``), trains with DistributedDataParallel or
another strategy behind one switch (``sparkdl.sync``), and hands back Spark artifacts: a
``TorchModel`` whose ``transform(df)`` predicts in batches, metrics as a DataFrame, and a run
directory (checkpoints, model, plots, run.json) on any storage the cluster shares. Start with
``sparkdl.TorchEstimator`` (``help(sparkdl.TorchEstimator)`` lists every parameter).

Zone: [any] (the public API only, no logic; names load on first use, so a worker process that
imports sparkdl.train never loads pyspark).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "sparkdl.errors",
    "ConfigError": "sparkdl.errors",
    "DataError": "sparkdl.errors",
    "RankFailure": "sparkdl.errors",
    "RendezvousError": "sparkdl.errors",
    "SparkdlError": "sparkdl.errors",
    "WorkerGroupError": "sparkdl.errors",
    "ShardedDataset": "sparkdl.data",
    "materialize": "sparkdl.data",
    "Distributor": "sparkdl.launch",
    "get_context": "sparkdl.context",
    "TorchEstimator": "sparkdl.ml.estimator",
    "TorchModel": "sparkdl.ml.estimator",
}
_SUBMODULES = ("sync",)
"""Subpackages reachable as attributes (``sparkdl.sync.prepare``) without importing them first."""

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Distributor",
    "RankFailure",
    "RendezvousError",
    "ShardedDataset",
    "SparkdlError",
    "TorchEstimator",
    "TorchModel",
    "WorkerGroupError",
    "__version__",
    "get_context",
    "materialize",
    "sync",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"sparkdl.{name}")
    raise AttributeError(f"module 'sparkdl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from sparkdl.context import get_context
    from sparkdl.data import ShardedDataset, materialize
    from sparkdl.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        RankFailure,
        RendezvousError,
        SparkdlError,
        WorkerGroupError,
    )
    from sparkdl.launch import Distributor
    from sparkdl.ml.estimator import TorchEstimator, TorchModel
