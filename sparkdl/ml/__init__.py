"""[any] Spark ML face of sparkdl: TorchEstimator, TorchModel, batched inference.

Names load on first use (a module ``__getattr__``), so importing the package pulls in no
driver module until one of them is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["TorchEstimator", "TorchModel", "trust_pickle"]

_EXPORTS = {
    "TorchEstimator": "sparkdl.ml.estimator",
    "TorchModel": "sparkdl.ml.model",
    "trust_pickle": "sparkdl.ml.persistence",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparkdl.ml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from sparkdl.ml.estimator import TorchEstimator
    from sparkdl.ml.model import TorchModel
    from sparkdl.ml.persistence import trust_pickle
