"""[driver] Saving and loading TorchEstimator / TorchModel (MLWritable / MLReadable).

Layout under a saved path (a local path or any URI :mod:`sparkdl.storage` reaches)::

    metadata/     Spark's DefaultParams JSON (part-00000, one line: class, uid, paramMap with
                  the JSON values, defaultParamMap, sparkdl's own metadata) and _SUCCESS
    objects.pkl   cloudpickled values that are not JSON (a model object, a loss callable ...)
    model/        TorchModel only: state_dict.pt (weights_only), model.json, architecture.pkl

The rule: anything that needs unpickling to load (``objects.pkl``; ``architecture.pkl`` when
the model has no import path) is read only when trusted, through ``load(path,
trust_pickle=True)`` or, for a Pipeline / PipelineModel that holds the stage, inside ``with
sparkdl.ml.trust_pickle():``. Weights are always read with ``torch.load(weights_only=True)``.
A model given as an import path (``"package.module:factory"``) loads with no pickle at all.

Every file goes through :mod:`sparkdl.storage`, not Spark's Hadoop filesystem: a stage saves to
``s3://`` where the cluster's Spark has no S3A jars, and without a JVM round trip (the
metadata is the one JSON line Spark's ``DefaultParamsWriter`` writes, so Spark reads it too).
A Pipeline / PipelineModel holding the stage writes its own metadata through Spark, so saving
one to an object store needs Spark's filesystem for that scheme (S3A for ``s3a://``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from pyspark.ml.util import MLReader, MLWriter

from sparkdl import storage
from sparkdl.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from sparkdl.ml.params import TableParams

__all__ = [
    "ParamsPersistence",
    "ParamsReader",
    "ParamsWriter",
    "is_trusted",
    "trust_pickle",
    "OBJECTS_FILE",
]

log = logging.getLogger("sparkdl")

OBJECTS_FILE = "objects.pkl"
METADATA_DIR = "metadata"
_P = TypeVar("_P", bound="ParamsPersistence")
_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("sparkdl_trust", default=False)


@contextlib.contextmanager
def trust_pickle() -> Iterator[None]:
    """Within the block, loading may unpickle saved Python objects: trust the writer first."""
    token = _TRUST.set(True)
    try:
        yield
    finally:
        _TRUST.reset(token)


def is_trusted(explicit: bool = False) -> bool:
    return explicit or _TRUST.get()


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def untrusted_error(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} holds {what} stored pickled (unpickling runs code). Load it with "
        "load(path, trust_pickle=True), or inside `with sparkdl.ml.trust_pickle():` for a "
        "Pipeline, if you trust whoever wrote it; or give the model as an import path"
    )


class ParamsWriter(MLWriter):
    """Writes the Params (JSON where possible, else pickled) and the instance's own data."""

    def __init__(self, instance: TableParams) -> None:
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        """Write the stage to ``path`` (any URI); ConfigError when it exists, unless
        ``overwrite()`` was called (then it is replaced)."""
        root = storage.normalize_uri(path)
        if storage.path_exists(root):
            if not self.shouldOverwrite:
                raise ConfigError(
                    f"path must not exist, got existing {path!r}. Use "
                    "model.write().overwrite().save(path) to replace it, or choose another path"
                )
            storage.delete(root)
        self.saveImpl(root)

    def saveImpl(self, path: str) -> None:
        inst = self.instance
        params = {p.name: v for p, v in inst._paramMap.items()}
        plain = {k: v for k, v in params.items() if _is_json(v)}
        objects = {k: v for k, v in params.items() if k not in plain}
        if objects:
            from pyspark import cloudpickle

            storage.write_file(storage.join(path, OBJECTS_FILE), cloudpickle.dumps(objects))
        inst._save_data(path)
        # Metadata last: a directory without it is no saved stage (a crash mid-save).
        metadata = _metadata(inst, plain, {"sparkdl": inst._extra_metadata()})
        storage.write_file(storage.join(path, METADATA_DIR, "part-00000"), metadata.encode())
        storage.write_file(storage.join(path, METADATA_DIR, "_SUCCESS"), b"")


def _metadata(inst: Any, params: dict[str, Any], extra: dict[str, Any]) -> str:
    """The JSON line of Spark's ``DefaultParamsWriter.saveMetadata``."""
    import pyspark

    return json.dumps(
        {
            "class": f"{type(inst).__module__}.{type(inst).__name__}",
            "timestamp": int(round(time.time() * 1000)),
            "sparkVersion": pyspark.__version__,
            "uid": inst.uid,
            "paramMap": params,
            "defaultParamMap": {p.name: v for p, v in inst._defaultParamMap.items()},
            **extra,
        },
        separators=(",", ":"),
    )


def _read_metadata(path: str) -> dict[str, Any]:
    """The saved stage's metadata (written by ParamsWriter, or by Spark's own writer)."""
    directory = storage.join(path, METADATA_DIR)
    for name in storage.list_dir(directory):
        if name.startswith("part-"):
            for line in storage.read_file(storage.join(directory, name)).decode().splitlines():
                if line.strip():
                    return json.loads(line)
    raise ConfigError(
        f"path must hold a saved sparkdl stage (metadata/part-*), got {path!r} without one. "
        "Check the path; an interrupted save leaves no metadata"
    )


class ParamsReader(MLReader):
    """Reads what ParamsWriter wrote into a fresh instance of the saved class."""

    def __init__(self, cls: type[TableParams], trust_pickle: bool = False) -> None:
        super().__init__()
        self.cls = cls
        self.trust_pickle = trust_pickle

    def load(self, path: str) -> Any:
        path = storage.normalize_uri(path)
        metadata = _read_metadata(path)
        module_name, _, name = metadata["class"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        if not (isinstance(cls, type) and issubclass(cls, self.cls) and cls._param_specs):
            raise ConfigError(
                f"the saved class must be a {self.cls.__name__}, got {metadata['class']} in "
                f"{path}. Load it with that class"
            )
        instance: TableParams = cls._blank()
        instance._resetUid(metadata["uid"])
        known = {s.name for s in cls._param_specs}
        defaults = {k: v for k, v in metadata.get("defaultParamMap", {}).items() if k in known}
        instance._setDefault(**defaults)
        instance._assign({k: v for k, v in metadata["paramMap"].items() if k in known})
        objects_path = storage.join(path, OBJECTS_FILE)
        if storage.path_exists(objects_path):
            if not is_trusted(self.trust_pickle):
                raise untrusted_error(path, "parameter values (e.g. a model object)")
            import pickle

            values = pickle.loads(storage.read_file(objects_path))  # noqa: S301 - trusted
            instance._assign({k: v for k, v in values.items() if k in known})
        instance._load_data(path, metadata.get("sparkdl", {}), is_trusted(self.trust_pickle))
        instance._validate()
        return instance


class ParamsPersistence:
    """``write()`` / ``read()`` / ``load()`` of a TableParams stage, through the classes above."""

    def write(self) -> ParamsWriter:
        """Writer: ``stage.write().overwrite().save(path)``."""
        return ParamsWriter(self)  # type: ignore[arg-type]

    @classmethod
    def read(cls, trust_pickle: bool = False) -> ParamsReader:
        return ParamsReader(cls, trust_pickle=trust_pickle)  # type: ignore[arg-type]

    @classmethod
    def load(cls: type[_P], path: str, trust_pickle: bool = False) -> _P:
        """Load a saved stage; ``trust_pickle`` allows unpickling what needs it (a model
        object or callable, a pickled architecture), see the module docstring."""
        return cls.read(trust_pickle=trust_pickle).load(path)  # type: ignore[attr-defined, no-any-return]
