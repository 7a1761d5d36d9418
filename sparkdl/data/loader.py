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

Resume (``state_dict``/``load_state_dict``). The position is the epoch and the batches every
rank consumed of it (equal steps: the chief's position is every rank's). At the same world size
and batch size the resumed ranks skip those batches: exactly the rest of the epoch. At another
size (the pyarrow reader, plain or named inputs) the rest of the epoch is exactly the rows no
old rank had trained on, split evenly over the new ranks (:mod:`sparkdl.data.remainder`: an
index-only replay of the old ranks' orders, no data read); fewer than ``world_size ×
batch_size`` of them are that epoch's ``drop_last`` remainder. ``len(loader)`` stays the
normal epoch's count on every rank, and the resumed position starts at ``len(loader)`` minus
the remainder's batches, so a loop that counts ``batches_consumed`` up to ``len(loader)`` ends
with it. The position then keeps the chain of earlier sizes (``resize``), so a second change
in the same epoch is exact too; positions without it (older checkpoints) load as before. The
next epoch is a normal one. The petastorm reader scales the position by rows instead
(approximate, with a warning).

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
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sparkdl.data.buffer import buffered, equal_steps
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
from sparkdl.data.remainder import (
    Remainder,
    RemainderSource,
    Segment,
    plan_remainder,
    share_rng,
)
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
        self._dataset, self.reader = dataset, reader
        self._steps, self._budget = equal_steps(self._source.rank_rows, batch_size, drop_last)
        if not drop_last and self._source.rank_rows[rank] == 0:
            # A split with fewer rows than ranks: this rank has no row to pad with, so it yields
            # no batch (its len() is 0) and adds nothing to sums over ranks; callers that run
            # collectives per batch (see the worker's evaluate) even the counts out themselves.
            self._steps, self._budget = 0, 0
        self._buffer_rows_given = shuffle_buffer_rows
        self.shuffle_buffer_rows = shuffle_buffer_rows or self._default_buffer_rows(batch_size)
        self._epoch, self._consumed, self._skip = epoch, 0, 0
        self._remainder: Remainder | None = None  # the rest of an epoch resumed at a new size
        if self._steps == 0:
            log.warning(
                "sparkdl: rank %d gets 0 batches of %d from split %r (%d rows over %d ranks)",
                rank,
                batch_size,
                split,
                total,
                world_size,
            )

    def _default_buffer_rows(self, batch_size: int) -> int:
        default_rows = _BUFFER_BYTES // _row_bytes(self._manifest, self.split)
        return max(2 * batch_size, min(_BUFFER_MAX_ROWS, default_rows))

    def __len__(self) -> int:
        return self._steps

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reseeds the shuffle) and start it from its first batch."""
        _check_nonnegative("epoch", epoch)
        self._epoch, self._consumed, self._skip = epoch, 0, 0
        self._remainder = None

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from: the epoch and how many batches of it were handed out, and
        (``resize``) the chain of earlier sizes when this epoch was resumed at another size."""
        state: dict[str, Any] = {
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            "seed": self.seed,
            "split": self.split,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "shuffle_buffer_rows": self.shuffle_buffer_rows,
        }
        if self._remainder is not None and self._remainder.epoch == self._epoch:
            state["resize"] = self._remainder.to_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues ``state``'s epoch after its consumed batches.

        With the same world size and batch size the resumed batches are exactly the rest of the
        interrupted epoch. With others (pyarrow reader), the rest of the epoch is exactly the
        rows no old rank had trained on, split evenly over the new ranks
        (:mod:`sparkdl.data.remainder`): this iteration then yields ``len(self) -
        state_dict()["batches_consumed"]`` batches, the same on every rank. The petastorm
        reader scales the position by rows consumed instead (approximate, with a warning).
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
        chain, start = _chain_of(state, epoch)
        same = (old_world, old_batch) == (self.world_size, self.batch_size)
        if not chain and (same or consumed <= 0):  # today's path, bit for bit
            self.set_epoch(epoch)
            self._skip = self._consumed = min(consumed, self._steps)
            return
        if not self._exact_possible(state):
            self._load_scaled(epoch, consumed, old_world, old_batch)
            return
        current = max(0, consumed - start)  # batches of the interrupted segment
        segments = list(chain)
        if not same and current > 0:
            buffer_rows = state.get("shuffle_buffer_rows")
            if buffer_rows is None:  # a position from before the resize chain
                buffer_rows = self._buffer_rows_given or self._default_buffer_rows(old_batch)
            segments.append(Segment(old_world, old_batch, current, int(buffer_rows)))
        self.set_epoch(epoch)
        shares = plan_remainder(
            self._dataset,
            self.split,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            segments=segments,
            world_size=self.world_size,
            batch_size=self.batch_size,
        )
        steps = max(share.steps for share in shares)
        start = max(0, self._steps - steps)
        self._remainder = Remainder(epoch, tuple(segments), shares[self.rank], start)
        self._skip = self._consumed = start + (current if same else 0)
        left = sum(len(share.ids) for share in shares)
        log.info(
            "sparkdl: epoch %d resumed at world_size/batch_size %d/%d after %s: %d batches "
            "of the %d rows not yet trained on per rank",
            epoch,
            self.world_size,
            self.batch_size,
            [s.to_list()[:3] for s in segments],
            steps,
            left,
        )

    def _exact_possible(self, state: dict[str, Any]) -> bool:
        """Whether the rest of ``state``'s epoch can be planned exactly here: the pyarrow
        reader, and the same seed, shuffle, split and drop_last as the position's."""
        if self.reader != "pyarrow":
            return False
        same = (
            int(state.get("seed", self.seed)) == self.seed
            and bool(state.get("shuffle", self.shuffle)) == self.shuffle
            and state.get("split", self.split) == self.split
            and bool(state.get("drop_last", self.drop_last)) == self.drop_last
        )
        if not same:
            log.warning(
                "sparkdl: the position's seed/shuffle/split/drop_last differ from this "
                "loader's; the rest of the epoch cannot be replayed exactly"
            )
        return same

    def _load_scaled(self, epoch: int, consumed: int, old_world: int, old_batch: int) -> None:
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
        self.set_epoch(epoch)
        self._skip = self._consumed = min(scaled, self._steps)

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        plan = self._remainder if self._remainder and self._remainder.epoch == self._epoch else None
        skip = max(skip, plan.start) if plan else skip
        self._consumed = skip
        produced = self._produce(self._epoch, skip, plan)
        if self.prefetch_batches > 0:
            produced = prefetched(produced, self.prefetch_batches)
        for batch in produced:
            if self.device is not None:
                batch = move_to(batch, self.device, self.pin_memory)
            self._consumed += 1
            yield batch

    # --- producer (runs in the prefetch thread) -------------------------------------------

    def _produce(self, epoch: int, skip: int, plan: Remainder | None) -> Iterator[Batch]:
        rows = self._rows(epoch, skip, plan)
        if self.transform_threads > 1:
            yield from _in_order(self._finish, rows, self.transform_threads)
            return
        try:
            for features, label in rows:
                yield self._finish(features, label)
        finally:
            rows.close()  # releases the source's files and threads now

    def _rows(
        self, epoch: int, skip: int, plan: Remainder | None
    ) -> Generator[tuple[Any, np.ndarray], None, None]:
        """The epoch's batches of rows (not yet tensors), after the first ``skip``; with a
        remainder ``plan``, its batches after the first ``skip - plan.start``."""
        capacity = self.shuffle_buffer_rows if self.shuffle else self.batch_size
        steps, budget = self._steps, self._budget
        if plan is None:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            chunks = self._source.chunks(rng, self.shuffle)
        else:
            rng = share_rng(self.seed, epoch, self.rank, plan.level)
            source = RemainderSource(
                self._dataset, self.split, plan.share, verify_checksums=self.verify_checksums
            )
            chunks = source.chunks(rng, self.shuffle)
            steps, budget, skip = plan.share.steps, plan.share.budget, skip - plan.start
        emitted = 0
        b = self.batch_size
        try:
            for features, label in buffered(chunks, rng, capacity, b, budget, self.shuffle):
                for i in range(0, len(label), self.batch_size):
                    if emitted >= steps:
                        return
                    emitted += 1
                    if emitted > skip:
                        yield features[i : i + self.batch_size], label[i : i + self.batch_size]
        finally:
            close = getattr(chunks, "close", None)  # releases the source's files and threads
            if close is not None:
                close()

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


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


def _chain_of(state: dict[str, Any], epoch: int) -> tuple[list[Segment], int]:
    """The earlier sizes of ``epoch`` a position records (``resize``), and where its own
    segment's ``batches_consumed`` starts; none for a position of another epoch or one written
    before the chain existed."""
    resize = state.get("resize")
    if not isinstance(resize, dict) or int(resize.get("epoch", -1)) != epoch:
        return [], 0
    try:
        chain = [Segment(*(int(v) for v in seg)) for seg in resize["segments"]]
        return chain, int(resize["start"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"state['resize'] must hold 'segments' and 'start', got {resize!r}. "
            "Pass what ShardLoader.state_dict() returned."
        ) from e
