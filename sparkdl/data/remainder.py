"""[worker] Exact data accounting across a size change: the rest of an interrupted epoch.

A checkpoint taken inside an epoch holds the loader's position: every rank had consumed the
same ``batches_consumed`` batches of ``batch_size`` rows (equal steps). Resumed with the same
world size and batch size, each rank simply skips those batches. Resumed with another, the rest
of the epoch is planned here so that each row of the epoch is trained on exactly once:

1. Replay, index-only, the epoch order of every old rank (deterministic from seed, epoch, rank,
   its slice, the shuffle settings and batch size): the same piece plan and the same shuffle
   buffer (:func:`~sparkdl.data.buffer.buffered`, fed row ids instead of decoded rows) make the
   same ``rng`` calls on the same chunk sizes, which come from the manifest's row groups, so no
   data is read. Its first ``batches_consumed × batch_size`` rows were trained on.
2. The pool is every row of the split not trained on yet in this epoch (each old rank's
   unconsumed rows and the rows its ``drop_last`` would have skipped), in a deterministic order:
   file order without shuffle; with shuffle, grouped by row group, the groups permuted with a
   generator seeded by ``(seed, epoch, level)``.
3. New rank ``k`` of ``W`` takes the ``k``-th contiguous run of ``S × b`` rows of the pool,
   ``S = floor(pool / (W × b))`` (equal steps); the last ``pool − W × S × b < W × b`` rows are
   this epoch's ``drop_last`` remainder. (``drop_last=False``: the pool's ``rank_slice``, padded
   like a normal epoch.) It reads exactly its rows by row id, grouped by row group (one read per
   row group it touches, through :meth:`ShardedDataset.open_file`, so checksums and replicas
   apply), the groups visited in a permuted order and the rows shuffled in the usual bounded
   buffer, seeded by ``(seed, epoch, rank, level)``.

A second size change inside the same epoch replays the chain: each segment (world size, batch
size, batches consumed, shuffle buffer rows) in turn marks its consumed rows, and the pool of
the next level is what is left. The loader stores the chain in its ``state_dict`` (``resize``).

Horovod's ``ElasticSampler`` (``horovod.torch.elastic.sampler``: the processed indices are
removed and the remaining ones re-split over the new ranks on reset) and Mosaic Streaming's
``StreamingDataset`` (a sample counter in its state dict, from which a resumed run at another
world size deterministically re-partitions the samples not yet seen) do the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparkdl.data.buffer import buffered, equal_steps
from sparkdl.data.dataset import ShardedDataset, rank_slice
from sparkdl.data.manifest import FileEntry
from sparkdl.data.sources import Chunk, PyArrowSource, _Piece, plan_pieces

__all__ = ["Remainder", "RemainderSource", "Segment", "Share", "plan_remainder"]

_POOL_TAG = 0x5EED9001
"""Seeds the pool's order (nonzero, so it never equals a plain (seed, epoch, rank) stream)."""
_RANK_TAG = 0x5EED9002


@dataclass(frozen=True)
class Segment:
    """One stretch of an epoch at one size: each of ``world_size`` ranks consumed ``consumed``
    batches of ``batch_size`` rows, through a shuffle buffer of ``buffer_rows`` rows."""

    world_size: int
    batch_size: int
    consumed: int
    buffer_rows: int

    def to_list(self) -> list[int]:
        return [self.world_size, self.batch_size, self.consumed, self.buffer_rows]


@dataclass(frozen=True)
class Share:
    """One new rank's part of the remainder: its row ids (the pool's order), the batches it
    yields and the rows they hold (its ids, padded to ``budget`` with drop_last=False)."""

    ids: np.ndarray
    steps: int
    budget: int


@dataclass(frozen=True)
class Remainder:
    """A loader's plan for the rest of ``epoch`` after ``segments``: this rank's ``share``.

    ``start`` is where the loader's ``batches_consumed`` begins in this plan (``len(loader)``
    minus the plan's batches), so a loop that counts up to ``len(loader)`` ends with it.
    """

    epoch: int
    segments: tuple[Segment, ...]
    share: Share
    start: int

    @property
    def level(self) -> int:
        return len(self.segments)

    def to_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "segments": [s.to_list() for s in self.segments],
            "start": self.start,
        }


class _Layout:
    """The split's row groups in row-space order: global row id ↔ (file, row group, row)."""

    def __init__(self, files: Sequence[FileEntry], total: int) -> None:
        self.files = list(files)
        self.groups = [(fi, gi) for fi, f in enumerate(files) for gi in range(len(f.row_groups))]
        sizes = [n for f in files for n in f.row_groups]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self._index = {g: k for k, g in enumerate(self.groups)}
        self.total = total

    def piece_ids(self, piece: _Piece) -> np.ndarray:
        """The global row ids a piece reads, in its order."""
        start = self.starts[self._index[(piece.file_index, piece.row_group)]]
        if piece.take is not None:
            return start + piece.take
        return np.arange(start + piece.lo, start + piece.hi, dtype=np.int64)

    def group_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, ids, side="right") - 1

    def pieces_of(self, ids: np.ndarray) -> list[_Piece]:
        """``ids`` (sorted) as one piece per row group they touch, in row-space order."""
        if not len(ids):
            return []
        groups = self.group_of(ids)
        cuts = np.flatnonzero(np.diff(groups)) + 1
        pieces = []
        for part in np.split(np.arange(len(ids)), cuts):
            k = int(groups[part[0]])
            local = ids[part] - self.starts[k]
            fi, gi = self.groups[k]
            pieces.append(_Piece(fi, gi, int(local[0]), int(local[-1]) + 1, take=local))
        return pieces


def _share_pieces(
    layout: _Layout, share: Share, rng: np.random.Generator, shuffle: bool
) -> list[_Piece]:
    """A new rank's read plan: its rows by row group, the groups permuted when shuffling."""
    pieces = layout.pieces_of(np.sort(share.ids))
    if shuffle:
        pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    return pieces


def share_rng(seed: int, epoch: int, rank: int, level: int) -> np.random.Generator:
    """The generator of rank ``rank``'s share at ``level`` (pieces, then shuffle buffer)."""
    return np.random.default_rng([seed, epoch, rank, level, _RANK_TAG])


class RemainderSource(PyArrowSource):
    """The pyarrow source of one new rank's share: exactly its rows, read by row group."""

    def __init__(
        self, dataset: ShardedDataset, split: str, share: Share, *, verify_checksums: bool
    ) -> None:
        self._dataset = dataset
        self.verify_checksums = verify_checksums
        self._files = dataset.manifest.files_of(split)
        self._layout = _Layout(self._files, dataset.manifest.splits[split])
        self._share = share
        self.rank_rows = [len(share.ids)]

    def chunks(self, rng: np.random.Generator, shuffle: bool) -> Iterator[Chunk]:
        yield from self._read(_share_pieces(self._layout, self._share, rng, shuffle))


def _replay(
    pieces: list[_Piece],
    layout: _Layout,
    rng: np.random.Generator,
    capacity: int,
    batch_size: int,
    budget: int,
    shuffle: bool,
) -> np.ndarray:
    """The row ids a rank yields, in order, from its read plan: the loader's shuffle buffer fed
    ids instead of rows (same chunk sizes, same ``rng`` calls)."""
    chunks = [(ids, ids) for ids in map(layout.piece_ids, pieces)]
    out = [y for _, y in buffered(chunks, rng, capacity, batch_size, budget, shuffle)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _first_order(
    layout: _Layout, seed: int, epoch: int, seg: Segment, rank: int, shuffle: bool, drop_last: bool
) -> np.ndarray:
    """Rank ``rank``'s row ids in a normal epoch at ``seg``'s size (see PyArrowSource.chunks
    and ShardLoader._rows)."""
    rng = np.random.default_rng([seed, epoch, rank])
    rows = [
        hi - lo
        for lo, hi in (rank_slice(layout.total, seg.world_size, r) for r in range(seg.world_size))
    ]
    _, budget = equal_steps(rows, seg.batch_size, drop_last)
    if not drop_last and rows[rank] == 0:
        budget = 0
    start, stop = rank_slice(layout.total, seg.world_size, rank)
    pieces = plan_pieces(layout.files, start, stop)
    if shuffle:
        pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    capacity = seg.buffer_rows if shuffle else seg.batch_size
    return _replay(pieces, layout, rng, capacity, seg.batch_size, budget, shuffle)


def _pool(
    layout: _Layout, seen: np.ndarray, seed: int, epoch: int, level: int, shuffle: bool
) -> np.ndarray:
    """The rows not trained on yet: file order, or by row group in a seeded order."""
    ids = np.flatnonzero(~seen).astype(np.int64)
    if not shuffle or not len(ids):
        return ids
    groups = layout.group_of(ids)
    present = np.unique(groups)
    rng = np.random.default_rng([seed, epoch, level, _POOL_TAG])
    position = np.zeros(len(layout.groups), dtype=np.int64)
    position[present[rng.permutation(len(present))]] = np.arange(len(present))
    return ids[np.argsort(position[groups], kind="stable")]


def _shares(pool: np.ndarray, world_size: int, batch_size: int, drop_last: bool) -> list[Share]:
    """The pool split over ``world_size`` ranks with equal steps (see the module docstring)."""
    if drop_last:
        steps = len(pool) // (world_size * batch_size)
        n = steps * batch_size
        return [Share(pool[k * n : (k + 1) * n], steps, n) for k in range(world_size)]
    budget = -(-len(pool) // world_size)
    steps = -(-budget // batch_size)
    shares = []
    for k in range(world_size):
        lo, hi = rank_slice(len(pool), world_size, k)
        empty = hi == lo  # no row to repeat: no batch (as a normal epoch's empty rank)
        shares.append(Share(pool[lo:hi], 0 if empty else steps, 0 if empty else budget))
    return shares


def plan_remainder(
    dataset: ShardedDataset,
    split: str,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_last: bool,
    segments: Sequence[Segment],
    world_size: int,
    batch_size: int,
) -> list[Share]:
    """Every new rank's share of ``epoch``'s rows left after ``segments`` (at least one), at
    ``world_size`` ranks of ``batch_size`` rows."""
    m = dataset.manifest
    layout = _Layout(m.files_of(split), m.splits[split])
    seen = np.zeros(layout.total, dtype=bool)
    sizes = [(s.world_size, s.batch_size) for s in segments[1:]] + [(world_size, batch_size)]
    shares: list[Share] = []
    for level, seg in enumerate(segments):
        for r in range(seg.world_size):
            if level == 0:
                order = _first_order(layout, seed, epoch, seg, r, shuffle, drop_last)
            else:
                share = shares[r]
                rng = share_rng(seed, epoch, r, level)
                pieces = _share_pieces(layout, share, rng, shuffle)
                capacity = seg.buffer_rows if shuffle else seg.batch_size
                order = _replay(
                    pieces, layout, rng, capacity, seg.batch_size, share.budget, shuffle
                )
            seen[order[: seg.consumed * seg.batch_size]] = True
        pool = _pool(layout, seen, seed, epoch, level + 1, shuffle)
        shares = _shares(pool, *sizes[level], drop_last)
    return shares
