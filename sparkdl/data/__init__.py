"""[any] The data plane: DataFrame → sharded Parquet + manifest (driver), shards → batches (worker).

``sparkdl.data.materialize`` is a driver-zone module, but it imports pyspark only inside its
functions, so importing this package (as workers do for ``ShardedDataset``) never loads pyspark.
It is bound here through importlib, and after the submodule import, so that the name
``sparkdl.data.materialize`` always means the function, never the module.
"""

from __future__ import annotations

import importlib

from sparkdl.data.loader import ShardedDataset, ShardLoader
from sparkdl.data.manifest import Manifest

__all__ = ["materialize", "ShardedDataset", "ShardLoader", "Manifest"]

materialize = importlib.import_module("sparkdl.data.materialize").materialize
