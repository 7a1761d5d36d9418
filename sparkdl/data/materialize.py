"""[driver] DataFrame → sharded Parquet + manifest, done by Spark in two Arrow-columnar jobs.

1. *Scan and route*: one ``mapInArrow`` pass over the converted DataFrame (features cast to
   float32 / array<float>, vectors through ``vector_to_array``, label to int64 or float32)
   returns per partition its row count, the validation-split count, null / NaN / inf counts and
   array lengths per column, and a content digest, and cuts its rows into Arrow IPC pieces, one
   per (split, row index in the split modulo ``num_shards``) and Arrow batch. The result is
   persisted; only the summaries come to the driver, which validates them before any write.
2. *Write*: global row ``i`` of a split goes to shard ``i % num_shards`` (equal rows ±1, in the
   DataFrame's row order): with the partitions' offsets, a piece's shard and first global row
   are column arithmetic; ``repartition`` + ``sortWithinPartitions`` put each shard's pieces in
   one partition in row order (up to 16 MiB of data, one task takes all shards, no shuffle), and
   the task writes the shard's Parquet file (row groups sized so every shard has several), its
   replicas, and returns a small record (rows, bytes, sha256).

The executor-side bodies of both jobs are in :mod:`sparkdl.data.shard_jobs`; this module holds
the parameter checks and the orchestration. The driver writes ``_sparkdl_manifest.json`` last,
atomically. No data is collected to the driver and no per-row Python runs. Layout under the
dataset root::

    train/shard-00000.parquet ...        read with spark.read.parquet(f"{root}/train")
    validation/shard-00000.parquet ...   when validation_fraction > 0 or validation_col is set
    _replicas/1/train/shard-00000.parquet ...   when replicas > 1 (hidden from Spark readers)
    _sparkdl_manifest.json

pyspark is imported inside functions only, so importing this module does not import pyspark.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparkdl import storage
from sparkdl.columns import quote_column
from sparkdl.data.bad_input import (
    MODES,
    ON_INVALID,
    check_labels,
    check_on_invalid,
    check_params,
    drop_nonfinite,
    read_input,
    reuse,
)
from sparkdl.data.bad_input import Params as _Params
from sparkdl.data.dataset import ShardedDataset
from sparkdl.data.input_specs import input_columns
from sparkdl.data.manifest import FORMAT_VERSION, FileEntry, Manifest, ShardEntry
from sparkdl.data.named_columns import (
    Layout,
    named_cast,
    named_inputs,
    nonfinite_kind,
    plan_columns,
    plan_named,
    stored_labels,
)
from sparkdl.data.shard_jobs import (
    FLAG,
    KEY,
    PIECES_SCHEMA,
    RECORDS_SCHEMA,
    ROW,
    partition_keys,
    scan_partition,
    write_partition,
)
from sparkdl.errors import ConfigError, DataError
from sparkdl.session import spark_side

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["materialize", "MODES", "ON_INVALID", "check_on_invalid", "default_row_group_rows"]

log = logging.getLogger("sparkdl")

_MAX_ROW_GROUP_ROWS = 1 << 16
_ROW_GROUPS_PER_SHARD = 8
_WRITE_BATCH_BYTES = 64 << 20
"""Job 2's Arrow batches of pieces hold about this many bytes (Spark < 4 caps them by count only)."""
_ONE_WRITER_BYTES = 16 << 20
"""Up to this much data one task writes every shard: no shuffle, no task per shard."""


def materialize(
    df: DataFrame,
    path: str,
    *,
    feature_cols: list[str] | dict[str, Any],
    label_col: str,
    num_shards: int,
    seed: int = 0,
    mode: str = "error",
    validation_fraction: float = 0.0,
    replicas: int = 1,
    row_group_rows: int | None = None,
    on_invalid: str = "error",
    validation_col: str | None = None,
    sample_weight_col: str | None = None,
    feature_shapes: dict[str, Any] | None = None,
    max_lengths: dict[str, Any] | None = None,
    pad_values: dict[str, Any] | None = None,
) -> ShardedDataset:
    """Write ``df`` as ``num_shards`` equal Parquet shards (±1 row) plus a manifest at ``path``.

    ``feature_cols``: numeric, array<numeric> (fixed length) or Spark ML vector columns, stored
    as float32 and concatenated by the loader in this order; or a dict of named inputs (model
    argument → column or list of numeric columns, see :mod:`sparkdl.data.input_specs`) whose
    columns are stored without loss (ids int64, binary, ragged arrays unpadded) with
    ``feature_shapes``, ``max_lengths`` and ``pad_values`` (dicts keyed like it) and each
    input's kind in the manifest. ``label_col``: integer types →
    int64, fractional → float32. ``mode``: "error" refuses an existing path, "overwrite"
    replaces it, "reuse" returns the existing dataset when the data and parameters hash the
    same (else ConfigError). ``validation_fraction``: seeded per-row split into "validation".
    ``validation_col``: instead of a fraction, a boolean column: true rows go to "validation"
    (null counts as false); it is not stored.
    ``replicas``: copies of every file (the loader falls back to them). ``row_group_rows``:
    rows per Parquet row group (default: about 1/8 of a shard, at most 65,536).
    ``on_invalid``: "error" (default) refuses NaN/inf in a feature or the label; "skip" drops
    those rows (counted and logged as a warning) and materializes the rest.

    Raises ConfigError/DataError on the driver, before anything is written, for bad parameters,
    missing or non-numeric columns, nulls, NaN/inf, ragged arrays, an empty DataFrame, fewer
    rows than shards, an unreadable input (e.g. a corrupt Parquet file), or an existing path
    with mode="error".
    """
    check_on_invalid(on_invalid)
    labels = check_labels(label_col, sample_weight_col, feature_cols)
    label_col = labels["label_cols"][0] if labels else label_col
    named = named_inputs(feature_cols, feature_shapes, max_lengths, pad_values)
    feature_cols = input_columns(named["feature_cols"]) if named else feature_cols
    params = check_params(
        feature_cols,
        label_col,
        num_shards,
        seed,
        mode,
        validation_fraction,
        replicas,
        row_group_rows,
        validation_col,
    )
    uri = storage.normalize_uri(path)
    fs, root = storage.resolve(uri)
    layout = plan_columns(df, params, named, labels)
    exists = storage.exists(fs, root)
    if exists and mode == "error":
        raise ConfigError(
            f"path must not exist with mode='error', got existing {uri!r}. Pass "
            "mode='overwrite' to replace it, mode='reuse' to reuse it, or choose another path."
        )
    converted = _convert(df, layout, params.validation_col)
    if on_invalid == "skip":
        kinds = [nonfinite_kind(b) for _, b in layout.bases] or [k for _, k in layout.features]
        label_kind = (
            "array" if layout.labels and layout.labels["base"] == "list_float" else "scalar"
        )
        kinds = kinds + [nonfinite_kind(b) for _, b in layout.extras] + [label_kind]
        converted = drop_nonfinite(converted, layout.positional, kinds)
    fn = scan_partition(
        layout.positional,
        layout.columns,
        params.num_shards,
        params.seed,
        params.validation_fraction,
        [getattr(f.dataType, "containsNull", None) for f in converted.schema if f.name != FLAG],
    )
    pieces = converted.mapInArrow(fn, _spark_schema(PIECES_SCHEMA)).persist()
    try:
        scan = read_input(lambda: _scan(pieces, layout))
        counts = _check_scan(scan, layout, params)
        plan_hash = _plan_hash(params, layout, converted, scan)
        if exists and mode == "reuse":
            return reuse(uri, plan_hash, params)
        if exists:
            log.info("sparkdl: overwriting dataset at %s", uri)
            storage.remove_tree(fs, root)
        records = _write_shards(pieces, uri, params, scan, counts)
    finally:
        pieces.unpersist()
    manifest = _build_manifest(params, layout, counts, records, plan_hash, scan)
    manifest.save(uri)
    log.info("sparkdl: materialized %s rows into %d shards at %s", counts, params.num_shards, uri)
    return ShardedDataset(uri, manifest)


def default_row_group_rows(shard_rows: int) -> int:
    """About 1/8 of a shard (several row groups per shard for shuffling), at most 65,536."""
    return max(1, min(_MAX_ROW_GROUP_ROWS, math.ceil(shard_rows / _ROW_GROUPS_PER_SHARD)))


# --- columns (driver, schema only) --------------------------------------------------------


def _real_names(converted: DataFrame, layout: Layout) -> Any:
    """The converted schema with the user's column names (what the plan hash records)."""
    from pyspark.sql import types as T

    real = dict(zip(layout.positional, layout.columns))
    return T.StructType(
        [T.StructField(real.get(f.name, f.name), f.dataType, f.nullable) for f in converted.schema]
    )


def _spark_schema(schema: Any) -> Any:
    """The Spark schema of a job's Arrow ``schema``. Types are objects throughout materialize:
    the first type string of a session costs a third of a second (the SQL parser's start)."""
    from pyspark.sql import types as T

    types = {"int32": T.IntegerType(), "int64": T.LongType(), "binary": T.BinaryType()}
    return T.StructType(
        [T.StructField(f.name, types.get(str(f.type), T.StringType())) for f in schema]
    )


def _convert(df: DataFrame, layout: Layout, validation_col: str | None = None) -> DataFrame:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    exprs = []
    names = layout.positional
    types = {f.name: f.dataType for f in df.schema.fields}
    bases = dict(layout.bases)
    for (name, kind), alias in zip(layout.features, names):
        col = F.col(quote_column(name))
        if name in bases:
            exprs.append(named_cast(col, bases[name], types[name]).alias(alias))
        elif kind == "scalar":
            exprs.append(col.cast(T.FloatType()).alias(alias))
        elif kind == "array":
            exprs.append(col.cast(T.ArrayType(T.FloatType())).alias(alias))
        else:
            from pyspark.ml.functions import vector_to_array  # pyspark.ml: only when needed

            exprs.append(vector_to_array(col, "float32").alias(alias))
    for (name, base), alias in zip(layout.extras, names[len(layout.features) :]):
        exprs.append(named_cast(F.col(quote_column(name)), base, types[name]).alias(alias))
    label = F.col(quote_column(layout.label_col))
    if layout.labels is not None and layout.labels["base"] == "list_float":
        exprs.append(named_cast(label, "list_float", types[layout.label_col]).alias(names[-1]))
    else:
        label_type = T.LongType() if layout.label_type == "int64" else T.FloatType()
        exprs.append(label.cast(label_type).alias(names[-1]))
    if validation_col:
        exprs.append(F.coalesce(F.col(quote_column(validation_col)), F.lit(False)).alias(FLAG))
    return df.select(*exprs)


# --- job 1: scan and route (the executors run shard_jobs.scan_partition) --------------------------


@dataclass(frozen=True)
class _Scan:
    partitions: list[int]
    rows: dict[int, int]
    validation_rows: dict[int, int]
    stats: dict[str, dict[str, Any]]
    digest: str
    piece_bytes: int = 0
    payload_bytes: int = 0


def _scan(pieces: DataFrame, layout: Layout) -> _Scan:
    """Run job 1 (computing and persisting ``pieces``); its per-partition summaries combined."""
    from pyspark.sql import functions as F

    summaries = pieces.filter(F.col("key") < 0).drop("key", "start", "payload")
    spark_side(pieces.sparkSession).describe("sparkdl materialize: scan and route")
    rows = sorted(summaries.collect(), key=lambda r: r["partition"])
    stats: dict[str, dict[str, Any]] = {
        c: {"nulls": 0, "nonfinite": 0, "lengths": set()} for c in layout.columns
    }
    real = dict(zip(layout.positional, layout.columns))
    for r in rows:
        for position, s in json.loads(r["stats"]).items():
            c = real[position]
            stats[c]["nulls"] += s["nulls"]
            stats[c]["nonfinite"] += s["nonfinite"]
            stats[c]["lengths"].update(x for x in (s["min_len"], s["max_len"]) if x is not None)
    digest = hashlib.sha256("".join(r["digest"] for r in rows).encode()).hexdigest()
    return _Scan(
        partitions=[r["partition"] for r in rows],
        rows={r["partition"]: r["rows"] for r in rows},
        validation_rows={r["partition"]: r["validation_rows"] for r in rows},
        stats=stats,
        digest=digest,
        piece_bytes=max((r["piece_bytes"] for r in rows), default=0),
        payload_bytes=sum(r["payload_bytes"] for r in rows),
    )


def _check_scan(scan: _Scan, layout: Layout, params: _Params) -> dict[str, int]:
    """Validate the scan's statistics; return rows per split."""
    total = sum(scan.rows.values())
    if total == 0:
        raise DataError("DataFrame must have at least one row, got 0 rows. Check its filters.")
    for col in layout.columns:
        s = scan.stats[col]
        if s["nulls"]:
            raise DataError(
                f"column {col!r} must have no nulls, got {s['nulls']} null value(s). Drop or "
                f"fill them first (df.na.drop(subset=[{col!r}]) or df.na.fill)."
            )
        if s["nonfinite"]:
            raise DataError(
                f"column {col!r} must hold only finite values, got {s['nonfinite']} NaN/inf "
                "value(s) (after the cast to float32). Filter or impute them first, or pass "
                "on_invalid='skip' to drop those rows."
            )
    for col, kind in layout.features if not layout.bases else ():  # named: see plan_named
        lengths = scan.stats[col]["lengths"]
        if kind != "scalar" and (len(lengths) > 1 or 0 in lengths):
            raise DataError(
                f"{kind} column {col!r} must have one non-zero length in every row, got lengths "
                f"{min(lengths)}..{max(lengths)}. Pad or truncate it to a fixed length first."
            )
    stored_labels(layout, scan)  # label types and lengths: before any write
    if layout.named is not None:  # shapes, ragged columns in a dense input: before any write
        named = layout.named
        plan_named(named["feature_cols"], dict(layout.bases), scan.stats, named["options"])
    validation = sum(scan.validation_rows.values())
    counts = {"train": total - validation}
    if params.has_validation:
        counts["validation"] = validation
    if params.validation_col and validation == 0:
        raise DataError(
            f"validation_col {params.validation_col!r} must be true for at least one row, got "
            "none. Mark the validation rows, or drop validation_col."
        )
    if counts["train"] < params.num_shards:
        raise DataError(
            f"the DataFrame must have at least num_shards ({params.num_shards}) training rows, "
            f"got {counts['train']}. Use fewer shards/workers or more data."
        )
    return counts


def _plan_hash(params: _Params, layout: Layout, converted: DataFrame, scan: _Scan) -> str:
    """Hash of the materialize parameters, the converted schema and the data's content digest.

    The content digest (from the scan) is used rather than the plan's text alone because a
    plan's text does not show in-memory data or files rewritten in place: never stale data.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "feature_cols": list(params.feature_cols),
        "label_col": params.label_col,
        "num_shards": params.num_shards,
        "seed": params.seed,
        "validation_fraction": params.validation_fraction,
        "validation_col": params.validation_col,
        "replicas": params.replicas,
        "row_group_rows": params.row_group_rows,
        "layout": [list(f) for f in layout.features] + [layout.label_type],
        "schema": _real_names(converted, layout).json(),
        "content": scan.digest,
    }
    if layout.named is not None:  # only then: the hash of a list of columns stays as it was
        payload["inputs"] = json.dumps(layout.named, sort_keys=True, default=str)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- job 2: write (the executors run shard_jobs.write_partition) ---------------------------------


def _write_shards(
    pieces: DataFrame,
    uri: str,
    params: _Params,
    scan: _Scan,
    counts: dict[str, int],
) -> list[dict[str, Any]]:
    offsets: dict[int, list[int]] = {}
    running = [0, 0]
    for p in scan.partitions:
        offsets[p] = list(running)
        validation = scan.validation_rows[p]
        running = [running[0] + scan.rows[p] - validation, running[1] + validation]
    splits = ["train", "validation"][: len(counts)]
    rg_rows = [
        params.row_group_rows or default_row_group_rows(math.ceil(counts[s] / params.num_shards))
        for s in splits
    ]
    n = params.num_shards
    keys = partition_keys(n * len(splits))
    located = _locate(pieces, offsets, keys, n)
    one_task = scan.payload_bytes <= _ONE_WRITER_BYTES
    by_shard = located.coalesce(1) if one_task else located.repartition(len(keys), KEY)
    by_shard = by_shard.sortWithinPartitions(KEY, ROW)
    write = write_partition(uri, n, rg_rows, params.replicas, params.label_col, keys)
    spark = pieces.sparkSession
    side = spark_side(spark)
    side.describe("sparkdl materialize: write shards")
    with _pieces_per_batch(spark, max(1, _WRITE_BATCH_BYTES // max(1, scan.piece_bytes))):
        rows = by_shard.mapInArrow(write, _spark_schema(RECORDS_SCHEMA)).collect()
    side.describe(None)
    return [json.loads(r[0]) for r in rows]


def _locate(pieces: DataFrame, offsets: dict[int, list[int]], keys: list[int], n: int) -> Any:
    """The pieces with their shard's partition key (KEY) and first global row (ROW). A piece's
    ``key`` is split * n + (the index in the split, within its partition, of its first row) % n;
    its first global row is its partition's offset in the split + that index."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    by_partition = [offsets.get(p, [0, 0]) for p in range(max(offsets) + 1)]
    split = F.when(F.col("key") >= n, 1).otherwise(0)
    offset = F.element_at(
        F.when(split == 0, _literal_array([o[0] for o in by_partition])).otherwise(
            _literal_array([o[1] for o in by_partition])
        ),
        F.col("partition") + 1,
    )
    shard = split * n + F.pmod(offset + F.col("key") % n, F.lit(n))
    key = F.element_at(_literal_array(keys), (shard + 1).cast(T.IntegerType()))
    return pieces.filter(F.col("key") >= 0).select(
        key.cast(T.IntegerType()).alias(KEY),  # an int: partition_keys hashes ints
        (offset + F.col("start")).alias(ROW),
        "payload",
    )


def _literal_array(values: list[int]) -> Any:
    """A literal array<bigint> from one string literal: one expression however many values
    (a column expression per value costs the driver seconds for thousands of partitions)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    text = F.lit(",".join(str(v) for v in values))
    return F.split(text, ",").cast(T.ArrayType(T.LongType()))


@contextlib.contextmanager
def _pieces_per_batch(spark: Any, records: int) -> Iterator[None]:
    """Cap Arrow batches at ``records`` rows while job 2 runs (its rows are whole pieces) where
    Spark caps them by count only (before 4.0, without arrow.maxBytesPerBatch); the session's
    setting is restored after."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)
    capped = spark.conf.get("spark.sql.execution.arrow.maxBytesPerBatch", None) is not None
    if capped or 0 < int(before) <= records:
        yield
        return
    spark.conf.set(key, str(records))
    try:
        yield
    finally:
        spark.conf.set(key, before)


def _build_manifest(
    params: _Params,
    layout: Layout,
    counts: dict[str, int],
    records: list[dict[str, Any]],
    plan_hash: str,
    scan: _Scan,
) -> Manifest:
    by_key = {(r["split"], r["shard"]): r for r in records}
    shards: list[ShardEntry] = []
    shapes: list[tuple[int, ...]] = []
    for split, rows in counts.items():
        for index in range(params.num_shards):
            expected = rows // params.num_shards + (1 if index < rows % params.num_shards else 0)
            r = by_key.get((split, index))
            got = r["rows"] if r else 0
            if got != expected:
                raise DataError(
                    f"shard {index} of split {split!r} must have {expected} rows, got {got}. "
                    "The DataFrame changed between Spark jobs (non-deterministic source?); "
                    "checkpoint or cache it, then materialize again."
                )
            files = () if r is None else (FileEntry.from_json(r),)
            shards.append(ShardEntry(index=index, split=split, files=files))
    schema = next(r["schema"] for r in records)
    inputs: tuple[Any, ...] = ()
    if layout.named is not None:
        named, bases = layout.named, dict(layout.bases)
        planned, inputs = plan_named(named["feature_cols"], bases, scan.stats, named["options"])
        shapes = list(planned)
    for name, kind in layout.features if not inputs else ():
        shapes.append(() if kind == "scalar" else (max(scan.stats[name]["lengths"]),))
    return Manifest(
        feature_cols=params.feature_cols,
        feature_shapes=tuple(shapes),
        inputs=inputs,
        labels=stored_labels(layout, scan),
        weight_col=(layout.labels or {}).get("weight_col") or "",
        label_col=params.label_col,
        label_type=layout.label_type,
        num_shards=params.num_shards,
        splits=dict(counts),
        shards=tuple(shards),
        schema=tuple(schema),
        seed=params.seed,
        validation_fraction=params.validation_fraction,
        replicas=params.replicas,
        plan_hash=plan_hash,
    )
