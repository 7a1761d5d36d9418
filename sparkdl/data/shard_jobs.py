"""[executor] The executor-side bodies of ``materialize``'s two Spark jobs (see its module docstring).

Each ``*_partition`` function returns the body that ``mapInArrow`` runs on the executors.
Job 1 (*scan and route*) reads each input partition once: it counts rows, validation rows,
nulls, NaN/inf and array lengths, digests the content, and cuts the rows into Arrow IPC pieces
keyed by (split, row index in the split modulo ``num_shards``) — the global row index is not
known yet, but global row ``i`` goes to shard ``i % num_shards``, so that residue and the
partition's offset (known on the driver after job 1) pick the shard. Job 2 (*write*) gets one
shard's pieces in row order and streams them into one Parquet file plus its replicas.

numpy + pyarrow only: pyspark is imported inside the bodies (for ``TaskContext``), never torch;
and no pandas: ``pa.array`` and ``Array.to_numpy`` import it (a third of a second in every
fresh Python worker), so arrays go through their buffers here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import numpy as np
import pyarrow as pa

from sparkdl import storage

__all__ = [
    "FLAG",
    "KEY",
    "PIECES_SCHEMA",
    "RECORDS_SCHEMA",
    "ROW",
    "partition_keys",
    "scan_partition",
    "validation_mask",
    "write_partition",
]

_U64 = np.uint64
# The validation flag travels next to the converted columns through job 1, never written.
FLAG = "__sparkdl_validation__"

PIECES_SCHEMA = pa.schema(
    [
        ("partition", pa.int32()),
        ("key", pa.int32()),
        ("start", pa.int64()),
        ("payload", pa.binary()),
        ("rows", pa.int64()),
        ("validation_rows", pa.int64()),
        ("stats", pa.string()),
        ("digest", pa.string()),
        ("piece_bytes", pa.int64()),
        ("payload_bytes", pa.int64()),
    ]
)
"""Job 1's rows. A piece: its ``partition``, ``key`` = split * num_shards + (index of its first
row in the split, within the partition) % num_shards, ``start`` = that index, ``payload`` = the
rows (every num_shards-th of that split in one Arrow batch of the partition) as an Arrow IPC
stream. Then one summary row per partition (``key`` -1): ``rows``, ``validation_rows``,
``stats`` (JSON, per column), ``digest``, its largest ``piece_bytes`` and all its pieces'
``payload_bytes``."""

KEY = "__sparkdl_shard_key__"
ROW = "__sparkdl_split_row__"
"""The columns job 2 sorts pieces by: their shard's partition key and the index in the split
of their first row."""
RECORDS_SCHEMA = pa.schema([("record", pa.string())])
"""Job 2's rows: one JSON record per file written."""


# --- pyarrow arrays without pandas -------------------------------------------------------------


def _numpy(arr: pa.Array) -> np.ndarray:
    """The values of a null-free fixed-width (or boolean) array, through its buffers."""
    if arr.null_count:
        return arr.to_numpy(zero_copy_only=False)
    if len(arr) == 0:
        return np.empty(0, dtype=arr.type.to_pandas_dtype())
    data = arr.buffers()[1]
    if pa.types.is_boolean(arr.type):
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return bits[arr.offset : arr.offset + len(arr)].astype(bool)
    dtype = np.dtype(arr.type.to_pandas_dtype())
    return np.frombuffer(data, dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=type_.to_pandas_dtype())
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _binary(items: list[bytes], type_: pa.DataType = pa.binary()) -> pa.Array:
    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in items], out=offsets[1:])
    data = pa.py_buffer(b"".join(items))
    return pa.Array.from_buffers(type_, len(items), [None, pa.py_buffer(offsets), data])


# --- job 1: scan and route --------------------------------------------------------------------


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
        return _numpy(batch.column(batch.schema.get_field_index(FLAG))).astype(bool)
    return validation_mask(seed, partition, start, batch.num_rows, fraction)


def _column_stats(arr: pa.Array, stats: dict[str, Any], digest: Any) -> None:
    import pyarrow.compute as pc

    stats["nulls"] += arr.null_count
    values = arr
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(
        arr.type
    ):  # bytes (named inputs): digest the values, no lengths
        _digest_binary(arr.drop_null() if arr.null_count else arr, digest)
        return
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).drop_null()
        if len(lengths):
            lo, hi = (x.as_py() for x in pc.min_max(lengths).values())
            stats["min_len"] = lo if stats["min_len"] is None else min(lo, stats["min_len"])
            stats["max_len"] = hi if stats["max_len"] is None else max(hi, stats["max_len"])
            digest.update(_numpy(lengths).tobytes())
        values = arr.flatten()
        stats["nulls"] += values.null_count
    values = values.drop_null() if values.null_count else values
    np_values = _numpy(values)
    if np_values.dtype.kind == "f":
        stats["nonfinite"] += int(np_values.size - np.count_nonzero(np.isfinite(np_values)))
    digest.update(np_values.tobytes())


def _digest_binary(arr: pa.Array, digest: Any) -> None:
    """Each value's length and bytes, whatever the array's offset."""
    if not len(arr):
        return
    width = 8 if pa.types.is_large_binary(arr.type) else 4
    kind = np.int64 if width == 8 else np.int32
    offsets = np.frombuffer(arr.buffers()[1], kind, count=len(arr) + 1, offset=arr.offset * width)
    digest.update(np.diff(offsets).tobytes())
    data = arr.buffers()[2]
    if data is not None:
        digest.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])


def scan_partition(
    columns: list[str],
    names: list[str],
    num_shards: int,
    seed: int,
    fraction: float,
    items_nullable: list[bool | None],
):
    """Job 1's body: a partition's pieces (its ``columns`` under the user's ``names``, the flag
    dropped), then its summary row (see PIECES_SCHEMA). ``items_nullable``: per column, whether
    an array's elements are nullable in the DataFrame's schema (None: not an array), which the
    files record (Spark's Arrow batches follow the optimized plan, which may be narrower)."""

    def scan(batches):
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()
        stats = {c: {"nulls": 0, "nonfinite": 0, "min_len": None, "max_len": None} for c in columns}
        digests = {c: hashlib.sha256() for c in columns}
        split_digest = None  # a validation_col's flags decide the split: hash them too
        rows = validation = largest = total = 0
        next_index = [0, 0]  # per split: the partition's next row index in it
        for batch in batches:
            for c in columns:
                _column_stats(batch.column(c), stats[c], digests[c])
            mask = _split_mask(batch, seed, partition, rows, fraction)
            if FLAG in batch.schema.names:
                split_digest = split_digest or hashlib.sha256()
                split_digest.update(np.packbits(mask).tobytes())
            validation += int(mask.sum())
            rows += batch.num_rows
            if batch.num_rows:
                data = _data_columns(batch, items_nullable)
                pieces, sizes = _route(data, names, mask, next_index, num_shards, partition)
                largest, total = max(largest, int(sizes.max())), total + int(sizes.sum())
                yield pieces
        parts = [digests[c].hexdigest() for c in columns]
        parts += [split_digest.hexdigest()] if split_digest else []
        digest = hashlib.sha256("".join(parts).encode()).hexdigest()
        counts = (partition, rows, validation, largest, total)
        yield _summary_batch(*counts, stats=json.dumps(stats), digest=digest)

    return scan


def _data_columns(batch: pa.RecordBatch, items_nullable: list[bool | None]) -> list[pa.Array]:
    """The batch's columns without the flag, arrays typed as the DataFrame's schema says."""
    columns = [batch.column(i) for i, name in enumerate(batch.schema.names) if name != FLAG]
    for i, (column, nullable) in enumerate(zip(columns, items_nullable)):
        item = column.type.value_field if pa.types.is_list(column.type) else None
        if item is not None and nullable is not None and item.nullable != nullable:
            columns[i] = column.view(pa.list_(item.with_nullable(nullable)))
    return columns


def _route(
    columns: list[pa.Array],
    names: list[str],
    mask: np.ndarray,
    next_index: list[int],
    num_shards: int,
    partition: int,
) -> tuple[pa.RecordBatch, np.ndarray]:
    """A batch's pieces (see PIECES_SCHEMA) and their sizes: its data ``columns`` under the
    user's ``names``, one Arrow IPC stream per (split, row index in the split % num_shards),
    written one after the other into one buffer that the payload column points into."""
    batch = pa.RecordBatch.from_arrays(columns, names=names)
    split = mask.astype(np.int64)
    index = np.empty(batch.num_rows, dtype=np.int64)
    for code in (0, 1):
        chosen = split == code
        count = int(chosen.sum())
        index[chosen] = next_index[code] + np.arange(count)
        next_index[code] += count
    keys = split * num_shards + index % num_shards
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(np.diff(keys[order])) + 1
    firsts = order[np.concatenate(([0], cuts))]
    sink = pa.BufferOutputStream()
    ends = []
    for rows in np.split(order, cuts):
        piece = batch.take(_array(rows, pa.int64()))
        with pa.ipc.new_stream(sink, piece.schema) as writer:
            writer.write_batch(piece)
        ends.append(sink.tell())
    n = len(ends)
    offsets = np.array([0, *ends], dtype=np.int32)
    payload = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), sink.getvalue()])
    columns = [
        _array(np.full(n, partition), pa.int32()),
        _array(keys[firsts], pa.int32()),
        _array(index[firsts], pa.int64()),
        payload,
    ]
    columns += [pa.nulls(n, f.type) for f in list(PIECES_SCHEMA)[4:]]
    return pa.RecordBatch.from_arrays(columns, schema=PIECES_SCHEMA), np.diff(offsets)


def _summary_batch(
    partition: int, rows: int, validation: int, largest: int, total: int, *, stats: str, digest: str
) -> pa.RecordBatch:
    """A partition's summary row (key -1; see PIECES_SCHEMA)."""
    columns = [
        _array(np.array([partition]), pa.int32()),
        _array(np.array([-1]), pa.int32()),
        pa.nulls(1, pa.int64()),
        pa.nulls(1, pa.binary()),
        _array(np.array([rows]), pa.int64()),
        _array(np.array([validation]), pa.int64()),
        _binary([stats.encode()], pa.string()),
        _binary([digest.encode()], pa.string()),
        _array(np.array([largest]), pa.int64()),
        _array(np.array([total]), pa.int64()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=PIECES_SCHEMA)


# --- job 2: write -------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def _spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` of an int column (Murmur3_x86_32.hashInt, seed 42), as a signed int."""
    k1 = _rotl32((value & _M32) * 0xCC9E2D51 & _M32, 15) * 0x1B873593 & _M32
    h1 = (_rotl32(seed ^ k1, 13) * 5 + 0xE6546B64) & _M32
    h1 ^= 4
    h1 = ((h1 ^ (h1 >> 16)) * 0x85EBCA6B) & _M32
    h1 = ((h1 ^ (h1 >> 13)) * 0xC2B2AE35) & _M32
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(n: int) -> list[int]:
    """``n`` int keys that ``df.repartition(n, key)`` sends to partitions ``0..n-1`` in order
    (Spark's hash partitioning: ``pmod(hash(key), n)``), so that every shard is written by its
    own task. Were a Spark to hash differently, shards would share tasks: slower, same files."""
    keys: list[int | None] = [None] * n
    candidate, missing = 0, n
    while missing:
        slot = _spark_hash_int(candidate) % n
        if keys[slot] is None:
            keys[slot] = candidate
            missing -= 1
        candidate += 1
    return [k for k in keys if k is not None]


def write_partition(
    uri: str,
    num_shards: int,
    row_group_rows: list[int],
    replicas: int,
    label_col: str,
    keys: list[int],
):
    """Job 2's body: write the shards whose pieces (``KEY``, ``ROW``, payload; sorted by both)
    reach this task, each as one Parquet file plus its replicas; one JSON record per file
    (split, shard, path, rows, bytes, sha256, row groups, replicas, schema)."""
    from sparkdl.data.manifest import SPLITS

    index_of = {key: i for i, key in enumerate(keys)}

    def write(batches):
        fs, root = storage.resolve(uri)
        records = []
        for key, run in itertools.groupby(_payloads(batches), key=lambda item: item[0]):
            index = index_of[key]
            split, shard = SPLITS[index // num_shards], index % num_shards
            relpath = f"{split}/shard-{shard:05d}.parquet"
            full = storage.join(root, relpath)
            payloads = (payload for _, payload in run)
            rg = row_group_rows[index // num_shards]
            written = _write_parquet(fs, full, payloads, rg, label_col)
            if written is None:
                continue
            schema, groups = written
            sha, size = storage.sha256_of(fs, full)
            copies = [f"_replicas/{k}/{relpath}" for k in range(1, replicas)]
            for copy in copies:
                storage.copy_file(fs, full, storage.join(root, copy))
            schema_json = [{"name": f.name, "type": str(f.type)} for f in schema]
            record = {"split": split, "shard": shard, "path": relpath, "rows": sum(groups)}
            record.update(bytes=size, sha256=sha, row_groups=groups, replicas=copies)
            records.append(json.dumps({**record, "schema": schema_json}).encode())
        yield pa.RecordBatch.from_arrays([_binary(records, pa.string())], schema=RECORDS_SCHEMA)

    return write


def _payloads(batches: Any) -> Any:
    """(shard key, IPC payload buffer) of every piece, in order."""
    for batch in batches:
        keys = _numpy(batch.column(batch.schema.get_field_index(KEY)))
        payloads = batch.column(batch.schema.get_field_index("payload"))
        for i in range(batch.num_rows):
            yield int(keys[i]), payloads[i].as_buffer()


def _write_parquet(
    fs: Any, full: str, payloads: Any, rg: int, label_col: str
) -> tuple[Any, list[int]] | None:
    """Stream one shard's IPC pieces (in row order) into one Parquet file of ``rg``-row groups;
    None if no rows.

    Dictionary encoding only for the label: float features rarely repeat, and a dictionary
    (tried first, then abandoned) leaves pages that decode slower than plain ones.
    """
    import pyarrow.parquet as pq

    writer, sink, schema = None, None, None
    pending: list[pa.RecordBatch] = []
    groups: list[int] = []
    try:
        for payload in payloads:
            pending.extend(pa.ipc.open_stream(payload))
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
