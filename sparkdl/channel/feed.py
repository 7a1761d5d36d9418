"""[any] The run-directory feed: workers' progress and log frames through storage, for workers
that cannot reach the driver channel (Spark Connect: the notebook is a client the executors
usually cannot connect to).

The frames are the channel's own (``log``, ``progress``, ``failure``, ``started``), so the
driver's :class:`~sparkdl.launch.progress.RunMonitor` shows them the same way: the tqdm bar and
``[rank N]`` lines. Each rank keeps one small JSON file, ``<feed_dir>/rank-<N>.json``::

    {"rank": 1, "frames": [{"t": "log", "seq": 41, ...}, ..., {"t": "progress", "pseq": 9, ...}]}

- **Bounded**: the last :data:`MAX_FRAMES` non-progress frames (numbered ``seq`` 1, 2, …) and
  the latest progress frame (numbered ``pseq``); a file stays well under 2 MiB.
- **Atomic**: :class:`FeedWriter` rewrites the file whole through :func:`sparkdl.storage.
  write_file` (a rename on local disks and HDFS, a single upload on object stores), so a reader
  sees an old snapshot or a new one, never half of one.
- **Rate-limited**: at most one write per ``interval_s`` (1 s) per rank, from a background
  thread; the first frame is written at once, the last ones when the writer closes.
- **Never fails a run**: a write that fails is retried at the next interval; after
  :data:`MAX_FAILED_WRITES` failures in a row the writer gives up (one line on stderr).

:class:`FeedPoller` (driver) reads the files every ``poll_s`` and hands each frame with a new
number to ``handle`` in order; log lines that fell out of a rank's window between two polls
are replaced by one line saying how many.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sparkdl import storage

__all__ = ["FEED_FILE", "MAX_FAILED_WRITES", "MAX_FRAMES", "FeedPoller", "FeedWriter"]

log = logging.getLogger("sparkdl")

FEED_FILE = "rank-{rank}.json"
MAX_FRAMES = 200
"""Non-progress frames a rank's feed file keeps (the newest)."""
MAX_FAILED_WRITES = 5
"""Failed writes in a row after which a rank's writer gives up."""
_FILE_RE = re.compile(r"rank-(\d+)\.json")


class FeedWriter:
    """(worker) One rank's feed file, rewritten from a background thread (see module doc).

    ``send`` never blocks on storage and never raises; it returns False once the writer has
    given up or closed.
    """

    def __init__(
        self, feed_dir: str, rank: int, *, interval_s: float = 1.0, max_frames: int = MAX_FRAMES
    ) -> None:
        self.uri = storage.join(feed_dir, FEED_FILE.format(rank=rank))
        self.rank = rank
        self.interval_s = interval_s
        self.failure: str | None = None
        self._frames: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_frames)
        self._progress: dict[str, Any] | None = None
        self._seq = self._pseq = 0
        self._dirty = self._closing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def send(self, frame: dict[str, Any]) -> bool:
        """Queue ``frame`` for the next write; False when the writer gave up or is closed."""
        with self._cond:
            if self.failure is not None or self._closing:
                return False
            if frame.get("t") == "progress":
                self._pseq += 1
                self._progress = {**frame, "pseq": self._pseq}
            else:
                self._seq += 1
                self._frames.append({**frame, "seq": self._seq})
            self._dirty = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sparkdl-feed-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return True

    def _snapshot(self) -> bytes:
        frames = list(self._frames)
        if self._progress is not None:
            frames.append(self._progress)
        self._dirty = False
        return json.dumps({"rank": self.rank, "frames": frames}).encode()

    def _run(self) -> None:
        failed = 0
        while True:
            with self._cond:
                while not self._dirty and not self._closing:
                    self._cond.wait()
                if not self._dirty:
                    return
                data, closing = self._snapshot(), self._closing
            try:
                storage.write_file(self.uri, data)
                failed = 0
            except Exception as exc:  # storage trouble must never fail training
                failed += 1
                with self._cond:
                    self._dirty = True  # write the frames again at the next interval
                if failed >= MAX_FAILED_WRITES:
                    self._give_up(f"{type(exc).__name__}: {exc}")
                    return
            if closing and failed == 0:
                with self._cond:
                    if not self._dirty:
                        return
            with self._cond:
                self._cond.wait_for(lambda: self._closing, timeout=self.interval_s)

    def _give_up(self, reason: str) -> None:
        with self._cond:
            self.failure = reason
        # not through logging: this rank's log records are routed to this very feed
        sys.stderr.write(
            f"sparkdl [rank {self.rank}]: cannot write the progress feed {self.uri} ({reason}); "
            "progress and log lines of this rank are not shown on the driver\n"
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is pending (waiting at most ``timeout_s``), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)


class FeedPoller:
    """(driver) Reads the feed files under ``feed_dir`` every ``poll_s`` from a daemon thread
    and calls ``handle(frame)`` for each new frame, in each rank's order. ``on_first(rank)`` is
    called once, for the first rank seen. Nothing it does can fail the run: a file that cannot be
    read or parsed is skipped until the next poll."""

    def __init__(
        self,
        feed_dir: str,
        handle: Callable[[dict[str, Any]], None],
        *,
        poll_s: float = 1.0,
        on_first: Callable[[int], None] | None = None,
    ) -> None:
        self.feed_dir, self.handle, self.poll_s = feed_dir, handle, poll_s
        self.on_first = on_first
        self.ranks_seen: set[int] = set()
        self._seq: dict[int, int] = {}
        self._pseq: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="sparkdl-feed-poller", daemon=True)

    def start(self) -> FeedPoller:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Read every rank's file once and hand on its new frames."""
        with self._lock:
            try:
                names = storage.list_dir(self.feed_dir)
            except Exception as exc:
                log.debug("sparkdl: cannot list the feed %s (%s)", self.feed_dir, exc)
                return
            for name in names:
                found = _FILE_RE.fullmatch(name)
                if found:
                    self._read(int(found.group(1)), storage.join(self.feed_dir, name))

    def _read(self, rank: int, uri: str) -> None:
        try:
            frames = json.loads(storage.read_file(uri))["frames"]
        except Exception as exc:  # a file being replaced, or not ours
            log.debug("sparkdl: cannot read the feed file %s (%s)", uri, exc)
            return
        if rank not in self.ranks_seen:
            self.ranks_seen.add(rank)
            if self.on_first is not None and len(self.ranks_seen) == 1:
                self.on_first(rank)
        last, plast = self._seq.get(rank, 0), self._pseq.get(rank, 0)
        for frame in sorted(frames, key=lambda f: (int(f.get("seq", 0)), int(f.get("pseq", 0)))):
            seq, pseq = int(frame.get("seq", 0)), int(frame.get("pseq", 0))
            if seq > last:
                if seq > last + 1:
                    self._skipped(rank, seq - last - 1)
                last = seq
                self._hand_on(frame)
            elif pseq > plast:
                plast = pseq
                self._hand_on(frame)
        self._seq[rank], self._pseq[rank] = last, plast

    def _skipped(self, rank: int, count: int) -> None:
        self._hand_on(
            {
                "t": "log",
                "rank": rank,
                "level": logging.WARNING,
                "msg": f"… {count} earlier line(s) not shown (the run-directory feed keeps the "
                f"last {MAX_FRAMES} per rank)",
                "time": time.time(),
            }
        )

    def _hand_on(self, frame: dict[str, Any]) -> None:
        try:
            self.handle(frame)
        except Exception as exc:
            log.debug("sparkdl: a feed frame could not be shown (%s)", exc)

    def close(self) -> None:
        """Stop polling, then read the files a last time (the workers' final frames); a second
        call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.poll()
