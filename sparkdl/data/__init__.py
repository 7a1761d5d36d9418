"""[any] The data plane: DataFrame → sharded Parquet + manifest (driver), shards → batches (worker).

Names load on first use (as in ``sparkdl/__init__``), so importing this package, as every import
of one of its modules does, loads neither the driver's ``materialize`` nor the worker's torch.
``sparkdl.data.materialize`` is both a submodule and the function it defines; the name always
means the function: the package ignores the import system binding the submodule to it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__all__ = ["materialize", "ShardedDataset", "ShardLoader", "Manifest", "decode_images"]

_EXPORTS = {
    "materialize": "sparkdl.data.materialize",
    "ShardedDataset": "sparkdl.data.dataset",
    "ShardLoader": "sparkdl.data.loader",
    "Manifest": "sparkdl.data.manifest",
    "decode_images": "sparkdl.data.inputs",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparkdl.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "materialize" and isinstance(value, types.ModuleType):
            return  # importing the submodule binds it here: keep the name for the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:
    from sparkdl.data.dataset import ShardedDataset
    from sparkdl.data.inputs import decode_images
    from sparkdl.data.loader import ShardLoader
    from sparkdl.data.manifest import Manifest
    from sparkdl.data.materialize import materialize
