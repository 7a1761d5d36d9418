"""[executor] The executor-side bodies of ``materialize``'s two Spark jobs (see its module docstring).

Each ``*_partition`` function returns the body that ``mapInArrow`` / ``mapPartitionsWithIndex``
run on the executors: job 1 (*scan*) counts rows, validation rows, nulls, NaN/inf and array
lengths per partition and digests the content; job 2 (*route and write*) routes global row
``i`` of a split to shard ``i % num_shards`` as Arrow IPC pieces, then writes each shard's
pieces, in row order, as one Parquet file plus its replicas. numpy + pyarrow only: pyspark is
imported inside the bodies (for ``TaskContext``), and never torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

from sparkdl import storage

__all__ = [
    "FLAG",
    "route_partition",
    "scan_partition",
    "shard_of_key",
    "validation_mask",
    "write_partition",
]

_U64 = np.uint64
# The validation flag travels next to the converted columns through both jobs, never written.
FLAG = "__sparkdl_validation__"


# --- job 1: scan -----------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def validation_mask(seed: int, partition: int, start: int, n: int, fraction: float) -> np.ndarray:
    """Seeded per-row split: True for rows ``start..start+n`` of a partition that go to validation."""
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    base = _splitmix64(np.array([seed * 1_000_003 + partition], dtype=_U64))[0]
    with np.errstate(over="ignore"):
        z = _splitmix64(np.arange(start, start + n, dtype=_U64) + base)
    return (z >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction


def _split_mask(
    batch: pa.RecordBatch, seed: int, partition: int, start: int, fraction: float
) -> np.ndarray:
    """True for the rows of ``batch`` that go to validation: the flag column, else seeded."""
    if FLAG in batch.schema.names:
        flags = batch.column(batch.schema.get_field_index(FLAG))
        return flags.to_numpy(zero_copy_only=False).astype(bool)
    return validation_mask(seed, partition, start, batch.num_rows, fraction)


def _column_stats(arr: pa.Array, stats: dict[str, Any], digest: Any) -> None:
    import pyarrow.compute as pc

    stats["nulls"] += arr.null_count
    values = arr
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).drop_null()
        if len(lengths):
            lo, hi = (x.as_py() for x in pc.min_max(lengths).values())
            stats["min_len"] = lo if stats["min_len"] is None else min(lo, stats["min_len"])
            stats["max_len"] = hi if stats["max_len"] is None else max(hi, stats["max_len"])
            digest.update(lengths.to_numpy(zero_copy_only=False).tobytes())
        values = arr.flatten()
        stats["nulls"] += values.null_count
    values = values.drop_null() if values.null_count else values
    np_values = values.to_numpy(zero_copy_only=False)
    if np_values.dtype.kind == "f":
        stats["nonfinite"] += int(np_values.size - np.count_nonzero(np.isfinite(np_values)))
    digest.update(np_values.tobytes())


def scan_partition(columns: list[str], seed: int, fraction: float):
    def scan(batches):
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()
        stats = {c: {"nulls": 0, "nonfinite": 0, "min_len": None, "max_len": None} for c in columns}
        digests = {c: hashlib.sha256() for c in columns}
        split_digest = None  # a validation_col's flags decide the split: hash them too
        rows = validation = 0
        for batch in batches:
            for c in columns:
                _column_stats(batch.column(c), stats[c], digests[c])
            mask = _split_mask(batch, seed, partition, rows, fraction)
            if FLAG in batch.schema.names:
                split_digest = split_digest or hashlib.sha256()
                split_digest.update(np.packbits(mask).tobytes())
            validation += int(mask.sum())
            rows += batch.num_rows
        parts = [digests[c].hexdigest() for c in columns]
        parts += [split_digest.hexdigest()] if split_digest else []
        digest = hashlib.sha256("".join(parts).encode())
        yield pa.RecordBatch.from_arrays(
            [
                pa.array([partition], pa.int32()),
                pa.array([rows], pa.int64()),
                pa.array([validation], pa.int64()),
                pa.array([json.dumps(stats)], pa.string()),
                pa.array([digest.hexdigest()], pa.string()),
            ],
            names=["partition", "rows", "validation_rows", "stats", "digest"],
        )

    return scan


# --- job 2: route and write ------------------------------------------------------------------


def route_partition(
    num_shards: int, seed: int, fraction: float, offsets: dict[int, list[int]], names: list[str]
):
    """Emit (key = split*num_shards + shard, first split row index, Arrow IPC piece) rows; the
    pieces carry the user's column ``names`` (the job's own columns are positional)."""

    def route(batches):
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()
        next_index = list(offsets.get(partition, (0, 0)))
        local = 0
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            split = _split_mask(batch, seed, partition, local, fraction).astype(np.int64)
            if FLAG in batch.schema.names:
                batch = _without_flag(batch)
            batch = pa.RecordBatch.from_arrays(batch.columns, names=names)
            local += n
            index = np.empty(n, dtype=np.int64)
            for code in (0, 1):
                chosen = split == code
                count = int(chosen.sum())
                index[chosen] = next_index[code] + np.arange(count)
                next_index[code] += count
            yield _pieces(batch, split * num_shards + index % num_shards, index)

    return route


def _without_flag(batch: pa.RecordBatch) -> pa.RecordBatch:
    keep = [i for i, name in enumerate(batch.schema.names) if name != FLAG]
    schema = pa.schema([batch.schema.field(i) for i in keep])
    return pa.RecordBatch.from_arrays([batch.column(i) for i in keep], schema=schema)


def _pieces(batch: pa.RecordBatch, keys: np.ndarray, index: np.ndarray) -> pa.RecordBatch:
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(np.diff(keys[order])) + 1
    out_keys, out_starts, payloads = [], [], []
    for rows in np.split(order, cuts):
        sink = pa.BufferOutputStream()
        piece = batch.take(pa.array(rows))
        with pa.ipc.new_stream(sink, piece.schema) as writer:
            writer.write_batch(piece)
        out_keys.append(int(keys[rows[0]]))
        out_starts.append(int(index[rows[0]]))
        payloads.append(sink.getvalue().to_pybytes())
    return pa.RecordBatch.from_arrays(
        [pa.array(out_keys, pa.int32()), pa.array(out_starts, pa.int64()), pa.array(payloads)],
        names=["key", "start", "payload"],
    )


def shard_of_key(key: tuple[int, int]) -> int:
    return key[0]


def write_partition(
    uri: str, num_shards: int, row_group_rows: list[int], replicas: int, label_col: str
):
    """Write one shard's pieces (sorted by first row) as one Parquet file plus its replicas."""
    from sparkdl.data.manifest import SPLITS

    def write(index: int, items):
        split, shard = SPLITS[index // num_shards], index % num_shards
        relpath = f"{split}/shard-{shard:05d}.parquet"
        fs, root = storage.resolve(uri)
        full = storage.join(root, relpath)
        written = _write_parquet(fs, full, items, row_group_rows[index // num_shards], label_col)
        if written is None:
            return []
        schema, groups = written
        sha, size = storage.sha256_of(fs, full)
        copies = [f"_replicas/{k}/{relpath}" for k in range(1, replicas)]
        for copy in copies:
            storage.copy_file(fs, full, storage.join(root, copy))
        schema_json = [{"name": f.name, "type": str(f.type)} for f in schema]
        record = {"split": split, "shard": shard, "path": relpath, "rows": sum(groups)}
        record.update(bytes=size, sha256=sha, row_groups=groups, replicas=copies)
        return [json.dumps({**record, "schema": schema_json})]

    return write


def _write_parquet(
    fs: Any, full: str, items: Any, rg: int, label_col: str
) -> tuple[Any, list[int]] | None:
    """Stream sorted IPC pieces into one Parquet file of ``rg``-row groups; None if no rows.

    Dictionary encoding only for the label: float features rarely repeat, and a dictionary
    (tried first, then abandoned) leaves pages that decode slower than plain ones.
    """
    import pyarrow.parquet as pq

    writer, sink, schema = None, None, None
    pending: list[pa.RecordBatch] = []
    groups: list[int] = []
    try:
        for _, payload in items:
            pending.extend(pa.ipc.open_stream(pa.py_buffer(payload)))
            if writer is None and pending:
                schema = pending[0].schema
                sink = storage.open_output(fs, full)
                writer = pq.ParquetWriter(sink, schema, use_dictionary=[label_col])
            pending = _flush_groups(writer, pending, rg, groups, final=False)
        if writer is not None:
            _flush_groups(writer, pending, rg, groups, final=True)
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()
    return None if writer is None else (schema, groups)


def _flush_groups(writer, pending: list, rg: int, groups: list[int], final: bool) -> list:
    """Write every full row group of ``pending`` (all of it when ``final``); return the rest."""
    rows = sum(b.num_rows for b in pending)
    full = rows if final else rows // rg * rg
    if full == 0:
        return pending
    table = pa.Table.from_batches(pending)
    writer.write_table(table.slice(0, full), row_group_size=rg)
    groups.extend([rg] * (full // rg) + ([full % rg] if full % rg else []))
    return table.slice(full).to_batches()
