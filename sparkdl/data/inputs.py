"""[worker] Column kinds → tensors: what a model with named inputs receives, and decode_images.

:func:`build_inputs` turns the Arrow columns of a batch into ``{argument name: value}`` as the
inputs' specs say (:mod:`sparkdl.data.input_specs` has the table of kinds): int64 ids, float32
values, fixed arrays reshaped, variable-length arrays padded to the batch's longest row (capped,
truncating) with their lengths under ``<name>_length``, binary columns as a list of ``bytes``.
:func:`call_model` calls ``model(**inputs)``, passing a ``<name>_length`` only to a ``forward``
that takes it. The training loader and ``TorchModel.transform`` both build inputs here, so a
model sees the same tensors in both. Pure pyarrow + numpy + torch (Pillow for images).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sparkdl.data.images import decode_some, decode_stacked
from sparkdl.data.input_specs import InputSpec
from sparkdl.errors import ConfigError, DataError

__all__ = [
    "batch_rows",
    "build_inputs",
    "call_model",
    "decode_images",
    "id_range_error",
    "move_to",
    "split_batch",
    "zero_rows",
]


def _array(column: Any) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return column.chunk(0)
        return column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column


def _numpy(arr: pa.Array, dtype: Any) -> np.ndarray:
    values = arr.to_numpy(zero_copy_only=False)
    if values.dtype != dtype or not values.flags.writeable:
        values = values.astype(dtype)  # a copy: Arrow's buffers are read-only, torch writes
    return values


def _list_parts(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets into ``values``, values) of a list column, for any offset or slice."""
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        flat = arr.flatten()
        return np.arange(len(arr) + 1, dtype=np.int64) * size, flat
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return offsets, arr.values


def _no_nulls(spec: InputSpec, column: str, arr: pa.Array) -> None:
    if arr.null_count:
        raise DataError(
            f"column {column!r} (input {spec.name!r}) must have no nulls, got "
            f"{arr.null_count}. Fill or drop them first."
        )


def _dense(spec: InputSpec, table: pa.Table, n: int) -> torch.Tensor:
    parts = []
    for column, width in zip(spec.columns, spec.widths or (1,) * len(spec.columns)):
        arr = _array(table.column(column))
        _no_nulls(spec, column, arr)
        if (
            pa.types.is_list(arr.type)
            or pa.types.is_large_list(arr.type)
            or pa.types.is_fixed_size_list(arr.type)
        ):
            values = arr.flatten()
        else:
            values = arr
        flat = _numpy(values, np.float32)
        if flat.size != n * width:
            raise DataError(
                f"column {column!r} (input {spec.name!r}) must hold {width} value(s) per row, "
                f"got {flat.size} values for {n} rows. Pass rows of the trained width."
            )
        parts.append(flat.reshape(n, width))
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return torch.from_numpy(np.ascontiguousarray(out))


def _fixed(spec: InputSpec, arr: pa.Array, n: int, dtype: Any) -> torch.Tensor:
    offsets, values = _list_parts(arr)
    size = int(np.prod(spec.shape))
    lengths = np.diff(offsets)
    if n and (lengths.min() != size or lengths.max() != size):
        raise DataError(
            f"column {spec.columns[0]!r} (input {spec.name!r}) must hold {size} values per row "
            f"(shape {list(spec.shape)}), got rows of {int(lengths.min())}..{int(lengths.max())}. "
            "Pass rows of the trained length."
        )
    flat = _numpy(values.slice(int(offsets[0]), n * size) if n else values.slice(0, 0), dtype)
    return torch.from_numpy(flat.reshape(n, *spec.shape))


def _ragged(
    spec: InputSpec, arr: pa.Array, n: int, dtype: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded to the longest (at most ``max_length``, truncating), and their lengths."""
    offsets, values = _list_parts(arr)
    lengths = np.diff(offsets)
    longest = int(lengths.max()) if n else 0
    width = min(longest, spec.max_length) if spec.max_length is not None else longest
    kept = np.minimum(lengths, width)
    out = np.full((n, width), spec.pad_value, dtype=dtype)
    total = int(kept.sum())
    if total:
        first, last = int(offsets[0]), int(offsets[-1])
        flat = _numpy(values.slice(first, last - first), dtype)
        if width >= longest:  # nothing truncated: the values fill each row's head in order
            out[np.arange(width) < lengths[:, None]] = flat
            return torch.from_numpy(out), torch.from_numpy(kept.astype(np.int64))
        rows = np.repeat(np.arange(n), kept)
        starts = np.cumsum(kept) - kept
        cols = np.arange(total) - np.repeat(starts, kept)
        out[rows, cols] = flat[offsets[:-1][rows] - first + cols]
    return torch.from_numpy(out), torch.from_numpy(kept.astype(np.int64))


def build_inputs(table: pa.Table, specs: Sequence[InputSpec]) -> dict[str, Any]:
    """``{argument: value}`` of one batch (``table``: its input columns, ``n`` rows).

    Values: ``dense`` float32 ``[n, F]``; ``int`` int64 ``[n]``; ``float`` float32 ``[n]``;
    ``array`` ``[n, *shape]`` (int64 or float32); ``ragged`` ``[n, T]`` (T: the longest row,
    at most ``max_length``) plus ``<name>_length`` int64 ``[n]``; ``binary`` ``list[bytes]``.
    Raises DataError naming the column for nulls or rows of the wrong length.
    """
    n = table.num_rows
    out: dict[str, Any] = {}
    for spec in specs:
        if spec.kind == "dense":
            out[spec.name] = _dense(spec, table, n)
            continue
        column = spec.columns[0]
        arr = _array(table.column(column))
        _no_nulls(spec, column, arr)
        dtype = np.int64 if spec.dtype == "int64" else np.float32
        if spec.kind == "binary":
            out[spec.name] = arr.to_pylist()
        elif spec.kind in ("int", "float"):
            out[spec.name] = torch.from_numpy(_numpy(arr, dtype))
        elif spec.kind == "array":
            out[spec.name] = _fixed(spec, arr, n, dtype)
        else:
            out[spec.name], out[spec.length_name] = _ragged(spec, arr, n, dtype)
    return out


def _accepted(model: Any) -> tuple[set[str], bool]:
    """The keyword arguments ``model``'s forward takes (and whether it takes ``**kwargs``),
    looking through wrappers (DistributedDataParallel's ``module``)."""
    inner = getattr(model, "module", model)
    cached = getattr(inner, "_sparkdl_accepted", None)
    if cached is not None:
        return cached
    try:
        parameters = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):
        found: tuple[set[str], bool] = (set(), True)
    else:
        names = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        found = (names, any(p.kind is p.VAR_KEYWORD for p in parameters))
    try:
        object.__setattr__(inner, "_sparkdl_accepted", found)
    except Exception:  # an object that refuses attributes: inspect every call
        pass
    return found


def call_model(model: Any, inputs: Any) -> Any:
    """``model(inputs)`` for a tensor; ``model(**inputs)`` for a dict, where ``<name>_length``
    (int64 ``[B]``) reaches only a ``forward`` that names that parameter: padded inputs carry
    their rows' lengths, and an input of fixed-length rows (every row as long) gets its width,
    so a model written for variable-length tokens also takes rows that happen to be even."""
    if not isinstance(inputs, Mapping):
        return model(inputs)
    names, _ = _accepted(model)
    kwargs = {
        k: v
        for k, v in inputs.items()
        if k in names or not (k.endswith("_length") and k[: -len("_length")] in inputs)
    }
    for name in names:
        base = name[: -len("_length")] if name.endswith("_length") else None
        value = inputs.get(base) if base else None
        if name not in kwargs and isinstance(value, torch.Tensor) and value.dim() >= 2:
            kwargs[name] = torch.full((value.shape[0],), value.shape[1], device=value.device)
    return model(**kwargs)


def id_range_error(exc: BaseException, batch: Any, specs: Sequence[InputSpec]) -> DataError | None:
    """For an IndexError raised by a model fed integer inputs (an ``nn.Embedding`` given an id
    outside its table): a DataError naming each integer column with the batch's value range;
    None for other errors."""
    if not isinstance(exc, IndexError) or not isinstance(batch, Mapping):
        return None
    ranges = []
    for spec in specs:
        value = batch.get(spec.name)
        if spec.dtype != "int64" or not isinstance(value, torch.Tensor) or not value.numel():
            continue
        low, high = int(value.min()), int(value.max())
        ranges.append(f"column {spec.columns[0]!r} (input {spec.name!r}): {low}..{high}")
    if not ranges:
        return None
    return DataError(
        f"integer inputs must be valid indices for the model's embeddings (0 ≤ id < rows of "
        f"the table), got a failing batch with {'; '.join(ranges)} ({exc}). Remap the ids in "
        "Spark (e.g. StringIndexer), or size the embeddings for the largest id."
    )


def split_batch(batch: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """(features, labels, weights or None) of a loader batch."""
    return (batch[0], batch[1], batch[2]) if len(batch) == 3 else (batch[0], batch[1], None)


def batch_rows(labels: Any) -> int:
    """Rows of a batch from its labels (a tensor, or a tuple of them with several labels)."""
    return int((labels[0] if isinstance(labels, tuple) else labels).shape[0])


def move_to(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors of ``batch`` (a tensor, a dict or a tuple of them) on ``device``; other values
    (lists of bytes) as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move_to(v, device, non_blocking) for v in batch)
    return batch


def zero_rows(batch: Any) -> Any:
    """``batch`` with no rows (same kinds, shapes past the first dimension, devices)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return {k: zero_rows(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch[:0]) if isinstance(batch, list) else tuple(map(zero_rows, batch))
    return batch


_POOLS: dict[int, Any] = {}


def _process_pool(workers: int) -> Any:
    """``workers`` decoding processes, started once per process (forked where the platform
    forks, as torch's DataLoader workers are): they import Pillow and numpy only."""
    pool = _POOLS.get(workers)
    if pool is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=context)
        if len(_POOLS) == 1:
            import atexit

            atexit.register(_shut_pools)  # before interpreter teardown, not during it
    return pool


def _shut_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


def decode_images(
    images: Sequence[bytes],
    *,
    size: tuple[int, int] | None = None,
    mode: str = "RGB",
    workers: int = 0,
) -> torch.Tensor:
    """Encoded images (PNG, JPEG, anything Pillow reads) → float32 ``[B, C, H, W]`` in [0, 1].

    ``size``: ``(H, W)`` every image is resized to (bilinear); None keeps each image's own
    size, which must then be the same for all. ``mode``: Pillow's mode, "RGB" (C = 3), "L"
    (C = 1) or "RGBA" (C = 4). The layout and scale are torchvision's ``ToTensor``.
    ``workers``: 0 decodes in the calling thread; N > 0 splits each batch over N processes
    (kept for the life of this process; Pillow's decoders hold the GIL, so threads would not
    help): about N× the decode rate on N free cores. Raises DataError naming the position of
    an image that does not decode, ConfigError for a bad ``size`` or ``workers``.
    """
    if size is not None and (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and s >= 1 for s in size)
    ):
        raise ConfigError(
            f"size must be (height, width) in pixels, got {size!r}. Pass e.g. (64, 64)."
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer ≥ 0, got {workers!r}. Pass e.g. 2.")
    size = tuple(size) if size is not None else None  # type: ignore[assignment]
    if workers and len(images) > 1:
        step = -(-len(images) // workers)
        chunks = [list(images[i : i + step]) for i in range(0, len(images), step)]
        starts = list(range(0, len(images), step))
        parts = list(
            _process_pool(workers).map(
                decode_stacked, chunks, starts, [size] * len(chunks), [mode] * len(chunks)
            )
        )
        if all(isinstance(p, np.ndarray) for p in parts) and len({p.shape[1:] for p in parts}) == 1:
            return _to_tensor(np.concatenate(parts))
        arrays = [a for part in parts for a in part]
    else:
        arrays = decode_some(images, 0, size, mode)
    if not arrays:
        h, w = size if size is not None else (0, 0)
        channels = len(mode) if mode in ("RGB", "RGBA", "L", "LA", "CMYK") else 1
        return torch.zeros((0, channels, h, w), dtype=torch.float32)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(
            f"images must share one size to form a batch, got {sorted(shapes)}. Pass "
            "size=(H, W) to resize them."
        )
    return _to_tensor(np.stack(arrays))


def _to_tensor(stacked: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W(, C)]`` → float32 ``[B, C, H, W]`` in [0, 1]."""
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    # channels first while still uint8: one float pass instead of a float copy plus a reorder
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
