"""[driver] Restarts: launch the workers again when one dies, so training resumes from a checkpoint.

Spark never retries a barrier stage whose result goes to ``collect()``, so the driver does: when
an attempt fails with WorkerGroupError (a rank raised, a Python worker was killed, an executor
was lost, a collective timed out), :func:`run_with_restarts` waits for enough task slots and
starts a new barrier stage — a fresh rendezvous and port, the attempt number one higher — whose
workers resume from the latest complete checkpoint in the run directory.

It does not restart for failures that would repeat: a rank raising sparkdl's ConfigError,
DataError or CheckpointError (re-raised at once as WorkerConfigError / WorkerDataError /
WorkerCheckpointError), or the same failure (same ranks, types and messages) twice in a row
with no new checkpoint in between. After ``max_restarts`` restarts the last error is raised.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

from sparkdl import storage
from sparkdl._checks import expect_int
from sparkdl.errors import WorkerGroupError, promote
from sparkdl.launch.elastic import ElasticSizer, GrowWatch, SizeChange
from sparkdl.rundir.checkpoints import claimed_attempt, latest_step
from sparkdl.rundir.layout import RunLayout

__all__ = ["run_with_restarts", "failure_signature"]

log = logging.getLogger("sparkdl")


def failure_signature(error: WorkerGroupError) -> frozenset:
    """What identifies a failure across attempts: the failures' types and messages (which ranks
    report first varies from attempt to attempt), or the detail when no rank reported one."""
    if error.failures:
        return frozenset((f.exc_type, f.message) for f in error.failures)
    return frozenset([("detail", error.detail)])


def run_with_restarts(
    distributor: Any,
    fn: Callable[..., Any],
    args: tuple,
    *,
    run_dir: str,
    max_restarts: int,
    first_attempt: int = 0,
    make_monitor: Callable[[int], Any] | None = None,
    on_failure: Callable[[int, WorkerGroupError], None] | None = None,
    name: str | None = None,
    feed_dir: str | None = None,
    sizer: ElasticSizer | None = None,
    on_size: Callable[[SizeChange], None] | None = None,
) -> tuple[list[Any], int]:
    """(driver) ``distributor.launch(fn, args)`` until it succeeds or restarts run out.

    Returns the ranks' results and the attempt that produced them. ``on_failure(attempt,
    error)`` is called for every failed attempt (e.g. to record it in run.json);
    ``make_monitor(workers)`` gives each attempt a fresh driver-side monitor (the launch owns
    it); ``feed_dir`` is the run directory's feed, for workers that cannot reach the driver
    channel. With ``sizer`` (``num_workers=(min, max)``) each launch's size follows the task
    slots (see :mod:`sparkdl.launch.elastic`): smaller after a loss, larger when a running
    group stopped at a checkpoint to grow (that is not a restart); ``on_size`` hears each
    launch's :class:`SizeChange`.
    """
    expect_int("max_restarts", max_restarts, "Use 0 to never restart", low=0)
    previous: frozenset | None = None
    progress = latest_step(run_dir)
    claimed = claimed_attempt(run_dir)  # a run resumed after its driver died mid-attempt
    if claimed is not None and claimed >= first_attempt:
        first_attempt = claimed + 1
    attempt, tries = first_attempt, 0
    size = sizer.first_size() if sizer is not None else distributor.num_workers
    why = "start"
    while True:
        if tries and why != "grow":
            if sizer is None:
                _wait_for_slots(distributor)
            else:
                before, size = size, sizer.after_failure(size)
                why = "shrink" if size < before else "restart"
        launcher = _sized(distributor, size)
        if on_size is not None:
            on_size(SizeChange(attempt, size, latest_step(run_dir) or 0, why))
        try:
            monitor = make_monitor(size) if make_monitor is not None else None
            with _grow_watch(sizer, run_dir, attempt, size) as watch:
                results = launcher.launch(
                    fn, args, {}, attempt=attempt, name=name, monitor=monitor, feed_dir=feed_dir
                )
            if sizer is not None and any(getattr(r, "stopped_for_resize", False) for r in results):
                _clear_request(run_dir)
                size = watch.target or size
                sizer.changed()
                attempt, why = attempt + 1, "grow"
                continue
            return results, attempt
        except WorkerGroupError as exc:
            error = promote(exc)
            if on_failure is not None:
                on_failure(attempt, error)
            if error is not exc:
                raise error from None  # deterministic: a restart would fail the same way
            signature, step = failure_signature(exc), latest_step(run_dir)
            if tries == max_restarts:
                raise _gave_up(exc, tries + 1, f"max_restarts={max_restarts}") from None
            if signature == previous and step == progress:
                raise _gave_up(
                    exc, tries + 1, "the same failure twice with no new checkpoint between"
                ) from None
            previous, progress = signature, step
            tries += 1
            attempt, why = attempt + 1, "restart"
            if sizer is not None:
                sizer.changed()
            log.warning(
                "sparkdl: attempt %d failed (%s); restarting (%d of %d) from %s",
                attempt - 1,
                exc.headline,
                tries,
                max_restarts,
                f"the checkpoint at step {step}" if step is not None else "the start",
            )


def _sized(distributor: Any, size: int) -> Any:
    """``distributor`` launching ``size`` workers (a copy when the size differs)."""
    if distributor.num_workers == size:
        return distributor
    sized = copy.copy(distributor)
    sized.num_workers = size
    return sized


@contextlib.contextmanager
def _grow_watch(
    sizer: ElasticSizer | None, run_dir: str, attempt: int, size: int
) -> Iterator[GrowWatch | Any]:
    if sizer is None or sizer.side is None:
        yield _NO_WATCH
        return
    with GrowWatch(sizer, run_dir, attempt, size) as watch:
        yield watch


class _NoWatch:
    target = None


_NO_WATCH = _NoWatch()


def _clear_request(run_dir: str) -> None:
    path = RunLayout(run_dir).resize_request
    if storage.path_exists(path):
        storage.delete(path)


def _gave_up(error: WorkerGroupError, attempts: int, why: str) -> WorkerGroupError:
    note = f"gave up after {attempts} attempt(s): {why}"
    detail = f"{error.detail}; {note}" if error.detail else note
    return type(error)(error.failures, detail)


def _wait_for_slots(distributor: Any) -> None:
    """Before a restart: wait (up to the launch timeout) for executors to come back."""
    if getattr(distributor, "local_mode", True):
        return
    from sparkdl.launch.checks import check_slots
    from sparkdl.session import spark_side

    check_slots(
        spark_side(distributor.spark), distributor.num_workers, wait_s=distributor.timeout_s
    )
