"""[driver] Distributor: run a function on N workers as one Spark barrier stage (or locally).

The stage is ``mapInArrow(..., barrier=True)`` over one row per worker, on a classic and a Spark
Connect session alike (:mod:`sparkdl.session` holds what differs between the two).

Before any task starts, the driver runs the pre-launch checks of :mod:`sparkdl.launch.checks`
(worker count, dynamic allocation, task slots, the GPU amount per task). The stage's tasks run
``rendezvous.barrier_task``; a failed rank's error comes back as a marker in Spark's error text
and is raised here as WorkerGroupError with that rank's original traceback.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

from sparkdl import storage
from sparkdl._checks import expect_int
from sparkdl.channel.feed import FeedPoller
from sparkdl.channel.server import ChannelServer
from sparkdl.errors import (
    ConfigError,
    RankFailure,
    RendezvousError,
    WorkerGroupError,
    is_peer_loss_failure,
)
from sparkdl.launch.checks import check_launch
from sparkdl.launch.progress import RunMonitor
from sparkdl.launch.rendezvous import BARRIER_SCHEMA, LaunchOptions, arrow_barrier_task
from sparkdl.session import SparkSide, spark_side

__all__ = [
    "Distributor",
    "LOOPBACK",
    "worker_group_error",
    "job_description",
    "launch_barrier",
    "spark_job_phase",
]

log = logging.getLogger("sparkdl")

_POLL_S = 0.1  # how often the start watch looks at the stage's tasks
_BACKENDS = ("gloo", "nccl")
LOOPBACK = "127.0.0.1"


class Distributor:
    """Run ``fn(*args, **kwargs)`` on ``num_workers`` workers that form one torch process group.

    Args:
        num_workers: world size: barrier tasks in Spark, or processes in local mode.
        use_gpu: give each worker the GPU Spark assigned to its task (``cuda:<address>``, nccl).
        backend: torch.distributed backend; default nccl with ``use_gpu``, else gloo.
        timeout_s: bound on the launch wait (executors and slots, all tasks started/joined).
        spark: the SparkSession to use, classic or Spark Connect (a server ≥ 3.5); default the
            active one (or a new one from the builder).
        local_mode: run plain processes on this machine instead of Spark (debugging, tests).
        collective_timeout_s: the process group's timeout; a dead or hung peer fails the group
            within it.
        channel: open the driver channel for each launch: workers' log lines and progress come
            to the driver, and the workers meet through it (Spark's allGather waits ≥ 1 s).
            False: no channel; logs stay on the executors and the workers meet by allGather.
        allow_unencrypted: launch even when the cluster turns on spark.ssl.enabled,
            spark.network.crypto.enabled, spark.io.encryption.enabled or spark.authenticate,
            although sparkdl's own traffic is not encrypted (see README, Security); one WARNING
            per launch says so. The Spark conf spark.sparkdl.allowUnencrypted=true does the same.
    """

    def __init__(
        self,
        num_workers: int = 2,
        *,
        use_gpu: bool = False,
        backend: str | None = None,
        timeout_s: float = 600,
        spark: Any = None,
        local_mode: bool = False,
        collective_timeout_s: float = 120,
        channel: bool = True,
        allow_unencrypted: bool = False,
    ) -> None:
        expect_int(
            "num_workers",
            num_workers,
            "Pass the number of workers (Spark tasks or local processes) to run",
        )
        resolved = backend or ("nccl" if use_gpu else "gloo")
        if resolved not in _BACKENDS:
            raise ConfigError(
                f"backend must be one of {_BACKENDS} or None, got {backend!r}. "
                "Leave it None to pick nccl with use_gpu and gloo otherwise."
            )
        for name, value in (
            ("timeout_s", timeout_s),
            ("collective_timeout_s", collective_timeout_s),
        ):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a number > 0, got {value!r}. Pass seconds.")
        self.num_workers = num_workers
        self.use_gpu = bool(use_gpu)
        self.backend = resolved
        self.timeout_s = float(timeout_s)
        self.spark = spark
        self.local_mode = bool(local_mode)
        self.collective_timeout_s = float(collective_timeout_s)
        self.channel = bool(channel)
        self.allow_unencrypted = bool(allow_unencrypted)

    def check(self) -> None:
        """(driver) Run the pre-launch checks now (slots, dynamic allocation, GPUs), launching nothing.

        A trainer calls this before it materializes data or writes a run directory, so a
        cluster that cannot host the workers fails in seconds, with nothing written.
        """
        if self.local_mode:
            return
        options = LaunchOptions(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            backend=self.backend,
            collective_timeout_s=self.collective_timeout_s,
        )
        check_launch(
            spark_side(self.spark),
            options,
            timeout_s=self.timeout_s,
            allow_unencrypted=self.allow_unencrypted,
        )

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """(driver) Run ``fn`` on every worker; each rank's return value, in rank order.

        Raises ConfigError before launch when the setup cannot work, WorkerGroupError when a
        rank fails (naming it, with its original traceback), RendezvousError when the workers
        cannot all start within ``timeout_s``.
        """
        return self.launch(fn, args, kwargs)

    def launch(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        attempt: int = 0,
        extra: dict[str, Any] | None = None,
        name: str | None = None,
        monitor: RunMonitor | None = None,
        feed_dir: str | None = None,
    ) -> list[Any]:
        """Like :meth:`run`, with the launch details a trainer passes: attempt, extra values for
        WorkerEnv.extra, ``name`` for the Spark job description, the ``monitor`` that shows
        what the workers send (default: their log lines, prefixed ``[rank N]``), and
        ``feed_dir``, a directory on storage the workers and the driver share (a run
        directory's ``logs/feed``): workers that cannot reach the driver channel report there
        instead (``feed_dir/attempt-N``; see :mod:`sparkdl.channel.feed`), and the driver
        polls it. The launch owns the monitor: it is started before the workers and closed
        after them."""
        from pyspark import cloudpickle

        payload = _pickle_payload(cloudpickle, fn, args, kwargs or {})
        side = None if self.local_mode else spark_side(self.spark)
        options = LaunchOptions(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            backend=self.backend,
            collective_timeout_s=self.collective_timeout_s,
            attempt=attempt,
            extra=dict(extra or {}),
        )
        if side is not None:
            warning = check_launch(
                side, options, timeout_s=self.timeout_s, allow_unencrypted=self.allow_unencrypted
            )
            if warning:
                log.warning("%s", warning)
            options = replace(options, task_cpus=side.task_cpus())
        if feed_dir:
            options = replace(options, feed_dir=storage.join(feed_dir, f"attempt-{attempt}"))
        monitor = (monitor or RunMonitor(progress=True)).start()
        poller = None
        try:
            host = side.driver_host() if side is not None else LOOPBACK
            with _open_channel(self.channel, host, monitor) as server:
                if server is not None:
                    options = replace(options, run_token=server.token, channel_addr=server.address)
                if options.feed_dir:
                    poller = _poll_feed(options, monitor)
                if side is None:
                    from sparkdl.launch.local import run_local

                    pickled = run_local(payload, options, self.timeout_s)
                else:
                    name = name or _run_name(fn, self.num_workers)
                    started = monitor.started_count if server or poller else None
                    pickled = launch_barrier(
                        side,
                        payload,
                        options,
                        name=name,
                        timeout_s=self.timeout_s,
                        started=started,
                    )
        except WorkerGroupError as exc:
            if poller is not None:
                poller.close()  # its last read may bring failures the workers reported
            raise with_reported_failures(exc, monitor.failures) from None
        finally:
            if poller is not None:
                poller.close()
            monitor.close()
        return [cloudpickle.loads(value) for value in pickled]


def _poll_feed(options: LaunchOptions, monitor: RunMonitor) -> FeedPoller:
    """(driver) Poll the launch's run-directory feed into ``monitor``; the first frame found
    there (a worker could not reach the channel) is logged once."""

    def first(rank: int) -> None:
        log.info(
            "sparkdl: rank %d reports through the run directory (%s): the workers cannot "
            "reach the driver channel%s",
            rank,
            options.feed_dir,
            f" at {options.channel_addr}" if options.channel_addr else "",
        )

    return FeedPoller(options.feed_dir, monitor.handle, on_first=first).start()


@contextmanager
def _open_channel(enabled: bool, host: str, monitor: RunMonitor) -> Iterator[ChannelServer | None]:
    """The launch's driver channel, or None when disabled or it cannot start (best effort)."""
    server = None
    if enabled:
        try:
            server = ChannelServer(host, monitor.handle)
        except OSError as exc:
            log.warning(
                "cannot open the driver channel on %s (%s); worker logs stay on the executors",
                host,
                exc,
            )
    try:
        yield server
    finally:
        if server is not None:
            server.close()


def _run_name(fn: Callable, num_workers: int) -> str:
    """What the Spark UI shows for the run's job, e.g. ``sparkdl: train (2 workers)``."""
    label = getattr(fn, "__name__", type(fn).__name__)
    return f"sparkdl: {label} ({num_workers} worker{'s' if num_workers != 1 else ''})"


def _pickle_payload(cloudpickle: Any, fn: Callable, args: tuple, kwargs: dict) -> bytes:
    if not callable(fn):
        raise ConfigError(f"fn must be callable, got {type(fn).__name__}. Pass a function.")
    try:
        return cloudpickle.dumps((fn, tuple(args), dict(kwargs)))
    except Exception as exc:
        raise ConfigError(
            f"fn and its arguments must be picklable, got {type(exc).__name__}: {exc}. "
            "Create unpicklable objects (sessions, locks, open files) inside fn instead."
        ) from exc


# ---------------------------------------------------------------- the barrier stage


def job_description(run: str, phase: str, detail: str = "") -> str:
    """What the Spark UI shows for a phase of a run, e.g. ``sparkdl digits: train (2 workers)``."""
    return f"sparkdl {run}: {phase}" + (f" ({detail})" if detail else "")


@contextmanager
def spark_job_phase(spark: Any, description: str) -> Iterator[str]:
    """(driver) Spark jobs started inside carry a fresh job group (classic) or job tag (Spark
    Connect) named after ``description``, shown in the Spark UI; yields it, e.g. to cancel.
    A classic session's previous group and description come back after."""
    with spark_side(spark).job_phase(description) as handle:
        yield handle


def launch_barrier(
    side: SparkSide,
    payload: bytes,
    options: LaunchOptions,
    *,
    name: str,
    timeout_s: float,
    started: Callable[[], int] | None = None,
) -> list[bytes]:
    """Run one barrier stage of ``options.num_workers`` tasks; pickled values in rank order.

    The stage is ``mapInArrow(..., barrier=True)`` over a frame of one row per task, so the
    same code runs on classic and Spark Connect sessions. ``name`` is the Spark job
    description or tag (see :func:`job_description`). The stage is cancelled when its tasks
    have not all started within ``timeout_s``: counted by the status tracker (classic), else
    by ``started()``, the ranks that reported in (Connect); with neither, nothing can tell,
    which is logged.
    """
    n = options.num_workers
    with side.job_phase(name) as handle, side.quiet_task_failure_logs():
        watch = _StartWatch(side, handle, n, timeout_s, started)
        watch.start()
        try:
            frame = side.spark.range(0, n, 1, n).mapInArrow(
                partial(arrow_barrier_task, options, payload), BARRIER_SCHEMA, barrier=True
            )
            rows = frame.collect()
        except Exception as exc:
            if watch.timed_out:
                raise RendezvousError(
                    f"the {n} barrier tasks must all start within timeout_s={timeout_s:g} s, "
                    "but they did not; the job was cancelled. Free task slots (other running "
                    "jobs?), or raise timeout_s."
                ) from None
            raise worker_group_error(exc) from None
        finally:
            watch.stop()
    values = {int(row["rank"]): bytes(row["value"]) for row in rows}
    return [values[r] for r in range(n)]


class _StartWatch(threading.Thread):
    """Cancels the stage if its tasks have not all started within the launch timeout."""

    def __init__(
        self,
        side: SparkSide,
        handle: str,
        num_tasks: int,
        timeout_s: float,
        started: Callable[[], int] | None,
    ) -> None:
        super().__init__(name="sparkdl-start-watch", daemon=True)
        self.side, self.handle, self.num_tasks = side, handle, num_tasks
        self.started = started
        self.deadline = time.monotonic() + timeout_s
        self.timed_out = False
        self._done = threading.Event()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5.0)

    def run(self) -> None:
        try:
            while not self._done.wait(_POLL_S):
                all_started = self._all_started()
                if all_started is None:
                    log.info(
                        "sparkdl: neither Spark Connect nor the workers can show whether the "
                        "%d tasks started (no driver channel, no run-directory feed); the "
                        "launch timeout cannot cancel a stage that waits for slots",
                        self.num_tasks,
                    )
                    return
                if all_started:
                    return
                if time.monotonic() > self.deadline:
                    self.timed_out = True
                    self.side.cancel(self.handle)
                    return
        except Exception as exc:  # the watch is a guard, never a cause of failure
            log.debug("start watch stopped: %s", exc)

    def _all_started(self) -> bool | None:
        counts = self.side.tasks(self.handle)
        if counts is not None:
            return counts[0] >= self.num_tasks
        if self.started is not None:
            return self.started() >= self.num_tasks
        return None


# ---------------------------------------------------------------- failure mapping

_LOST_TASK_RES = (
    # "Lost task 1.0 in stage 3.0 (TID 7) (host executor 1): <reason>"
    re.compile(r"Lost task (\d+)\.\d+ in stage [\d.]+ \(TID \d+\)[^:]*: ([^\n]*)"),
    # "barrier task ResultTask(0, 1) finished unsuccessfully.\n<reason>"
    re.compile(r"barrier task \w*Task\(\d+, (\d+)\) finished unsuccessfully\.?\s*\n?([^\n]*)"),
)


def with_reported_failures(
    error: WorkerGroupError, reported: list[RankFailure]
) -> WorkerGroupError:
    """``error`` with the failures that ranks reported through the driver channel and Spark's
    error left out (it names only the first failed task). A rank that only lost its peers is a
    consequence, not a failure of its own: it is added only when no rank has a real error."""
    known = {f.rank for f in error.failures}
    extra = [f for f in reported if f.rank not in known]
    if any(not is_peer_loss_failure(f) for f in error.failures + extra):
        extra = [f for f in extra if not is_peer_loss_failure(f)]
    if not extra:
        return error
    failures = sorted(error.failures + extra, key=lambda f: (is_peer_loss_failure(f), f.rank))
    return type(error)(failures, error.detail)


def worker_group_error(exc: BaseException) -> WorkerGroupError:
    """Map a failed Spark job's exception to WorkerGroupError with each rank's own failure.

    Without a rank marker (a Python worker or executor died), the detail names the lost task's
    partition, which is its rank, and Spark's reason.
    """
    text = _error_text(exc)
    failures = RankFailure.decode_all(text)
    if failures:
        return WorkerGroupError(failures)
    for pattern in _LOST_TASK_RES:
        lost = pattern.search(text)
        if lost:
            reason = lost.group(2).strip()[:500] or "no reason given"
            return WorkerGroupError(
                [], detail=f"rank {lost.group(1)} died without reporting an error: {reason}"
            )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return WorkerGroupError([], detail=" | ".join(lines[:3])[:1000])


def _error_text(exc: BaseException) -> str:
    """All the text of a (Py4J/PySpark) exception, Java side included."""
    parts = [str(exc)]
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            parts.append(str(java.toString()))
        except Exception:
            pass
    return "\n".join(parts)
