"""[worker] Metric rows (epoch, step, split, name, value, wall_time) written as Parquet by the chief.

Each flush writes one complete file under ``<run_dir>/metrics`` through
:func:`sparkdl.storage.write_file` (published whole), so ``spark.read.parquet(run_dir +
"/metrics")`` never sees a partial file.

Each step appears once, across restarts. A file is named for the highest step of its rows
(``part-s<step>-a<attempt>-<n>.parquet``), and the chief flushes right before every checkpoint
commit, so every file's rows lie entirely at or before a checkpoint's step or entirely after it.
A resumed attempt first deletes the files whose rows lie after the checkpoint it resumes from
(:meth:`MetricsLog.discard_after`): rows a failed attempt wrote past its last checkpoint are
written again by the attempt that redoes those steps, never twice.
"""

from __future__ import annotations

import io
import logging
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq

from sparkdl import storage
from sparkdl.rundir.layout import RunLayout

__all__ = ["METRICS_SCHEMA", "MetricsLog"]

log = logging.getLogger("sparkdl")
_PART_RE = re.compile(r"^part-s(\d+)-")

METRICS_SCHEMA = pa.schema(
    [
        ("epoch", pa.int32()),
        ("step", pa.int64()),
        ("split", pa.string()),
        ("name", pa.string()),
        ("value", pa.float64()),
        ("wall_time", pa.float64()),
    ]
)


class MetricsLog:
    """Collects metric rows; only an enabled log (the chief's) writes files."""

    def __init__(self, run_dir: str, *, enabled: bool, attempt: int = 0) -> None:
        self.dir = RunLayout(run_dir).metrics_dir
        self.enabled = enabled
        self.attempt = attempt
        self._rows: list[tuple[int, int, str, str, float, float]] = []
        self.latest: dict[str, float] = {}
        self._flushes = 0

    def record(self, epoch: int, step: int, split: str, name: str, value: float) -> None:
        self.latest[f"{split}/{name}"] = float(value)
        if self.enabled:
            self._rows.append((epoch, step, split, name, float(value), time.time()))

    def discard_after(self, step: int) -> None:
        """(chief only) Delete metric files holding rows of steps after ``step`` (a failed
        attempt's rows past the checkpoint a new attempt resumes from)."""
        if not self.enabled:
            return
        for name in storage.list_dir(self.dir):
            match = _PART_RE.match(name)
            if match and int(match.group(1)) > step:
                log.info("sparkdl: discarding metrics %s (after resumed step %d)", name, step)
                storage.delete(storage.join(self.dir, name))

    def flush(self, tag: str = "") -> None:
        """(chief only) Write the rows recorded since the last flush as one Parquet file."""
        if not self.enabled or not self._rows:
            return
        columns = list(zip(*self._rows))
        table = pa.table(
            [pa.array(col, type=f.type) for col, f in zip(columns, METRICS_SCHEMA)],
            schema=METRICS_SCHEMA,
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        last = max(row[1] for row in self._rows)
        suffix = f"-{tag}" if tag else ""
        name = f"part-s{last:012d}-a{self.attempt:03d}-{self._flushes:05d}{suffix}.parquet"
        storage.write_file(storage.join(self.dir, name), buffer.getvalue())
        self._flushes += 1
        self._rows.clear()
