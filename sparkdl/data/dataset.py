"""[any] A materialized dataset: the ShardedDataset handle, rank slices, open + verify, from_parquet.

Pure Python + pyarrow (never torch or pyspark), so the driver (``materialize``, the estimator)
and the workers share it; ``ShardedDataset.loader`` imports the loader, and with it torch, only
when a worker asks for one.

Row space. A split's rows form one global sequence: its shards in index order, each shard's
files in order. Rank ``r`` of ``world_size`` owns the contiguous slice ``rank_slice(N, W, r)``
(sizes ``floor(N/W)`` or ``ceil(N/W)``), so with ``num_shards == world_size`` rank ``r`` reads
exactly shard ``r``, and a run can resume with another world size.

Files are verified against the manifest's sha256 when first opened (once per dataset object);
a missing or corrupt file falls back to its next replica with a warning, and DataError names
the file when every replica fails.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sparkdl import storage
from sparkdl._checks import expect_int
from sparkdl.data.manifest import FileEntry, Manifest
from sparkdl.data.readers import check_reader
from sparkdl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sparkdl.data.loader import ShardLoader

__all__ = ["ShardedDataset", "rank_slice", "steps_for"]

log = logging.getLogger("sparkdl")


def rank_slice(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous slice; the first ``total % world_size`` get one more."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def steps_for(total: int, world_size: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches every rank yields per epoch for a split of ``total`` rows (the pyarrow reader;
    see :mod:`sparkdl.data.loader`)."""
    if drop_last:
        return (total // world_size) // batch_size
    return math.ceil(math.ceil(total / world_size) / batch_size)


class ShardedDataset:
    """A materialized dataset: its root ``path`` (local path or URI) and validated ``manifest``.

    Picklable (send it to workers); each process verifies a file's checksum once.
    """

    def __init__(self, path: str, manifest: Manifest) -> None:
        self._path = storage.normalize_uri(path)
        self._manifest = manifest
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._verified: set[tuple[str, str]] = set()
        self._fs: Any = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._path, "manifest": self._manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._path, self._manifest = state["path"], state["manifest"]
        self._init_runtime()

    @classmethod
    def load(cls, path: str) -> ShardedDataset:
        """Open the dataset at ``path``; DataError when its manifest is missing or inconsistent."""
        return cls(path, Manifest.load(path))

    def __repr__(self) -> str:
        m = self._manifest
        return (
            f"ShardedDataset({self._path!r}, rows={m.splits}, num_shards={m.num_shards}, "
            f"feature_dim={m.feature_dim})"
        )

    @property
    def path(self) -> str:
        return self._path

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def num_rows(self) -> int:
        """Rows of the train split."""
        return self._manifest.splits["train"]

    def num_rows_of(self, split: str = "train") -> int:
        return self._manifest.splits.get(split, 0)

    @property
    def feature_dim(self) -> int:
        return self._manifest.feature_dim

    @property
    def num_shards(self) -> int:
        return self._manifest.num_shards

    @property
    def label_is_integer(self) -> bool:
        return self._manifest.label_type == "int64"

    def steps_per_epoch(
        self, world_size: int, batch_size: int, split: str = "train", *, drop_last: bool = True
    ) -> int:
        """What ``len(self.loader(...))`` will be, from the manifest alone."""
        _check_positive("world_size", world_size)
        _check_positive("batch_size", batch_size)
        self._manifest.shards_of(split)  # DataError for an unknown split
        return steps_for(self._manifest.splits[split], world_size, batch_size, drop_last)

    @classmethod
    def from_parquet(
        cls,
        path: str,
        *,
        feature_cols: list[str],
        label_col: str,
        num_shards: int | None = None,
    ) -> ShardedDataset:
        """Open existing Parquet files (Spark's, petastorm's ``make_spark_converter`` cache) as
        a dataset: describes them (:func:`~sparkdl.data.manifest.describe_parquet`) and writes
        the manifest into ``path``, so workers can ``load`` it. A materialized sparkdl dataset
        there is refused: use :meth:`load`."""
        from sparkdl.data.manifest import PARQUET_PLAN_PREFIX, describe_parquet

        try:
            existing = Manifest.load(path)
        except DataError:
            existing = None
        if existing is not None and not existing.plan_hash.startswith(PARQUET_PLAN_PREFIX):
            raise ConfigError(
                f"path must hold plain Parquet files for from_parquet, got the sparkdl dataset "
                f"{path!r}. Open it with ShardedDataset.load(path)."
            )
        manifest = describe_parquet(
            path, feature_cols=list(feature_cols), label_col=label_col, num_shards=num_shards
        )
        manifest.save(path)
        return cls(path, manifest)

    def loader(
        self, rank: int, world_size: int, *, reader: str = "pyarrow", **kwargs: Any
    ) -> ShardLoader:
        """Rank ``rank``'s loader; keyword arguments are those of :class:`ShardLoader`.

        ``reader="petastorm"`` reads through ``petastorm.make_batch_reader`` instead of pyarrow
        (:mod:`sparkdl.data.petastorm`, imported only then; needs the compat environment).
        """
        check_reader(reader)
        # The loader needs torch, which this [any] module must not import: loaded when asked for.
        loader = importlib.import_module("sparkdl.data.loader")
        return loader.ShardLoader(self, rank, world_size, reader=reader, **kwargs)

    def open_file(self, entry: FileEntry, *, verify: bool = True) -> pq.ParquetFile:
        """Open ``entry`` (primary, then replicas), verifying its sha256 on first open.

        Raises DataError naming the file and each candidate's failure when none can be used.
        """
        if self._fs is None:
            self._fs, self._root = storage.resolve(self._path)
        failures: list[str] = []
        for candidate in entry.candidates:
            full = storage.join(self._root, candidate)
            try:
                if verify:
                    self._verify(entry, candidate, full)
                pf = pq.ParquetFile(storage.open_input(self._fs, full))
                if pf.metadata.num_rows != entry.rows:
                    raise _Mismatch(f"{pf.metadata.num_rows} rows, manifest says {entry.rows}")
            except (OSError, pa.ArrowException, _Mismatch) as e:
                failures.append(f"{candidate}: {type(e).__name__}: {e}")
                log.warning("sparkdl: cannot use %s (%s); trying the next replica", full, e)
                continue
            return pf
        raise DataError(
            f"file {entry.path!r} of dataset {self._path!r} must be readable with sha256 "
            f"{entry.sha256} and {entry.bytes} bytes, got a failure on every replica: "
            f"{'; '.join(failures)}. Re-run materialize with mode='overwrite'."
        )

    def _verify(self, entry: FileEntry, candidate: str, full: str) -> None:
        key = (candidate, entry.sha256)
        with self._lock:
            if key in self._verified:
                return
        sha, size = storage.sha256_of(self._fs, full)
        if size != entry.bytes or sha != entry.sha256:
            raise _Mismatch(
                f"checksum mismatch: sha256 {sha} and {size} bytes, "
                f"manifest says {entry.sha256} and {entry.bytes} bytes"
            )
        with self._lock:
            self._verified.add(key)


class _Mismatch(Exception):
    """A file exists but is not the one the manifest describes."""


def _check_positive(name: str, value: Any) -> None:
    expect_int(name, value, "Pass a positive int")


def _check_nonnegative(name: str, value: Any) -> None:
    expect_int(name, value, "Pass 0 or more", low=0)
