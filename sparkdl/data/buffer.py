"""[worker] The seeded shuffle buffer: decoded chunks → (shuffled) buffers of whole batches.

Shared by :class:`~sparkdl.data.loader.ShardLoader`, which feeds it decoded rows, and
:mod:`sparkdl.data.remainder`, which feeds it row ids only to replay a rank's epoch order
without reading any data: both make the same ``rng`` calls on the same chunk sizes, so the
replayed ids are the rows the loader yielded, in its order. Pure numpy + pyarrow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["buffered", "equal_steps", "mix"]


def buffered(
    chunks: Iterable[tuple[Any, np.ndarray]],
    rng: np.random.Generator,
    capacity: int,
    batch_size: int,
    budget: int,
    shuffle: bool,
) -> Iterator[tuple[Any, np.ndarray]]:
    """Chunks gathered into (shuffled) buffers of whole batches, then the rest padded up to
    ``budget`` rows (drop_last=False) by repeating the first row: every buffer's length is a
    multiple of ``batch_size`` except the last one's, and they hold ``budget`` rows in all (or
    fewer when the chunks hold fewer and there is no first row to repeat)."""
    b = batch_size
    feats: list[Any] = []
    labels: list[np.ndarray] = []
    buffered_rows, left = 0, budget
    first: tuple[Any, np.ndarray] | None = None
    for f, y in chunks:
        if not len(y):
            continue
        first = first or (f[0:1], y[:1])
        feats.append(f)
        labels.append(y)
        buffered_rows += len(y)
        if buffered_rows >= capacity and buffered_rows >= b:
            F, Y = mix(feats, labels, rng, shuffle)
            full = min(buffered_rows // b * b, left // b * b)
            yield F[:full], Y[:full]
            left -= full
            if left <= 0:
                return
            feats, labels, buffered_rows = [F[full:]], [Y[full:]], buffered_rows - full
    if buffered_rows < left and first is not None:  # drop_last=False: a short rank repeats a row
        feats.append(_repeat_row(first[0], left - buffered_rows))
        labels.append(np.repeat(first[1], left - buffered_rows, axis=0))
    if feats:
        F, Y = mix(feats, labels, rng, shuffle)
        yield F[:left], Y[:left]


def mix(
    feats: list[Any], labels: list[np.ndarray], rng: np.random.Generator, shuffle: bool
) -> tuple[Any, np.ndarray]:
    """The chunks concatenated, and permuted with one ``rng.permutation`` when ``shuffle``."""
    F = feats[0] if len(feats) == 1 else _concat(feats)
    Y = labels[0] if len(labels) == 1 else np.concatenate(labels)
    if shuffle and len(Y) > 1:
        perm = rng.permutation(len(Y))
        if isinstance(F, pa.Table):
            F = F.take(pa.array(perm))
        else:
            F = np.take(F, perm, axis=0)  # take: ~2x faster than F[perm]
        Y = np.take(Y, perm)
    return F, Y


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], pa.Table):
        return pa.concat_tables(parts).combine_chunks()
    return np.concatenate(parts)


def _repeat_row(rows: Any, count: int) -> Any:
    """The first row of ``rows`` (an array or a table) ``count`` times."""
    if isinstance(rows, pa.Table):
        return rows.take(pa.array(np.zeros(count, dtype=np.int64)))
    return np.repeat(rows, count, axis=0)


def equal_steps(rank_rows: Sequence[int], batch_size: int, drop_last: bool) -> tuple[int, int]:
    """(batches, rows) every rank yields per epoch, from the rows each rank reads: the fewest
    rows' whole batches (drop_last), else the most rows' batches, shorter ranks padded."""
    if drop_last:
        steps = min(rank_rows) // batch_size
        return steps, steps * batch_size
    budget = max(rank_rows)
    return -(-budget // batch_size), budget
