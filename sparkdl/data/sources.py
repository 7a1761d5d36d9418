"""[worker] Where a loader's rows come from: the RowSource protocol and the pyarrow source.

A source reads one rank's rows of one split and hands them to :class:`~sparkdl.data.loader.ShardLoader`
as decoded chunks ``(features float32 [n, feature_dim], label [n])``; the loader owns everything
after that (equal steps, the shuffle buffer, batches, resume, prefetch). Sources are chosen by
name (:mod:`sparkdl.data.readers`): :class:`PyArrowSource` here, ``PetastormSource`` in
:mod:`sparkdl.data.petastorm`. Pure pyarrow + numpy (no torch, no pyspark).

PyArrowSource: rank ``r`` reads its contiguous slice ``rank_slice(N, W, r)`` as row-group pieces
(:func:`plan_pieces`), visited in a permuted order when shuffling, each read one ahead in a
helper thread and decoded column-wise (:func:`decode_table`, no per-row Python).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparkdl.data.dataset import ShardedDataset, rank_slice
from sparkdl.data.manifest import FileEntry, Manifest
from sparkdl.errors import DataError

__all__ = ["Chunk", "RowSource", "PyArrowSource", "decode_table", "plan_pieces"]

Chunk = tuple[Any, np.ndarray]
"""Decoded rows: (float32 features ``[n, feature_dim]``, label ``[n]``); with named inputs the
features are the rows' columns as a ``pyarrow.Table`` (built into tensors per batch) and the
label a placeholder (see ``Manifest.arrow_batches``)."""


class RowSource(Protocol):
    """One rank's rows of one split, read for the loader one epoch at a time.

    Built as ``cls(dataset, rank, world_size, split=..., verify_checksums=..., **reader_options)``.
    """

    rank_rows: Sequence[int]
    """Rows each rank reads per epoch (index: rank): the loader derives equal steps from them."""

    def chunks(self, rng: np.random.Generator, shuffle: bool) -> Iterator[Chunk]:
        """This rank's rows for one epoch, in read order (permuted with ``rng`` when ``shuffle``).

        ``rng`` is the epoch's generator, seeded by ``(seed, epoch, rank)``: the source draws from
        it when iteration starts, the loader's shuffle buffer after. Closing the iterator
        releases the files and threads it holds.
        """
        ...


@dataclass(frozen=True)
class _Piece:
    """Rows ``[lo, hi)`` of row group ``row_group`` of file ``file_index`` (in the split's files);
    with ``take``, only those rows of the row group, in that order (a resumed epoch's remainder,
    see :mod:`sparkdl.data.remainder`)."""

    file_index: int
    row_group: int
    lo: int
    hi: int
    take: np.ndarray | None = field(default=None, compare=False)


def plan_pieces(files: list[FileEntry], start: int, stop: int) -> list[_Piece]:
    """The row-group pieces covering global rows ``[start, stop)``, in global order."""
    pieces: list[_Piece] = []
    offset = 0
    for fi, f in enumerate(files):
        for gi, n in enumerate(f.row_groups):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                pieces.append(_Piece(fi, gi, lo - offset, hi - offset))
            offset += n
            if offset >= stop:
                return pieces
    return pieces


class PyArrowSource:
    """``reader="pyarrow"``: the rank's slice of the split, read with ``pyarrow.parquet``."""

    def __init__(
        self,
        dataset: ShardedDataset,
        rank: int,
        world_size: int,
        *,
        split: str = "train",
        verify_checksums: bool = True,
    ) -> None:
        self._dataset = dataset
        self.verify_checksums = verify_checksums
        self._files = dataset.manifest.files_of(split)
        total = dataset.manifest.splits[split]
        self._start, self._stop = rank_slice(total, world_size, rank)
        slices = (rank_slice(total, world_size, r) for r in range(world_size))
        self.rank_rows = [stop - start for start, stop in slices]

    def chunks(self, rng: np.random.Generator, shuffle: bool) -> Iterator[Chunk]:
        pieces = plan_pieces(self._files, self._start, self._stop)
        if shuffle:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        yield from self._read(pieces)

    def _read(self, pieces: list[_Piece]) -> Iterator[Chunk]:
        """The pieces decoded in order; closing the iterator closes the files."""
        handles: dict[int, pq.ParquetFile] = {}
        try:
            yield from self._read_ahead(pieces, handles)
        finally:
            for pf in handles.values():
                close = getattr(pf, "close", None)  # ParquetFile.close: pyarrow >= 8
                if close is not None:
                    close()

    def _read_ahead(
        self, pieces: list[_Piece], handles: dict[int, pq.ParquetFile]
    ) -> Iterator[Chunk]:
        """Decoded pieces in order; the next one is read in a helper thread (pyarrow and numpy
        release the GIL) while the caller shuffles and batches the current one."""
        if len(pieces) < 2:
            yield from (self._read_piece(p, handles) for p in pieces)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="sparkdl-read") as pool:
            future = pool.submit(self._read_piece, pieces[0], handles)
            for piece in pieces[1:]:
                current = future.result()
                future = pool.submit(self._read_piece, piece, handles)
                yield current
            yield future.result()

    def _read_piece(self, piece: _Piece, handles: dict[int, pq.ParquetFile]) -> Chunk:
        pf = handles.get(piece.file_index)
        if pf is None:
            entry = self._files[piece.file_index]
            pf = self._dataset.open_file(entry, verify=self.verify_checksums)
            handles[piece.file_index] = pf
        m = self._dataset.manifest
        table = pf.read_row_groups([piece.row_group], columns=list(m.stored_cols), use_threads=True)
        if piece.take is not None:
            table = table.take(pa.array(piece.take))
        elif piece.lo or piece.hi < table.num_rows:
            table = table.slice(piece.lo, piece.hi - piece.lo)
        return decode_table(table, m)


def decode_table(table: pa.Table, manifest: Manifest) -> Chunk:
    """Column-wise Arrow → (float32 features ``[n, feature_dim]``, label ``[n]``), no per-row
    Python; with named inputs (``manifest.inputs``), (the input columns' table, label)."""
    n = table.num_rows
    cols, shapes = manifest.feature_cols, manifest.feature_shapes
    label_dtype = np.int64 if manifest.label_type == "int64" else np.float32
    if manifest.arrow_batches:  # the columns stay Arrow until a batch is built
        return table.select(list(manifest.stored_cols)), np.zeros(n, dtype=np.int8)
    if len(cols) == 1:
        features = _column_values(table, cols[0], n, shapes[0]).reshape(n, manifest.feature_dim)
    else:
        # Stack column-major (contiguous copies), then one blocked transpose: ~4x faster than
        # writing each column into a row-major array with a stride.
        blocks = []
        for col, shape in zip(cols, shapes):
            values = _column_values(table, col, n, shape)
            blocks.append(values.reshape(1, n) if not shape else values.reshape(n, shape[0]).T)
        features = np.ascontiguousarray(np.concatenate(blocks, axis=0).T)
    label = _column_values(table, manifest.label_col, n, (), label_dtype)
    return features, label


def _column_values(
    table: pa.Table, name: str, n: int, shape: tuple[int, ...], dtype: Any = np.float32
) -> np.ndarray:
    column = table.column(name)
    chunks = column.chunks
    if not chunks:
        arr = pa.array([], type=column.type)
    else:
        arr = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
    if arr.null_count:
        raise DataError(
            f"column {name!r} must have no nulls, got {arr.null_count}. Re-materialize the data."
        )
    if (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or pa.types.is_fixed_size_list(arr.type)
    ):
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    width = shape[0] if shape else 1
    if values.size != n * width:
        raise DataError(
            f"column {name!r} must hold {width} value(s) per row, got {values.size} values for "
            f"{n} rows. Re-materialize the dataset with mode='overwrite'."
        )
    return values
