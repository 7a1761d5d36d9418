"""[any] Reader names → row sources, and whether a reader can run here.

``reader="pyarrow"`` (the default) or ``"petastorm"`` (the compat environment only) in
``ShardedDataset.loader`` and ``OptimConfig``/``TorchEstimator``. A source is named here by its
import path and imported only when a loader is built, so the driver (which checks the name and
the availability, :func:`check_reader`) never imports a reader backend or torch.

petastorm (0.12.x/0.13.x) imports ``pyarrow.filesystem`` (removed in pyarrow 16), its reads
fail on pyarrow 15, and it uses numpy < 2 APIs: it runs in the compat environment
(``make test-compat`` builds ``.venv-compat``: pyspark 3.5, pyarrow 14.0.2, numpy < 2,
pandas 2.2, petastorm 0.12.1). Elsewhere :func:`require_petastorm` raises ConfigError naming it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from sparkdl.errors import ConfigError

__all__ = ["COMPAT_HINT", "READERS", "check_reader", "require_petastorm", "source_class"]

READERS = ("pyarrow", "petastorm")
_SOURCES = {
    "pyarrow": "sparkdl.data.sources:PyArrowSource",
    "petastorm": "sparkdl.data.petastorm:PetastormSource",
}

COMPAT_HINT = (
    "petastorm runs with pyarrow < 15, numpy < 2 and pyspark 3.5/4.0: use the compat "
    "environment (`make test-compat` builds .venv-compat with pyspark 3.5, pyarrow 14.0.2, "
    "numpy<2, pandas 2.2 and petastorm 0.12.1), or reader='pyarrow'"
)


def check_reader(reader: Any) -> str:
    """``reader`` validated: a known name whose backend works here, else ConfigError."""
    if reader not in READERS:
        raise ConfigError(f"reader must be one of {READERS}, got {reader!r}. Use reader='pyarrow'.")
    if reader == "petastorm":
        require_petastorm()
    return str(reader)


def source_class(reader: str) -> Any:
    """The RowSource class of ``reader`` (see :mod:`sparkdl.data.sources`), imported now."""
    module, _, name = _SOURCES[check_reader(reader)].partition(":")
    return getattr(importlib.import_module(module), name)


def require_petastorm() -> Any:
    """``petastorm.make_batch_reader``; ConfigError naming the compat environment when unusable."""
    import numpy as np
    import pyarrow

    problems = []
    if int(pyarrow.__version__.split(".")[0]) >= 15:
        problems.append(f"pyarrow {pyarrow.__version__}")
    if int(np.__version__.split(".")[0]) >= 2:
        problems.append(f"numpy {np.__version__}")
    try:
        from petastorm import make_batch_reader
    except Exception as exc:  # ImportError, or pyarrow.filesystem gone (AttributeError & co.)
        problems.insert(0, f"import petastorm failed: {type(exc).__name__}: {exc}")
        make_batch_reader = None
    # petastorm calls pyarrow's deprecated legacy-dataset APIs on every read: not the user's to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    if problems:
        raise ConfigError(
            "reader='petastorm' must run where petastorm works, got "
            f"{'; '.join(problems)}. {COMPAT_HINT}."
        )
    return make_batch_reader
