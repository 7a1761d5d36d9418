"""[any] The dataset manifest ``_sparkdl_manifest.json``: what a materialized dataset holds.

The manifest is written last and atomically by ``materialize``; a directory without it is
never taken as a complete dataset. It records the stored Arrow schema, the feature and label
columns, and for every split the ``num_shards`` shards with their files (path relative to the
dataset root, rows, row-group sizes, bytes, sha256, replica paths). Pure Python + pyarrow.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sparkdl import storage
from sparkdl._checks import expect_int
from sparkdl.data.input_specs import (
    InputSpec,
    describe_arrow_type,
    input_columns,
    is_named,
    plan_inputs,
    plan_labels,
    specs_from_json,
    specs_to_json,
)
from sparkdl.errors import DataError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SPLITS",
    "LABEL_TYPES",
    "FileEntry",
    "ShardEntry",
    "Manifest",
    "describe_file",
    "describe_parquet",
    "package_version",
    "write_dataset",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "_sparkdl_manifest.json"
SPLITS = ("train", "validation")
LABEL_TYPES = ("int64", "float32")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def package_version() -> str:
    """The installed sparkdl distribution's version, or ``"unknown"`` in a bare checkout."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("sparkdl-torch")
    except (ImportError, PackageNotFoundError):
        return "unknown"


@dataclass(frozen=True)
class FileEntry:
    """One Parquet file of a shard; ``replicas`` are other copies with the same bytes."""

    path: str
    rows: int
    bytes: int
    sha256: str
    row_groups: tuple[int, ...] = ()
    replicas: tuple[str, ...] = ()

    @property
    def candidates(self) -> tuple[str, ...]:
        """Primary path first, then the replicas: the order a reader tries them in."""
        return (self.path, *self.replicas)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileEntry:
        return cls(
            path=str(d["path"]),
            rows=int(d["rows"]),
            bytes=int(d["bytes"]),
            sha256=str(d["sha256"]),
            row_groups=tuple(int(x) for x in d.get("row_groups", ())),
            replicas=tuple(str(x) for x in d.get("replicas", ())),
        )


@dataclass(frozen=True)
class ShardEntry:
    """Shard ``index`` of ``split``: its files in row order (possibly none for an empty shard)."""

    index: int
    split: str
    files: tuple[FileEntry, ...] = ()

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardEntry:
        files = tuple(FileEntry.from_json(f) for f in d.get("files", ()))
        return cls(index=int(d["index"]), split=str(d["split"]), files=files)


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a materialized dataset; see the module docstring.

    ``feature_shapes[i]`` is ``[]`` for a scalar column and ``[k]`` for a length-``k`` array
    column (the longest row for a variable-length one); ``feature_dim`` is the width of the
    concatenated float32 feature vector. ``inputs``: the named inputs (model argument, columns,
    kind; see :mod:`sparkdl.data.input_specs`) when ``feature_cols`` was a dict, else empty.
    """

    feature_cols: tuple[str, ...]
    feature_shapes: tuple[tuple[int, ...], ...]
    label_col: str
    label_type: str
    num_shards: int
    splits: dict[str, int]
    shards: tuple[ShardEntry, ...]
    schema: tuple[dict[str, str], ...] = ()
    seed: int = 0
    validation_fraction: float = 0.0
    replicas: int = 1
    plan_hash: str = ""
    inputs: tuple[InputSpec, ...] = ()
    labels: tuple[InputSpec, ...] = ()
    """Every label column (``int``, ``float`` or ``array``) when ``label_col`` was a list or an
    array; empty for one numeric label (``label_col``/``label_type``)."""
    weight_col: str = ""
    """The sample-weight column (float32), or empty."""
    format_version: int = FORMAT_VERSION
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat()
    )
    sparkdl_version: str = field(default_factory=package_version)

    @property
    def label_cols(self) -> tuple[str, ...]:
        """Every label column, ``label_col`` first."""
        return tuple(s.columns[0] for s in self.labels) or (self.label_col,)

    @property
    def stored_cols(self) -> tuple[str, ...]:
        """Every column a reader needs: features, labels, the weight."""
        extra = (self.weight_col,) if self.weight_col else ()
        return tuple(dict.fromkeys((*self.feature_cols, *self.label_cols, *extra)))

    @property
    def arrow_batches(self) -> bool:
        """Whether rows stay Arrow until a batch is built (named inputs, several or array
        labels, weights); else the float32 matrix path."""
        return bool(self.inputs or self.labels or self.weight_col)

    @property
    def feature_dim(self) -> int:
        dim = 0
        for shape in self.feature_shapes:
            width = 1
            for s in shape:
                width *= s
            dim += width
        return dim

    def shards_of(self, split: str) -> list[ShardEntry]:
        """The shards of ``split`` in index order."""
        if split not in self.splits:
            raise DataError(
                f"split must be one of {sorted(self.splits)}, got {split!r}. "
                "Materialize with validation_fraction > 0 to get a 'validation' split."
            )
        return sorted((s for s in self.shards if s.split == split), key=lambda s: s.index)

    def files_of(self, split: str) -> list[FileEntry]:
        """The files of ``split`` in global row order (shard order, then file order)."""
        return [f for shard in self.shards_of(split) for f in shard.files]

    # --- serialisation -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_dim"] = self.feature_dim
        d["feature_shapes"] = [list(s) for s in self.feature_shapes]
        for key in ("inputs", "labels"):  # absent when empty: read as before issue 15
            values = getattr(self, key)
            if values:
                d[key] = specs_to_json(values)
            else:
                d.pop(key)
        if not self.weight_col:
            d.pop("weight_col")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        try:
            return cls(
                feature_cols=tuple(d["feature_cols"]),
                feature_shapes=tuple(tuple(int(x) for x in s) for s in d["feature_shapes"]),
                label_col=str(d["label_col"]),
                label_type=str(d["label_type"]),
                num_shards=int(d["num_shards"]),
                splits={str(k): int(v) for k, v in d["splits"].items()},
                shards=tuple(ShardEntry.from_json(s) for s in d["shards"]),
                schema=tuple(dict(x) for x in d.get("schema", ())),
                seed=int(d.get("seed", 0)),
                validation_fraction=float(d.get("validation_fraction", 0.0)),
                replicas=int(d.get("replicas", 1)),
                plan_hash=str(d.get("plan_hash", "")),
                inputs=specs_from_json(d.get("inputs")),
                labels=specs_from_json(d.get("labels")),
                weight_col=str(d.get("weight_col", "")),
                format_version=int(d["format_version"]),
                created=str(d.get("created", "")),
                sparkdl_version=str(d.get("sparkdl_version", "unknown")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(
                f"manifest must hold every required field, got a malformed one ({e!r}). "
                "Re-run materialize with mode='overwrite'."
            ) from e

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> Manifest:
        """Read and validate the manifest of the dataset rooted at ``path`` (a local path or URI).

        Raises DataError when it is missing (the dataset was never completed) or inconsistent.
        """
        fs, root = storage.resolve(path)
        target = storage.join(root, MANIFEST_NAME)
        try:
            raw = storage.read_bytes(fs, target)
        except (FileNotFoundError, OSError) as e:
            raise DataError(
                f"dataset at {path!r} must have a {MANIFEST_NAME}, got none ({e}). It was "
                "never completed (materialize interrupted?) or is not a sparkdl dataset; "
                "re-run materialize with mode='overwrite'."
            ) from e
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise DataError(
                f"{MANIFEST_NAME} at {path!r} must be valid JSON, got {e}. "
                "Re-run materialize with mode='overwrite'."
            ) from e
        manifest = cls.from_json(data)
        manifest.validate()
        return manifest

    def save(self, path: str) -> None:
        """Validate, then write the manifest into dataset root ``path`` atomically (temp + rename)."""
        self.validate()
        fs, root = storage.resolve(path)
        storage.write_bytes_atomic(fs, storage.join(root, MANIFEST_NAME), self.dumps().encode())

    def with_shards(self, shards: list[ShardEntry]) -> Manifest:
        return replace(self, shards=tuple(shards))

    # --- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise DataError on any internal inconsistency (rows, shards, files, types)."""
        _check(
            self.format_version == FORMAT_VERSION,
            "format_version",
            f"{FORMAT_VERSION}",
            self.format_version,
            "Re-materialize the dataset with this sparkdl version.",
        )
        _check(len(self.feature_cols) > 0, "feature_cols", "non-empty", list(self.feature_cols))
        _check(
            len(self.feature_shapes) == len(self.feature_cols),
            "feature_shapes",
            f"one shape per feature column ({len(self.feature_cols)})",
            [list(s) for s in self.feature_shapes],
        )
        _check(
            all(len(s) <= 1 and all(x >= 1 for x in s) for s in self.feature_shapes),
            "feature_shapes",
            "[] or [k] with k >= 1",
            [list(s) for s in self.feature_shapes],
        )
        _check(
            self.label_type in LABEL_TYPES, "label_type", f"one of {LABEL_TYPES}", self.label_type
        )
        _check(self.num_shards >= 1, "num_shards", ">= 1", self.num_shards)
        _check(
            set(self.splits) <= set(SPLITS) and "train" in self.splits,
            "splits",
            f"a subset of {SPLITS} containing 'train'",
            sorted(self.splits),
        )
        for split, rows in self.splits.items():
            self._validate_split(split, rows)

    def _validate_split(self, split: str, rows: int) -> None:
        shards = self.shards_of(split)
        _check(
            [s.index for s in shards] == list(range(self.num_shards)),
            f"shards of split {split!r}",
            f"indices 0..{self.num_shards - 1} exactly once",
            [s.index for s in shards],
        )
        _check(
            sum(s.rows for s in shards) == rows,
            f"splits[{split!r}]",
            "the sum of its shards' rows",
            f"{rows} vs {sum(s.rows for s in shards)}",
        )
        for shard in shards:
            for f in shard.files:
                _validate_file(f)


def _validate_file(f: FileEntry) -> None:
    for p in f.candidates:
        _check(
            bool(p) and not p.startswith("/") and "://" not in p and ".." not in p.split("/"),
            "file path",
            "relative to the dataset root",
            p,
        )
    _check(f.rows >= 0 and f.bytes >= 0, f"rows/bytes of {f.path}", ">= 0", (f.rows, f.bytes))
    _check(bool(_SHA_RE.match(f.sha256)), f"sha256 of {f.path}", "64 hex digits", f.sha256)
    _check(
        sum(f.row_groups) == f.rows,
        f"row_groups of {f.path}",
        f"sizes summing to its rows ({f.rows})",
        list(f.row_groups),
    )


def _check(ok: bool, what: str, constraint: str, got: Any, fix: str = "") -> None:
    if not ok:
        fix = fix or "The manifest is inconsistent; re-run materialize with mode='overwrite'."
        raise DataError(f"manifest {what} must be {constraint}, got {got}. {fix}")


def describe_file(
    root: str, relpath: str, replicas: tuple[str, ...] = (), fs: Any = None
) -> FileEntry:
    """A FileEntry for an existing Parquet file ``root/relpath``: rows, row groups, bytes, sha256.

    ``root`` is a filesystem-local path when ``fs`` is given, else a local path or URI.
    """
    import pyarrow.parquet as pq

    if fs is None:
        fs, root = storage.resolve(root)
    full = storage.join(root, relpath)
    sha, size = storage.sha256_of(fs, full)
    with storage.open_input(fs, full) as f:
        meta = pq.ParquetFile(f).metadata
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return FileEntry(
        path=relpath,
        rows=sum(groups),
        bytes=size,
        sha256=sha,
        row_groups=groups,
        replicas=tuple(replicas),
    )


def write_dataset(
    path: str,
    shards: list[Any],
    *,
    feature_cols: Any,
    label_col: str | list[str],
    validation_shards: list[Any] | None = None,
    row_group_rows: int | None = None,
    replicas: int = 1,
    seed: int = 0,
    sample_weight_col: str | None = None,
    **input_options: Any,
) -> Manifest:
    """Write pyarrow Tables as a dataset without Spark (tests, small local data); return its manifest.

    ``shards[i]`` becomes train shard ``i`` (an empty table → an empty shard with no file);
    ``validation_shards``, when given, must have as many entries. ``feature_cols``: a list of
    numeric or fixed-length list columns, or a dict of named inputs (see
    :mod:`sparkdl.data.input_specs`; ``input_options``: its ``feature_shapes``,
    ``max_lengths``, ``pad_values``); the label integer or floating point, or a list of labels
    (or one fixed-length array label, see :func:`~sparkdl.data.input_specs.plan_labels`);
    ``sample_weight_col`` a numeric column of row weights. The manifest is written last. Use ``ShardedDataset.load(path)`` to read it.
    """
    import pyarrow.parquet as pq

    fs, root = storage.resolve(path)
    splits = {"train": list(shards)}
    if validation_shards is not None:
        splits["validation"] = list(validation_shards)
    entries: list[ShardEntry] = []
    for split, tables in splits.items():
        for index, table in enumerate(tables):
            files: tuple[FileEntry, ...] = ()
            if table.num_rows:
                rel = f"{split}/shard-{index:05d}.parquet"
                with storage.open_output(fs, storage.join(root, rel)) as sink:
                    pq.write_table(table, sink, row_group_size=row_group_rows or table.num_rows)
                copies = tuple(f"_replicas/{k}/{rel}" for k in range(1, replicas))
                for copy in copies:
                    storage.copy_file(fs, storage.join(root, rel), storage.join(root, copy))
                files = (describe_file(root, rel, copies, fs=fs),)
            entries.append(ShardEntry(index=index, split=split, files=files))
    sample = next(t for t in shards if t.num_rows)
    all_tables = [t for tables in splits.values() for t in tables]
    columns, shapes, inputs = _feature_fields(feature_cols, all_tables, input_options)
    label_cols = [label_col] if isinstance(label_col, str) else list(label_col)
    labels = _label_fields(label_cols, all_tables)
    first = labels[0].dtype if labels else str(sample.schema.field(label_cols[0]).type)
    manifest = Manifest(
        feature_cols=columns,
        feature_shapes=shapes,
        inputs=inputs,
        labels=labels,
        weight_col=sample_weight_col or "",
        label_col=label_cols[0],
        label_type="int64" if first == "int64" or first.startswith(("int", "uint")) else "float32",
        num_shards=len(shards),
        splits={split: sum(t.num_rows for t in tables) for split, tables in splits.items()},
        shards=tuple(entries),
        schema=tuple({"name": f.name, "type": str(f.type)} for f in sample.schema),
        seed=seed,
        replicas=replicas,
    )
    manifest.save(path)
    return manifest


def _label_fields(label_cols: list[str], tables: list[Any]) -> tuple[InputSpec, ...]:
    """The labels' specs when there are several or an array one; () for one numeric label."""
    schema = tables[0].schema
    bases = {c: describe_arrow_type(schema.field(c).type) for c in label_cols}
    if len(label_cols) == 1 and bases[label_cols[0]] in ("int", "float"):
        return ()
    return plan_labels(label_cols, bases, _list_lengths(bases, tables))


def _list_lengths(bases: dict[str, str], tables: list[Any]) -> dict[str, tuple[int, int]]:
    """(shortest, longest) row of every list column among ``bases``, over ``tables``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths: dict[str, tuple[int, int]] = {}
    for c, base in bases.items():
        if base.startswith("list_"):
            found = [pc.list_value_length(t.column(c)) for t in tables if t.num_rows]
            chunks = [x.cast(pa.int64()) for f in found for x in f.chunks]
            bounds = pc.min_max(pa.chunked_array(chunks, pa.int64()))
            lengths[c] = (bounds["min"].as_py() or 0, bounds["max"].as_py() or 0)
    return lengths


def _feature_fields(
    feature_cols: Any, tables: list[Any], options: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], tuple[InputSpec, ...]]:
    """(columns, their shapes, named inputs) of ``feature_cols`` over the rows of ``tables``."""

    if not is_named(feature_cols):
        sample = next(t for t in tables if t.num_rows)
        return tuple(feature_cols), tuple(_shape_of(sample, c) for c in feature_cols), ()
    columns = input_columns(feature_cols)
    schema = tables[0].schema
    bases = {c: describe_arrow_type(schema.field(c).type) for c in columns}
    lengths = _list_lengths(bases, tables)
    inputs = plan_inputs(feature_cols, bases, lengths, **options)
    shapes = tuple((max(1, lengths[c][1]),) if c in lengths else () for c in columns)
    return tuple(columns), shapes, inputs


PARQUET_PLAN_PREFIX = "parquet:"


def describe_parquet(
    path: str, *, feature_cols: list[str], label_col: str, num_shards: int | None = None
) -> Manifest:
    """A manifest for existing Parquet files under ``path`` (e.g. written by Spark or petastorm).

    Every non-hidden file below ``path`` (names starting with ``_`` or ``.`` are skipped, as
    Spark does) is described in sorted path order as one "train" split; empty files are left
    out. Files are grouped in order into ``num_shards`` shards by their first row (default:
    one shard per non-empty file). Feature columns must be numeric or fixed-length numeric
    arrays, the label integer or floating point; shapes come from the first row group.
    """
    import pyarrow.fs as pafs

    if num_shards is not None:
        expect_int("num_shards", num_shards, "Pass e.g. 2, or None for one shard per file")
    fs, root = storage.resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    rels = sorted(
        rel
        for rel in (i.path[len(root.rstrip("/")) + 1 :] for i in infos if i.is_file)
        if not any(part.startswith(("_", ".")) for part in rel.split("/"))
    )
    files = [f for f in (_describe_parquet_file(fs, root, rel) for rel in rels) if f.rows]
    if not files:
        raise DataError(
            f"path must hold Parquet files with rows, got none under {path!r}. "
            "Point at the directory the DataFrame (or petastorm converter) wrote."
        )
    sample = _first_row_group(fs, root, files[0].path)
    for column in [*feature_cols, label_col]:
        if column not in sample.column_names:
            raise DataError(
                f"column {column!r} must be in the Parquet files, got columns "
                f"{sample.column_names}. Pass existing feature_cols/label_col."
            )
    shapes = tuple(_feature_shape(sample, c) for c in feature_cols)
    label_type = sample.schema.field(label_col).type
    if not (_is_integer(label_type) or _is_floating(label_type)):
        raise DataError(f"label column {label_col!r} must be numeric, got {label_type}.")
    n = num_shards or len(files)
    total, offset = sum(f.rows for f in files), 0
    groups: list[list[FileEntry]] = [[] for _ in range(n)]
    for f in files:
        groups[min(n - 1, offset * n // total)].append(f)
        offset += f.rows
    digest = hashlib.sha256("".join(f.sha256 for f in files).encode()).hexdigest()
    return Manifest(
        feature_cols=tuple(feature_cols),
        feature_shapes=shapes,
        label_col=label_col,
        label_type="int64" if _is_integer(label_type) else "float32",
        num_shards=n,
        splits={"train": total},
        shards=tuple(
            ShardEntry(index=i, split="train", files=tuple(g)) for i, g in enumerate(groups)
        ),
        schema=tuple({"name": f.name, "type": str(f.type)} for f in sample.schema),
        plan_hash=PARQUET_PLAN_PREFIX + digest,
    )


def _describe_parquet_file(fs: Any, root: str, rel: str) -> FileEntry:
    try:
        return describe_file(root, rel, fs=fs)
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for a file that is not Parquet
        raise DataError(
            f"file {rel!r} under {root!r} must be a Parquet file, got {type(e).__name__}: {e}. "
            "Remove it or point at a directory of Parquet files only."
        ) from e


def _first_row_group(fs: Any, root: str, rel: str) -> Any:
    import pyarrow.parquet as pq

    with storage.open_input(fs, storage.join(root, rel)) as f:
        return pq.ParquetFile(f).read_row_group(0)


def _feature_shape(table: Any, column: str) -> tuple[int, ...]:
    arrow_type = table.schema.field(column).type
    value_type = arrow_type.value_type if hasattr(arrow_type, "value_type") else arrow_type
    if not (_is_integer(value_type) or _is_floating(value_type)):
        raise DataError(
            f"feature column {column!r} must be numeric or an array of numbers, got {arrow_type}. "
            "Convert it (e.g. vector_to_array) before writing."
        )
    return _shape_of(table, column)


def _is_floating(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(arrow_type)


def _is_integer(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(arrow_type)


def _shape_of(table: Any, column: str) -> tuple[int, ...]:
    import pyarrow as pa
    import pyarrow.compute as pc

    arrow_type = table.schema.field(column).type
    if pa.types.is_fixed_size_list(arrow_type):
        return (arrow_type.list_size,)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        lengths = pc.unique(pc.list_value_length(table.column(column))).to_pylist()
        if len(lengths) != 1:
            raise DataError(
                f"array column {column!r} must have one length in every row, got {lengths}. "
                "Pad or truncate it to a fixed length."
            )
        return (int(lengths[0]),)
    return ()
