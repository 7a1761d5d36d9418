"""[worker] The model directory: weights (weights_only-loadable) and how to rebuild the module.

Layout of ``<run_dir>/model``::

    state_dict.pt      the weights; torch.load(path, weights_only=True) reads it
    model.json         factory import path + kwargs when the model has one, shapes, versions
    architecture.pkl   cloudpickled ModelSpec (written by the driver) when there is no import path;
                       unpickled only with trust_pickle=True
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from sparkdl.config import ModelSpec
from sparkdl.errors import CheckpointError

__all__ = [
    "save_weights",
    "save_state_dict",
    "weights_bytes",
    "model_meta",
    "write_model_json",
    "load_module",
    "module_from_bytes",
    "local_path",
    "atomic_write_bytes",
]

STATE_FILE = "state_dict.pt"
META_FILE = "model.json"
ARCH_FILE = "architecture.pkl"


def local_path(path: str) -> str:
    """A ``file://`` URI or plain path → a local filesystem path."""
    return path[len("file://") :] if path.startswith("file://") else path


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name and rename: readers never see a partial file."""
    path = local_path(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # A dot-prefixed temporary name: Spark and pyarrow dataset readers skip hidden files.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def state_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict (as CPU tensors) as ``torch.save`` bytes."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def weights_bytes(module: nn.Module) -> bytes:
    """``module``'s state dict (on the CPU) as ``torch.save`` bytes."""
    return state_bytes(module.state_dict())


def save_weights(module: nn.Module, model_dir: str) -> str:
    """(chief only) Save ``module``'s state dict atomically; returns the file path."""
    return save_state_dict(module.state_dict(), model_dir)


def save_state_dict(state: Mapping[str, torch.Tensor], model_dir: str) -> str:
    """(chief only) Save a state dict (as CPU tensors) atomically; returns the file path."""
    path = os.path.join(local_path(model_dir), STATE_FILE)
    atomic_write_bytes(path, state_bytes(state))
    return path


def model_meta(spec: ModelSpec, extra: dict[str, Any]) -> dict[str, Any]:
    """model.json's content: the factory import path and kwargs (when any), versions, ``extra``."""
    return {
        "factory": spec.import_path,
        "kwargs": dict(spec.kwargs) if spec.import_path else {},
        "torch_version": torch.__version__,
        **extra,
    }


def write_model_json(model_dir: str, spec: ModelSpec, extra: dict[str, Any]) -> None:
    """Describe how to rebuild the module without unpickling when it has an import path."""
    path = os.path.join(local_path(model_dir), META_FILE)
    data = json.dumps(model_meta(spec, extra), indent=2, sort_keys=True).encode()
    atomic_write_bytes(path, data)


def read_model_json(model_dir: str) -> dict[str, Any]:
    path = os.path.join(local_path(model_dir), META_FILE)
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{path} is missing: {model_dir} is not a sparkdl model directory"
        ) from exc


def load_module(model_dir: str, *, trust_pickle: bool = False, model: Any = None) -> nn.Module:
    """Rebuild the module and load its weights with ``weights_only=True``.

    The architecture comes from, in order: ``model`` (a module or factory you pass), the
    import path in model.json, or architecture.pkl, which is unpickled only when
    ``trust_pickle=True`` (unpickling runs code: trust the directory's writer first).
    """
    root = local_path(model_dir)

    def read(name: str) -> bytes:
        with open(os.path.join(root, name), "rb") as fh:
            return fh.read()

    return module_from_bytes(
        read_model_json(root), read, trust_pickle=trust_pickle, model=model, where=model_dir
    )


def module_from_bytes(
    meta: dict[str, Any],
    read: Callable[[str], bytes],
    *,
    trust_pickle: bool = False,
    model: Any = None,
    where: str = "the model directory",
) -> nn.Module:
    """Rebuild the module described by ``meta`` (model.json) from files ``read(name)`` gives."""
    if model is not None:
        module = ModelSpec(factory=model).build()
    elif meta.get("factory"):
        module = ModelSpec(factory=meta["factory"], kwargs=meta.get("kwargs", {})).build()
    else:
        if not trust_pickle:
            raise CheckpointError(
                f"the model in {where} was built from a Python object, stored pickled in "
                f"{ARCH_FILE}. Pass trust_pickle=True if you trust whoever wrote it, or pass "
                "model=<module or factory> to rebuild the architecture yourself"
            )
        module = pickle.loads(read(ARCH_FILE)).build()  # noqa: S301 - explicit trust flag
    try:
        weights = read(STATE_FILE)
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{STATE_FILE} must exist in {where}, got a model directory without weights: the run "
            "that wrote it did not finish (see run.json). Resume it, or train again"
        ) from exc
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return module
