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

import logging
from collections.abc import Callable
from typing import Any

from sparkdl._checks import expect_int
from sparkdl.errors import WorkerGroupError, promote
from sparkdl.rundir.checkpoints import claimed_attempt, latest_step

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
    make_monitor: Callable[[], Any] | None = None,
    on_failure: Callable[[int, WorkerGroupError], None] | None = None,
    name: str | None = None,
    feed_dir: str | None = None,
) -> tuple[list[Any], int]:
    """(driver) ``distributor.launch(fn, args)`` until it succeeds or restarts run out.

    Returns the ranks' results and the attempt that produced them. ``on_failure(attempt,
    error)`` is called for every failed attempt (e.g. to record it in run.json);
    ``make_monitor()`` gives each attempt a fresh driver-side monitor (the launch owns it);
    ``feed_dir`` is the run directory's feed, for workers that cannot reach the driver channel.
    """
    expect_int("max_restarts", max_restarts, "Use 0 to never restart", low=0)
    previous: frozenset | None = None
    progress = latest_step(run_dir)
    claimed = claimed_attempt(run_dir)  # a run resumed after its driver died mid-attempt
    if claimed is not None and claimed >= first_attempt:
        first_attempt = claimed + 1
    for tries in range(max_restarts + 1):
        attempt = first_attempt + tries
        if tries:
            _wait_for_slots(distributor)
        try:
            monitor = make_monitor() if make_monitor is not None else None
            results = distributor.launch(
                fn, args, {}, attempt=attempt, name=name, monitor=monitor, feed_dir=feed_dir
            )
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
            log.warning(
                "sparkdl: attempt %d failed (%s); restarting (%d of %d) from %s",
                attempt,
                exc.headline,
                tries + 1,
                max_restarts,
                f"the checkpoint at step {step}" if step is not None else "the start",
            )
    raise AssertionError("unreachable")  # pragma: no cover


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
