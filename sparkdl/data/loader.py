"""[worker] ShardLoader: one rank's rows of a materialized dataset → shuffled torch batches.

Pure numpy + torch (never pyspark), so it runs in a Spark task, a local process or a unit test
alike. Rows come from a row source (:mod:`sparkdl.data.sources`: pyarrow by default, or
petastorm, chosen by ``reader``); the loader owns equal steps, the shuffle buffer, batches,
resume and the prefetch thread (:mod:`sparkdl.data.prefetch`). What follows describes the
pyarrow source; :mod:`sparkdl.data.petastorm` lists how the petastorm one differs.

Row space: rank ``r`` of ``world_size`` reads the contiguous slice ``rank_slice(N, W, r)`` of
the split's rows (see :mod:`sparkdl.data.dataset`).

Equal steps. Every rank yields ``len(loader)`` batches per epoch, the same on every rank:
``drop_last=True`` (default) → ``floor(floor(N/W) / batch_size)`` full batches; each rank's
surplus rows are dropped, and with ``shuffle=True`` which rows those are changes every epoch.
``drop_last=False`` → ``ceil(ceil(N/W) / batch_size)`` batches with every row; the last batch
may be short, and a rank whose slice is one row shorter repeats its first row once so that
every rank yields the same batch sizes (all-reduce never waits on a rank that ran out).
In general the counts come from the rows each rank's source reads (``rank_rows``): the fewest
rows' whole batches, or with ``drop_last=False`` the most rows' batches. The one exception: with
``drop_last=False`` a rank that has no row at all (a split smaller than ``world_size``) yields
no batch, since it has nothing to repeat.

Shuffle (``shuffle=True``), seeded by ``(seed, epoch, rank)`` and independent of timing or
prefetch depth: the rank's row-group pieces are visited in a permuted order, and rows are
permuted inside a bounded buffer of ``shuffle_buffer_rows`` rows. ``shuffle=False`` yields the
slice in file order: batch ``i`` is rows ``[i*b, (i+1)*b)`` of the slice.

Batches are ``(features, label)``: ``features`` float32 ``[B, F]`` (the feature columns
concatenated in ``feature_cols`` order), ``label`` int64 ``[B]`` for integer labels, float32
otherwise. A ``transform(batch: dict[str, Tensor]) -> dict`` hook runs in the loader thread on
``{column: tensor}`` (scalar columns ``[B]``, array columns ``[B, k]``, plus the label column);
the loader then yields ``(out["features"], out["label"])`` where present, else the feature
columns of ``out`` flattened and concatenated, and ``out[label_col]``.

With named inputs (``feature_cols`` a dict, see :mod:`sparkdl.data.input_specs`) batches are
``(inputs, label)``: ``inputs`` a dict of each argument's value (:func:`~sparkdl.data.inputs.
build_inputs`, built per batch, so variable-length columns are padded to the batch's longest
row); the rows stay Arrow through the shuffle buffer. ``transform`` then gets
``{**inputs, label_col: label}`` and returns that kind of dict: the label under ``label_col``,
every other key an input.

Files are opened and verified through :meth:`ShardedDataset.open_file` (sha256 on first open,
replicas as fallback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sparkdl.data.dataset import (
    ShardedDataset,
    _check_nonnegative,
    _check_positive,
    rank_slice,
    steps_for,
)
from sparkdl.data.input_specs import InputSpec
from sparkdl.data.inputs import build_inputs, move_to
from sparkdl.data.prefetch import prefetched
from sparkdl.data.readers import source_class
from sparkdl.data.sources import RowSource
from sparkdl.errors import ConfigError, DataError

__all__ = ["ShardedDataset", "ShardLoader", "rank_slice", "steps_for"]

log = logging.getLogger("sparkdl")

Batch = tuple[Any, ...]
"""(features, label) or, with a sample weight column, (features, label, weight)."""
_BUFFER_BYTES = 64 << 20
_BUFFER_MAX_ROWS = 1 << 17


class ShardLoader:
    """Iterable of one rank's batches for one epoch at a time; see the module docstring.

    Arguments: ``batch_size`` rows per batch; ``shuffle`` two-level seeded shuffle; ``seed`` and
    ``epoch`` seed it (``set_epoch`` each epoch); ``split`` "train" or "validation";
    ``drop_last`` see module docstring; ``prefetch_batches`` depth of the background queue (0 =
    read in the caller's thread); ``device``/``pin_memory`` where batches go; ``shuffle_buffer_rows``
    bound of the row shuffle buffer (default: about 64 MiB of rows, at least 2 batches);
    ``transform`` hook run in the loader thread; ``transform_threads`` batches built and
    transformed at once (> 1: the same batches in the same order, but the transform runs on
    several batches concurrently, so one drawing from a shared RNG loses its exact sequence;
    for transforms that wait, e.g. on ``decode_images(workers=N)``); ``verify_checksums`` check sha256 on first open;
    ``reader`` the row source's name (:mod:`sparkdl.data.readers`), and any other keyword
    arguments its options (e.g. petastorm's ``workers_count``).
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        rank: int,
        world_size: int,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        split: str = "train",
        drop_last: bool = True,
        prefetch_batches: int = 2,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
        shuffle_buffer_rows: int | None = None,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        transform_threads: int = 1,
        verify_checksums: bool = True,
        reader: str = "pyarrow",
        **reader_options: Any,
    ) -> None:
        _check_positive("world_size", world_size)
        _check_nonnegative("rank", rank)
        if rank >= world_size:
            raise ConfigError(
                f"rank must be < world_size ({world_size}), got {rank}. Pass 0 <= rank < world."
            )
        _check_positive("batch_size", batch_size)
        _check_nonnegative("seed", seed)
        _check_nonnegative("epoch", epoch)
        _check_nonnegative("prefetch_batches", prefetch_batches)
        if shuffle_buffer_rows is not None:
            _check_positive("shuffle_buffer_rows", shuffle_buffer_rows)
        if transform is not None and not callable(transform):
            raise ConfigError(f"transform must be callable, got {transform!r}. Pass a function.")
        _check_positive("transform_threads", transform_threads)
        self.transform_threads = transform_threads
        m = dataset.manifest
        self._manifest = m
        if m.arrow_batches and reader != "pyarrow":
            raise ConfigError(
                f"reader must be 'pyarrow' for a dataset with named inputs, several or array "
                f"labels or sample weights, got {reader!r}. Use reader='pyarrow' (petastorm "
                "reads a list of numeric columns and one label only)."
            )
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.shuffle, self.seed, self.split, self.drop_last = bool(shuffle), seed, split, drop_last
        self.prefetch_batches, self.transform = prefetch_batches, transform
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.verify_checksums = verify_checksums
        m.shards_of(split)  # DataError for an unknown split
        self._feature_specs, self._label_specs, self._weight_specs = _arrow_specs(m)
        total = m.splits[split]
        self._source: RowSource = source_class(reader)(
            dataset,
            rank,
            world_size,
            split=split,
            verify_checksums=verify_checksums,
            **reader_options,
        )
        self._steps, self._budget = _equal_steps(self._source.rank_rows, batch_size, drop_last)
        if not drop_last and self._source.rank_rows[rank] == 0:
            # A split with fewer rows than ranks: this rank has no row to pad with, so it yields
            # no batch (its len() is 0) and adds nothing to sums over ranks; callers that run
            # collectives per batch (see the worker's evaluate) even the counts out themselves.
            self._steps, self._budget = 0, 0
        default_rows = _BUFFER_BYTES // _row_bytes(m, split)
        self.shuffle_buffer_rows = shuffle_buffer_rows or max(
            2 * batch_size, min(_BUFFER_MAX_ROWS, default_rows)
        )
        self._epoch, self._consumed, self._skip = epoch, 0, 0
        if self._steps == 0:
            log.warning(
                "sparkdl: rank %d gets 0 batches of %d from split %r (%d rows over %d ranks)",
                rank,
                batch_size,
                split,
                total,
                world_size,
            )

    def __len__(self) -> int:
        return self._steps

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reseeds the shuffle) and start it from its first batch."""
        _check_nonnegative("epoch", epoch)
        self._epoch, self._consumed, self._skip = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from: the epoch and how many batches of it were handed out."""
        return {
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            "seed": self.seed,
            "split": self.split,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues ``state``'s epoch after its consumed batches.

        With the same world size and batch size the resumed batches are exactly the rest of the
        interrupted epoch. With others, the position is scaled by rows consumed (approximate).
        """
        try:
            epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"state must hold 'epoch' and 'batches_consumed', got {state!r}. "
                "Pass what ShardLoader.state_dict() returned."
            ) from e
        old_world = int(state.get("world_size", self.world_size))
        old_batch = int(state.get("batch_size", self.batch_size))
        if (old_world, old_batch) != (self.world_size, self.batch_size):
            scaled = consumed * old_world * old_batch // (self.world_size * self.batch_size)
            log.warning(
                "sparkdl: resuming with world_size/batch_size %d/%d instead of %d/%d; "
                "position scaled from %d to %d batches (approximate)",
                self.world_size,
                self.batch_size,
                old_world,
                old_batch,
                consumed,
                scaled,
            )
            consumed = scaled
        self.set_epoch(epoch)
        self._skip = self._consumed = min(consumed, self._steps)

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        self._consumed = skip
        produced = self._produce(self._epoch, skip)
        if self.prefetch_batches > 0:
            produced = prefetched(produced, self.prefetch_batches)
        for batch in produced:
            if self.device is not None:
                batch = move_to(batch, self.device, self.pin_memory)
            self._consumed += 1
            yield batch

    # --- producer (runs in the prefetch thread) -------------------------------------------

    def _produce(self, epoch: int, skip: int) -> Iterator[Batch]:
        rows = self._rows(epoch, skip)
        if self.transform_threads > 1:
            yield from _in_order(self._finish, rows, self.transform_threads)
            return
        try:
            for features, label in rows:
                yield self._finish(features, label)
        finally:
            rows.close()  # releases the source's files and threads now

    def _rows(self, epoch: int, skip: int) -> Generator[tuple[Any, np.ndarray], None, None]:
        """The epoch's batches of rows (not yet tensors), after the first ``skip``."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        capacity = self.shuffle_buffer_rows if self.shuffle else self.batch_size
        chunks = self._source.chunks(rng, self.shuffle)
        emitted = 0
        try:
            for features, label in self._buffered(chunks, rng, capacity):
                for i in range(0, len(label), self.batch_size):
                    if emitted >= self._steps:
                        return
                    emitted += 1
                    if emitted > skip:
                        yield features[i : i + self.batch_size], label[i : i + self.batch_size]
        finally:
            close = getattr(chunks, "close", None)  # releases the source's files and threads
            if close is not None:
                close()

    def _buffered(
        self,
        chunks: Iterator[tuple[np.ndarray, np.ndarray]],
        rng: np.random.Generator,
        capacity: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decoded chunks gathered into (shuffled) buffers of whole batches, then the rest padded
        up to the budget (drop_last=False) by repeating the rank's first row: every buffer's
        length is a multiple of the batch size except the last one's."""
        b = self.batch_size
        feats: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        buffered, left = 0, self._budget
        first: tuple[np.ndarray, np.ndarray] | None = None
        for f, y in chunks:
            if not len(y):
                continue
            first = first or (f[0:1], y[:1])
            feats.append(f)
            labels.append(y)
            buffered += len(y)
            if buffered >= capacity and buffered >= b:
                F, Y = self._mix(feats, labels, rng)
                full = min(buffered // b * b, left // b * b)
                yield F[:full], Y[:full]
                left -= full
                if left <= 0:
                    return
                feats, labels, buffered = [F[full:]], [Y[full:]], buffered - full
        if buffered < left and first is not None:  # drop_last=False: a short rank repeats a row
            feats.append(_repeat_row(first[0], left - buffered))
            labels.append(np.repeat(first[1], left - buffered, axis=0))
        if feats:
            F, Y = self._mix(feats, labels, rng)
            yield F[:left], Y[:left]

    def _mix(
        self, feats: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        F = feats[0] if len(feats) == 1 else _concat(feats)
        Y = labels[0] if len(labels) == 1 else np.concatenate(labels)
        if self.shuffle and len(Y) > 1:
            perm = rng.permutation(len(Y))
            if isinstance(F, pa.Table):
                F = F.take(pa.array(perm))
            else:
                F = np.take(F, perm, axis=0)  # take: ~2x faster than F[perm]
            Y = np.take(Y, perm)
        return F, Y

    def _finish(self, features: Any, label: np.ndarray) -> Batch:
        if isinstance(features, pa.Table):
            return self._finish_named(features, label)
        f = torch.from_numpy(_writable(features))
        y = torch.from_numpy(_writable(label))
        if self.transform is not None:
            f, y = self._apply_transform(f, y)
        if self.pin_memory:
            f, y = f.pin_memory(), y.pin_memory()
        return f, y

    def _apply_transform(self, f: torch.Tensor, y: torch.Tensor) -> Batch:
        m = self._manifest
        batch: dict[str, torch.Tensor] = {}
        offset = 0
        for col, shape in zip(m.feature_cols, m.feature_shapes):
            width = shape[0] if shape else 1
            view = f[:, offset : offset + width]
            batch[col] = view.reshape(-1) if not shape else view
            offset += width
        batch[m.label_col] = y
        out = self.transform(batch)  # type: ignore[misc]
        if not isinstance(out, dict):
            raise DataError(
                f"transform must return a dict of tensors, got {type(out).__name__}. "
                "Return the batch dict (with 'features'/'label' or the column names)."
            )
        if "features" in out:
            features = out["features"]
        else:
            n = y.shape[0]
            features = torch.cat([out[c].reshape(n, -1).float() for c in m.feature_cols], dim=1)
        return features, out["label"] if "label" in out else out[m.label_col]

    def _finish_named(self, table: pa.Table, label: np.ndarray) -> Batch:
        """Rows kept as Arrow (named inputs, several or array labels, weights): the batch's
        columns built into inputs, labels and weights (:func:`build_inputs`), then the
        transform on ``{**inputs, label columns: labels, weight column: weights}``; every key
        it returns besides the label and weight columns' is an input. A list ``feature_cols``
        is the input ``"features"`` (float32 ``[B, F]``). ``label`` is a placeholder here."""
        inputs = build_inputs(table, self._feature_specs)
        labels = build_inputs(table, self._label_specs)
        weights = build_inputs(table, self._weight_specs)
        if self.transform is not None:
            out = self.transform({**inputs, **labels, **weights})
            if not isinstance(out, dict):
                raise DataError(
                    f"transform must return a dict, got {type(out).__name__}. Return the batch "
                    f"dict: the model's inputs by name, the labels under {list(labels)}."
                )
            out = dict(out)
            labels = {c: out.pop(c, v) for c, v in labels.items()}
            weights = {c: out.pop(c, v) for c, v in weights.items()}
            inputs = out
        if self.pin_memory:
            inputs, labels, weights = _pinned(inputs), _pinned(labels), _pinned(weights)
        features = inputs if self._manifest.inputs else inputs["features"]
        values = list(labels.values())
        y = values[0] if len(values) == 1 else tuple(values)
        if weights:
            return features, y, next(iter(weights.values()))
        return features, y


def _arrow_specs(m: Any) -> tuple[tuple[InputSpec, ...], ...]:
    """(features, labels, weight) specs for batches built from Arrow rows."""
    widths = tuple(shape[0] if shape else 1 for shape in m.feature_shapes)
    dense = (InputSpec("features", tuple(m.feature_cols), "dense", widths=widths),)
    kind = "int" if m.label_type == "int64" else "float"
    label = (InputSpec(m.label_col, (m.label_col,), kind, m.label_type),)
    weight = (InputSpec(m.weight_col, (m.weight_col,), "float"),) if m.weight_col else ()
    return m.inputs or dense, m.labels or label, weight


def _in_order(finish: Any, rows: Iterator[Any], threads: int) -> Iterator[Batch]:
    """``finish(*item)`` of every item of ``rows`` in order, up to ``threads`` at a time (a
    transform that waits on its own worker processes, e.g. ``decode_images(workers=N)``, then
    overlaps with the next batch's)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque[Any] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="sparkdl-transform") as pool:
        try:
            for item in rows:
                pending.append(pool.submit(finish, *item))
                if len(pending) >= threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            close = getattr(rows, "close", None)
            if close is not None:
                close()


def _row_bytes(m: Any, split: str) -> int:
    """About what one row takes in the shuffle buffer: its float32 values, or with named
    inputs (binary, variable-length columns) twice its share of the split's file bytes."""
    if not m.arrow_batches:
        return 4 * (m.feature_dim + 1)
    rows = max(1, m.splits.get(split, 0))
    return max(4 * (m.feature_dim + 1), 2 * sum(f.bytes for f in m.files_of(split)) // rows)


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], pa.Table):
        return pa.concat_tables(parts).combine_chunks()
    return np.concatenate(parts)


def _repeat_row(rows: Any, count: int) -> Any:
    """The first row of ``rows`` (an array or a table) ``count`` times."""
    if isinstance(rows, pa.Table):
        return rows.take(pa.array(np.zeros(count, dtype=np.int64)))
    return np.repeat(rows, count, axis=0)


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


def _equal_steps(rank_rows: Sequence[int], batch_size: int, drop_last: bool) -> tuple[int, int]:
    """(batches, rows) every rank yields per epoch, from the rows each rank reads: the fewest
    rows' whole batches (drop_last), else the most rows' batches, shorter ranks padded."""
    if drop_last:
        steps = min(rank_rows) // batch_size
        return steps, steps * batch_size
    budget = max(rank_rows)
    return -(-budget // batch_size), budget
