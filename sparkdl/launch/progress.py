"""[driver] What the workers send, shown on the driver: each rank's log lines and live progress.

A :class:`RunMonitor` is the sink of one launch's driver channel (``sparkdl.channel``):

- a log frame becomes the line ``[rank N] message`` on the ``sparkdl.workers`` logger (at the
  worker's level for warnings and errors, at DEBUG below that: a quiet driver), and, with a
  ``log_dir``, a line in ``log_dir/rank-N.log`` whatever its level. The driver writes
  these files, so they land in the run directory wherever the workers ran: appended line by
  line on a local (or mounted) run directory; on an object store (no appends there) kept in
  memory, at most ``_REMOTE_LOG_LINES`` per rank, and uploaded whole when the launch ends;
- progress frames (the chief sends them) drive a tqdm bar (``tqdm.auto``: a widget in
  notebooks with ipywidgets installed, the ``notebook`` extra; a text bar without it) with epoch, step/total, loss, samples/s and ETA when the driver is interactive (a
  notebook, or stderr is a terminal); otherwise an INFO line on the ``sparkdl.progress`` logger
  at most every ``log_interval_s`` and at the end of every epoch.

When nothing shows these loggers' records (no handler anywhere: a bare script or notebook), the
monitor prints them on stderr for the launch, so worker lines are never silently lost.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any, TextIO

from sparkdl import storage
from sparkdl.errors import RankFailure

__all__ = ["RunMonitor", "SparkPhaseProgress", "format_progress", "is_interactive"]

log = logging.getLogger("sparkdl")
workers_log = logging.getLogger("sparkdl.workers")
progress_log = logging.getLogger("sparkdl.progress")

_MAX_RANK = 1 << 16
_REMOTE_LOG_LINES = 100_000
RANK_LOG = "rank-{rank}.log"
"""The name of a rank's log file under ``log_dir``."""


def is_interactive() -> bool:
    """A notebook kernel, or a terminal on stderr: where a live bar makes sense."""
    shell = sys.modules.get("IPython")
    if shell is not None:
        try:
            ip = shell.get_ipython()  # type: ignore[attr-defined]
            if ip is not None and type(ip).__name__ == "ZMQInteractiveShell":
                return True
        except Exception:
            pass
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def format_progress(name: str, frame: dict[str, Any], eta_s: float | None) -> str:
    """``train: epoch 1/3 | step 40/120 (33%) | loss 0.512 | 12,345 samples/s | ETA 0:00:10``."""
    step, total = int(frame.get("step", 0)), int(frame.get("total", 0))
    parts = [f"{name}: epoch {int(frame.get('epoch', 0)) + 1}/{int(frame.get('epochs', 1))}"]
    parts.append(f"step {step}/{total} ({100.0 * step / max(total, 1):.0f}%)")
    if frame.get("loss") is not None:
        parts.append(f"loss {float(frame['loss']):.4g}")
    if frame.get("seconds"):
        parts.append(f"{float(frame.get('samples', 0)) / float(frame['seconds']):,.0f} samples/s")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


class RunMonitor:
    """(driver) Sink of the driver channel for one launch: log lines per rank and progress.

    Args:
        log_dir: where ``rank-N.log`` files go, a path or URI (None: no files).
        progress: show progress (a bar when interactive, else periodic log lines).
        name: what the progress shows first, e.g. the run name.
        interactive: force the bar on or off; default :func:`is_interactive`.
        log_interval_s: least time between two non-interactive progress lines.
    """

    def __init__(
        self,
        *,
        log_dir: str | None = None,
        progress: bool = True,
        name: str = "train",
        interactive: bool | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        self.log_dir = log_dir
        self.progress = bool(progress)
        self.name = name
        self.interactive = is_interactive() if interactive is None else bool(interactive)
        self.log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._files: dict[int, TextIO] = {}
        self.failures: list[RankFailure] = []
        """Each failing rank's own report (the launcher adds those Spark did not report)."""
        self.started: set[int] = set()
        """The ranks that reported in (their ``started`` frame)."""
        self._local_logs = storage.local_path(log_dir) if log_dir else None
        self._remote_lines: dict[int, collections.deque[str]] = {}
        self._bar: Any = None
        self._redirect: Any = None
        self._first: tuple[float, int] | None = None
        self._last_line = 0.0
        self._last_frame: dict[str, Any] | None = None
        self._printed_last = True
        self._restore: list[tuple[logging.Logger, logging.Handler, int]] = []

    def start(self) -> RunMonitor:
        """Make sure worker lines and progress lines are shown somewhere (see module doc)."""
        self._restore = _show_on_stderr()
        return self

    def handle(self, frame: dict[str, Any]) -> None:
        """Take one frame from the channel (its consumer thread)."""
        kind = frame.get("t")
        rank = frame.get("rank")
        if not isinstance(rank, int) or not 0 <= rank < _MAX_RANK:
            return
        with self._lock:
            if kind == "started":
                self.started.add(rank)
            elif kind == "failure":
                self.failures.extend(RankFailure.decode_all(str(frame.get("failure", ""))))
            elif kind == "log":
                self._log_line(rank, frame)
            elif kind == "progress" and self.progress:
                self._progress(frame)

    def started_count(self) -> int:
        """How many ranks have reported in so far (the launcher's start watch on Connect)."""
        return len(self.started)

    def _log_line(self, rank: int, frame: dict[str, Any]) -> None:
        level = frame.get("level", logging.INFO)
        level = level if isinstance(level, int) else logging.INFO
        msg = str(frame.get("msg", ""))
        prefix = f"[rank {rank}] "
        msg = msg.removeprefix(prefix)  # some worker messages name their rank already
        # A quiet driver: the bar (or a line per epoch) shows progress; a worker's INFO lines
        # go to DEBUG here, and whole to logs/rank-N.log; its warnings and errors show as such.
        workers_log.log(level if level >= logging.WARNING else logging.DEBUG, "%s%s", prefix, msg)
        if self.log_dir is None:
            return
        when = frame.get("time")
        stamp = datetime.datetime.fromtimestamp(
            float(when) if isinstance(when, (int, float)) else time.time()
        ).isoformat(sep=" ", timespec="milliseconds")
        line = f"{stamp} {logging.getLevelName(level)} {msg}\n"
        if self._local_logs is None:
            lines = self._remote_lines.setdefault(rank, collections.deque(maxlen=_REMOTE_LOG_LINES))
            lines.append(line)
            return
        fh = self._files.get(rank)
        if fh is None:
            os.makedirs(self._local_logs, exist_ok=True)
            fh = self._files[rank] = open(  # noqa: SIM115 (closed in close())
                os.path.join(self._local_logs, RANK_LOG.format(rank=rank)), "a", encoding="utf-8"
            )
        fh.write(line)
        fh.flush()

    def _upload_logs(self) -> None:
        """Append the remote run directory's buffered lines to its rank files (whole rewrite)."""
        assert self.log_dir is not None
        for rank, lines in self._remote_lines.items():
            uri = storage.join(self.log_dir, RANK_LOG.format(rank=rank))
            try:
                earlier = storage.read_file(uri) if storage.path_exists(uri) else b""
                storage.write_file(uri, earlier + "".join(lines).encode())
            except Exception as exc:  # logs must never fail a run
                log.warning("sparkdl: could not write the worker log %s (%s)", uri, exc)
        self._remote_lines.clear()

    def _eta(self, step: int, total: int) -> float | None:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
            return None
        t0, s0 = self._first
        if step <= s0 or now <= t0:
            return None
        return (total - step) * (now - t0) / (step - s0)

    def _progress(self, frame: dict[str, Any]) -> None:
        step, total = int(frame.get("step", 0)), int(frame.get("total", 0))
        eta = self._eta(step, total)
        if self.interactive:
            self._update_bar(frame, step, total)
            return
        now = time.monotonic()
        self._last_frame = frame
        self._printed_last = False
        if frame.get("epoch_end") or now - self._last_line >= self.log_interval_s:
            progress_log.info("%s", format_progress(self.name, frame, eta))
            self._last_line = now
            self._printed_last = True

    def _update_bar(self, frame: dict[str, Any], step: int, total: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm(loggers=_console_loggers())
            self._redirect.__enter__()
            with warnings.catch_warnings():  # a notebook without ipywidgets: a text bar, quietly
                warnings.simplefilter("ignore")
                self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)
        bar = self._bar
        epoch, epochs = int(frame.get("epoch", 0)), int(frame.get("epochs", 1))
        bar.set_description(f"{self.name} epoch {epoch + 1}/{epochs}", refresh=False)
        postfix = {}
        if frame.get("loss") is not None:
            postfix["loss"] = f"{float(frame['loss']):.4g}"
        if frame.get("seconds"):
            rate = float(frame.get("samples", 0)) / float(frame["seconds"])
            postfix["samples/s"] = f"{rate:,.0f}"
        bar.set_postfix(postfix, refresh=False)
        if total and bar.total != total:
            bar.total = total
        bar.update(max(0, step - bar.n))

    def close(self) -> None:
        """Close the bar and the log files, restore logging; never raises."""
        with self._lock:
            try:
                if not self._printed_last and self._last_frame is not None:
                    progress_log.info("%s", format_progress(self.name, self._last_frame, None))
                if self._bar is not None:
                    self._bar.close()
                if self._redirect is not None:
                    self._redirect.__exit__(None, None, None)
            except Exception as exc:
                log.debug("closing the progress display failed: %s", exc)
            self._bar = self._redirect = None
            for fh in self._files.values():
                with contextlib.suppress(OSError):
                    fh.close()
            self._files.clear()
            if self._remote_lines:
                self._upload_logs()
            _restore(self._restore)
            self._restore = []


def _console_loggers() -> list[logging.Logger]:
    """The loggers on a record's way from ``sparkdl.workers`` to the root that print to a
    console: only their console handlers go through tqdm. (Redirecting a logger without one
    gives it a tqdm handler, and a propagating record is then printed once per logger.)"""
    found = []
    for logger in (workers_log, progress_log, log, logging.getLogger()):
        if any(
            isinstance(h, logging.StreamHandler)
            and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
            for h in logger.handlers
        ):
            found.append(logger)
    return found


class SparkPhaseProgress:
    """(driver) Progress of the Spark jobs of one phase (e.g. materialize's), shown like
    training's: a tqdm bar of tasks done when interactive, else a ``sparkdl.progress`` line at
    most every ``log_interval_s`` and when the phase ends. Reads the task counts of the job
    group ``handle`` through ``side`` (:class:`sparkdl.session.SparkSide`) from a daemon thread
    once a second; Spark Connect shows none, so there one line says the phase started and one
    that it ended. Nothing it does can fail the phase.

    Use as a context manager around the phase: ``with SparkPhaseProgress(side, handle,
    "digits: materialize"): ...``.
    """

    def __init__(
        self,
        side: Any,
        handle: str,
        label: str,
        *,
        enabled: bool = True,
        interactive: bool | None = None,
        log_interval_s: float = 10.0,
        poll_s: float = 1.0,
    ) -> None:
        self.side, self.handle, self.label = side, handle, label
        self.enabled = enabled
        self.interactive = is_interactive() if interactive is None else bool(interactive)
        self.log_interval_s, self.poll_s = log_interval_s, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._last_line = 0.0
        self._shown: tuple[int, int] = (0, 0)
        self._restore: list[tuple[logging.Logger, logging.Handler, int]] = []
        self._started = 0.0

    def __enter__(self) -> SparkPhaseProgress:
        if self.enabled:
            self._restore = _show_on_stderr()
            self._started = time.monotonic()
            if self.side.tasks(self.handle) is None:
                progress_log.info("%s: running (Spark Connect shows no task progress)", self.label)
            self._thread = threading.Thread(target=self._run, name="sparkdl-phase", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if self.side.tasks(self.handle) is None and exc[0] is None:
                progress_log.info(
                    "%s: done in %.1f s", self.label, time.monotonic() - self._started
                )
            self._show(final=exc[0] is None)
            if self._bar is not None:
                self._bar.close()
        _restore(self._restore)

    def tasks(self) -> tuple[int, int]:
        """(tasks done, tasks known) over the phase's jobs so far; (0, 0) when not visible."""
        counts = self.side.tasks(self.handle)
        return (0, 0) if counts is None else (counts[1], counts[2])

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with contextlib.suppress(Exception):
                self._show(final=False)

    def _show(self, final: bool) -> None:
        done, total = self.tasks()
        if not total or (done, total) == self._shown and not final:
            return
        self._shown = (done, total)
        if self.interactive:
            if self._bar is None:
                from tqdm.auto import tqdm

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._bar = tqdm(desc=self.label, unit="task", leave=True)
            self._bar.total = total
            self._bar.update(max(0, done - self._bar.n))
            return
        now = time.monotonic()
        if final or now - self._last_line >= self.log_interval_s:
            progress_log.info("%s: %d/%d Spark tasks done", self.label, done, total)
            self._last_line = now


def _show_on_stderr() -> list[tuple[logging.Logger, logging.Handler, int]]:
    """When nothing shows the workers' and progress loggers' records (no handler anywhere: a
    bare script or notebook), print them on stderr; returns what :func:`_restore` undoes."""
    if workers_log.hasHandlers():
        return []
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    added: list[tuple[logging.Logger, logging.Handler, int]] = []
    for logger in (workers_log, progress_log):
        added.append((logger, handler, logger.level))
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    return added


def _restore(added: list[tuple[logging.Logger, logging.Handler, int]]) -> None:
    for logger, handler, level in added:
        logger.removeHandler(handler)
        logger.setLevel(level)
