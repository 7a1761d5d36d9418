"""[worker] ``reader="petastorm"``: PetastormSource, a rank's shard files read through petastorm.

A :class:`~sparkdl.data.sources.RowSource` behind ``ShardedDataset.loader(..., reader="petastorm")``
(and ``TorchEstimator(reader="petastorm")``), reading with ``petastorm.make_batch_reader``; this
module is imported only when it is asked for (:mod:`sparkdl.data.readers`), and petastorm only
when a loader is built. petastorm needs the compat environment (see :mod:`sparkdl.data.readers`);
elsewhere building a loader raises ConfigError naming that environment.

A loader over this source keeps :class:`~sparkdl.data.loader.ShardLoader`'s contract (``len``,
``set_epoch``, ``state_dict``/``load_state_dict``, ``transform``, ``device``, equal batch counts
per rank) with these differences, all consequences of petastorm reading whole row groups of
whole files:

* **Rank assignment**: rank ``r`` reads the whole files whose first row falls in its slice
  ``rank_slice(N, W, r)``: exactly shard ``r`` when ``num_shards == world_size`` (what
  ``materialize`` and ``TorchEstimator`` write), whole shards otherwise. A split needs at least
  ``world_size`` non-empty files.
* **Equal steps**: ``drop_last=True`` → ``floor(min rank rows / batch_size)`` batches on every
  rank (the pyarrow reader's count when files match shards); ``drop_last=False`` →
  ``ceil(max rank rows / batch_size)``, shorter ranks repeat their first row to fill.
* **Seeded epochs**: petastorm permutes the row-group order (its ``seed``), and rows are mixed
  in a bounded buffer with a numpy generator; both are seeded by ``(seed, epoch, rank)``. The
  order is reproducible with ``workers_count=1`` (the default); more petastorm workers read
  faster but hand row groups over in completion order. The permutation differs from the
  pyarrow reader's for the same seed.
* **Resume** re-reads the skipped batches of the interrupted epoch (petastorm cannot seek).

Checksums are verified and replicas used exactly as by the pyarrow reader, before petastorm
opens the files.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from sparkdl import storage
from sparkdl._checks import expect_int
from sparkdl.data.dataset import ShardedDataset, rank_slice
from sparkdl.data.manifest import FileEntry
from sparkdl.data.readers import COMPAT_HINT, require_petastorm
from sparkdl.data.sources import Chunk
from sparkdl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sparkdl.data.loader import ShardLoader

__all__ = ["COMPAT_HINT", "PetastormLoader", "PetastormSource", "file_urls", "require_petastorm"]


def _url(root: str, relpath: str) -> str:
    full = storage.join(root, relpath)
    return full if "://" in full else "file://" + full


def file_urls(dataset: ShardedDataset, split: str = "train") -> list[str]:
    """URLs of ``split``'s non-empty files in row order: what ``make_batch_reader`` takes.

    e.g. ``petastorm.make_batch_reader(file_urls(ds))`` reads a sparkdl dataset with petastorm.
    """
    return [_url(dataset.path, f.path) for f in dataset.manifest.files_of(split) if f.rows]


def _rank_files(files: list[FileEntry], total: int, world_size: int) -> list[list[FileEntry]]:
    """Whole files per rank: each goes to the rank whose row slice holds its first row."""
    starts = [rank_slice(total, world_size, r)[0] for r in range(world_size)]
    owned: list[list[FileEntry]] = [[] for _ in range(world_size)]
    offset = 0
    for f in files:
        if f.rows:
            owned[bisect.bisect_right(starts, offset) - 1].append(f)
        offset += f.rows
    return owned


class PetastormSource:
    """``reader="petastorm"``: the rank's whole files, read with ``petastorm.make_batch_reader``.

    Takes ``workers_count`` (petastorm reader threads; 1 keeps epochs reproducible) and
    ``results_queue_size`` (row groups petastorm reads ahead) as reader options. See the module
    docstring for how it differs from the pyarrow reader.
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        rank: int,
        world_size: int,
        *,
        split: str = "train",
        verify_checksums: bool = True,
        workers_count: int = 1,
        results_queue_size: int = 4,
    ) -> None:
        self._make_batch_reader = require_petastorm()
        for name, value in (
            ("workers_count", workers_count),
            ("results_queue_size", results_queue_size),
        ):
            expect_int(name, value, "Pass e.g. 1")
        self._dataset, self._manifest = dataset, dataset.manifest
        self.verify_checksums = verify_checksums
        self.workers_count, self.results_queue_size = workers_count, results_queue_size
        files = self._manifest.files_of(split)
        owned = _rank_files(files, self._manifest.splits[split], world_size)
        if any(not files for files in owned):
            raise ConfigError(
                f"split {split!r} must have at least world_size ({world_size}) non-empty "
                f"files for reader='petastorm', got {sum(1 for f in files if f.rows)}. "
                "Materialize with num_shards a multiple of world_size, or use reader='pyarrow'."
            )
        self.rank_rows = [sum(f.rows for f in files) for files in owned]
        self._owned = owned[rank]
        self._urls: list[str] | None = None

    def _resolve_urls(self) -> list[str]:
        """The rank's file URLs, each a verified candidate (primary, else a replica)."""
        if self._urls is None:
            urls = []
            for entry in self._owned:
                urls.append(self._usable(entry))
            self._urls = urls
        return self._urls

    def _usable(self, entry: FileEntry) -> str:
        failures: list[str] = []
        for candidate in entry.candidates:
            single = dataclasses.replace(entry, path=candidate, replicas=())
            try:
                self._dataset.open_file(single, verify=self.verify_checksums)
            except DataError as e:
                failures.append(str(e))
                continue
            return _url(self._dataset.path, candidate)
        raise DataError(
            f"file {entry.path!r} of dataset {self._dataset.path!r} must be readable, got a "
            f"failure on every replica: {' | '.join(failures)}"
        )

    def chunks(self, rng: np.random.Generator, shuffle: bool) -> Iterator[Chunk]:
        """Decoded row groups in petastorm's order (its row-group shuffle seeded from ``rng``)."""
        reader_seed = int(rng.integers(1 << 31))
        m = self._manifest
        columns = [*dict.fromkeys([*m.feature_cols, m.label_col])]
        reader = self._make_batch_reader(
            self._resolve_urls(),
            schema_fields=[f"^{re.escape(c)}$" for c in columns],
            reader_pool_type="thread",
            workers_count=self.workers_count,
            results_queue_size=self.results_queue_size,
            seed=reader_seed,
            shuffle_row_groups=shuffle,
            shuffle_rows=False,
            num_epochs=1,
        )
        try:
            for chunk in reader:
                yield self._decode(chunk._asdict())
        finally:
            reader.stop()
            reader.join()

    def _decode(self, columns: dict[str, Any]) -> Chunk:
        """petastorm's column arrays (``[n]`` scalars, ``[n, k]`` arrays) → features, label."""
        m = self._manifest
        label = np.asarray(columns[m.label_col])
        n = len(label)
        blocks = [np.asarray(columns[c], dtype=np.float32).reshape(n, -1) for c in m.feature_cols]
        features = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
        if features.shape[1] != m.feature_dim:
            raise DataError(
                f"features must be {m.feature_dim} values per row, got {features.shape[1]} from "
                f"petastorm for {list(m.feature_cols)}. Re-materialize with mode='overwrite'."
            )
        dtype = np.int64 if m.label_type == "int64" else np.float32
        return np.ascontiguousarray(features), label.astype(dtype, copy=False)


def PetastormLoader(  # the name of this reader's loader before sources: kept for callers
    dataset: ShardedDataset, rank: int, world_size: int, **kwargs: Any
) -> ShardLoader:
    """``dataset.loader(rank, world_size, reader="petastorm", **kwargs)``."""
    return dataset.loader(rank, world_size, reader="petastorm", **kwargs)
