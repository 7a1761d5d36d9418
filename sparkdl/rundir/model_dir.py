"""[any] The model directory format: one writer, one reader (weights and how to rebuild the module).

Layout of ``<run_dir>/model`` (and of ``model/`` inside a saved TorchModel)::

    state_dict.pt      the weights; torch.load(path, weights_only=True) reads it
    model.json         factory import path + kwargs when the model has one, shapes, versions
    architecture.pkl   cloudpickled ModelSpec (written by the driver) when there is no import path;
                       unpickled only with trust_pickle=True

Every file goes through :mod:`sparkdl.storage`, so a model directory may be any URI. The
driver writes model.json (and architecture.pkl) before training; the chief writes the weights
last, so a directory without state_dict.pt is an unfinished run's.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from sparkdl import storage
from sparkdl.config import ModelSpec
from sparkdl.errors import CheckpointError

__all__ = [
    "ARCH_FILE",
    "META_FILE",
    "STATE_FILE",
    "save_weights",
    "save_state_dict",
    "state_bytes",
    "cpu_state",
    "check_weights_only",
    "weights_bytes",
    "model_meta",
    "write_model_json",
    "write_model_dir",
    "read_model_json",
    "load_module",
    "module_from_bytes",
]

STATE_FILE = "state_dict.pt"
META_FILE = "model.json"
ARCH_FILE = "architecture.pkl"


def cpu_state(value: Any) -> Any:
    """A copy of a state dict (or any nesting of dicts, lists and tuples) with every tensor
    detached and on the CPU; everything else passes through untouched (a module's
    ``get_extra_state()`` may hold plain dicts, strings, numbers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: cpu_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_state(v) for v in value)
    return value


def state_bytes(state: Mapping[str, Any]) -> bytes:
    """A state dict as ``torch.save`` bytes: tensors on the CPU, non-tensor entries as they are.

    Raises CheckpointError (see :func:`check_weights_only`) for an entry that
    ``torch.load(weights_only=True)`` could not read back.
    """
    state = cpu_state(state)
    check_weights_only(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def check_weights_only(state: Any, where: str = "state dict") -> None:
    """CheckpointError naming the first entry of ``state`` (nested dicts and lists included) that
    is neither a tensor nor a plain Python value, i.e. what ``torch.load(weights_only=True)``
    refuses (and what often cannot be pickled at all)."""
    bad = _first_unsafe(state, "")
    if bad is not None:
        path, value = bad
        raise CheckpointError(
            f"{where} entry {path!r} must be tensors or plain Python values (dict, list, str, "
            f"numbers, None) to be saved and loaded weights_only, got {type(value).__name__}. "
            "Return plain values from get_extra_state() / state_dict()"
        )


def _first_unsafe(value: Any, path: str) -> tuple[str, Any] | None:
    plain = (torch.Tensor, str, bytes, bool, int, float, torch.dtype, torch.device, torch.Size)
    if value is None or isinstance(value, plain):
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _first_unsafe(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_unsafe(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return path, value


def weights_bytes(module: nn.Module) -> bytes:
    """``module``'s state dict (on the CPU) as ``torch.save`` bytes."""
    return state_bytes(module.state_dict())


def save_weights(module: nn.Module, model_dir: str) -> str:
    """(chief only) Save ``module``'s state dict atomically; returns the file path."""
    return save_state_dict(module.state_dict(), model_dir)


def save_state_dict(state: Mapping[str, torch.Tensor], model_dir: str) -> str:
    """(chief only) Save a state dict (as CPU tensors) atomically; returns the file path."""
    path = storage.join(model_dir, STATE_FILE)
    storage.write_file(path, state_bytes(state))
    return path


def model_meta(spec: ModelSpec, extra: dict[str, Any]) -> dict[str, Any]:
    """model.json's content: the factory import path and kwargs (when any), versions, ``extra``."""
    return {
        "factory": spec.import_path,
        "kwargs": dict(spec.kwargs) if spec.import_path else {},
        "torch_version": torch.__version__,
        **extra,
    }


def write_model_json(
    model_dir: str, spec: ModelSpec, extra: dict[str, Any], architecture: bytes | None = None
) -> None:
    """Describe how to rebuild the module: model.json, and ``architecture`` (the cloudpickled
    ``spec``, which the driver pickles) as architecture.pkl when ``spec`` has no import path."""
    if spec.import_path is None and architecture is not None:
        storage.write_file(storage.join(model_dir, ARCH_FILE), architecture)
    data = json.dumps(model_meta(spec, extra), indent=2, sort_keys=True).encode()
    storage.write_file(storage.join(model_dir, META_FILE), data)


def write_model_dir(
    model_dir: str,
    state: Mapping[str, Any],
    spec: ModelSpec,
    extra: dict[str, Any],
    architecture: bytes | None = None,
) -> None:
    """Write a complete model directory: model.json (+ architecture.pkl), the weights last."""
    write_model_json(model_dir, spec, extra, architecture)
    save_state_dict(state, model_dir)


def read_model_json(model_dir: str) -> dict[str, Any]:
    """model.json's content; CheckpointError when ``model_dir`` is no model directory."""
    path = storage.join(model_dir, META_FILE)
    try:
        return json.loads(storage.read_file(path))
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

    def read(name: str) -> bytes:
        return storage.read_file(storage.join(model_dir, name))

    return module_from_bytes(
        read_model_json(model_dir), read, trust_pickle=trust_pickle, model=model, where=model_dir
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
