"""[driver] No-Spark local mode: ``num_workers`` plain spawned processes on this machine.

For debugging and tests: each process forms the same gloo/nccl group a barrier task would, on
127.0.0.1 with a port the parent picked. The parent waits until every rank has joined (bounded
by ``timeout_s``), then for the results; when any rank fails or dies, it stops the others by
their PIDs at once and raises WorkerGroupError, like a failed barrier stage.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from multiprocessing.connection import wait
from typing import Any

from sparkdl.errors import RankFailure, RendezvousError, WorkerGroupError
from sparkdl.launch.rendezvous import (
    LaunchOptions,
    RankOutcome,
    free_port,
    local_process_main,
)

__all__ = ["run_local"]

log = logging.getLogger("sparkdl")

_JOIN_GRACE_S = 5.0
"""Slack on top of the process-group timeout for spawning interpreters and importing torch."""


def run_local(payload: bytes, options: LaunchOptions, timeout_s: float) -> list[bytes]:
    """Run the payload on ``options.num_workers`` spawned processes; pickled values by rank.

    Every rank must join its group within ``timeout_s`` (the launch wait); after that the run
    itself has no deadline beyond the process group's collective timeout.
    """
    n = options.num_workers
    port = free_port("127.0.0.1") if n > 1 else 0
    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    for rank in range(n):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=local_process_main,
            args=(rank, port, threads, options, payload, writer),
            name=f"sparkdl-rank-{rank}",
            daemon=True,
        )
        proc.start()
        writer.close()  # the child holds the only writer: EOF means it is gone
        procs.append(proc)
        conns.append(reader)
    finished = False
    try:
        values = _collect(procs, conns, timeout_s)
        finished = True
        return values
    finally:
        _stop(procs, grace_s=2.0 if finished else 0.0)
        for conn in conns:
            conn.close()


def _collect(procs: list[Any], conns: list[Any], timeout_s: float) -> list[bytes]:
    """Read every rank's messages until all are done, one fails, or the join deadline passes."""
    n = len(procs)
    joined: set[int] = set()
    values: dict[int, bytes] = {}
    open_conns = {conn: rank for rank, conn in enumerate(conns)}
    join_deadline = time.monotonic() + timeout_s
    while len(values) < n:
        wait_s = None if len(joined) == n else max(0.0, join_deadline - time.monotonic())
        ready = wait(list(open_conns), timeout=wait_s)
        if not ready:
            missing = sorted(set(range(n)) - joined)
            raise RendezvousError(
                f"ranks {missing} did not join the process group within timeout_s={timeout_s:g} s. "
                "Raise timeout_s, or check that 127.0.0.1 ports can be bound."
            )
        failures = []
        for conn in ready:
            rank = open_conns[conn]
            message = _receive(conn, rank, procs[rank])
            if message is None or message[0] == "done":
                del open_conns[conn]
            if message is None:
                failures.append(_crash_failure(rank, procs[rank]))
            elif message[0] == "joined":
                joined.add(rank)
            else:
                outcome: RankOutcome = message[1]
                joined.add(rank)
                if outcome.failure is not None:
                    failures.append(outcome.failure)
                else:
                    values[rank] = outcome.value or b""
        if failures:
            raise WorkerGroupError(failures)
    return [values[r] for r in range(n)]


def _receive(conn: Any, rank: int, proc: Any) -> tuple | None:
    """The next message from a rank, or None when its process is gone without one."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        proc.join(timeout=1.0)
        return None


def _crash_failure(rank: int, proc: Any) -> RankFailure:
    code = proc.exitcode
    return RankFailure(
        rank=rank,
        exc_type="ProcessExited",
        message=f"the process of rank {rank} (pid {proc.pid}) exited with code {code} "
        "before reporting a result",
        traceback="",
    )


def _stop(procs: list[Any], grace_s: float) -> None:
    """Stop every process still alive, by its own PID: after ``grace_s`` to exit on its own,
    terminate, then kill if it lingers."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in alive:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("rank process %s did not stop on SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.join(timeout=2.0)
    for proc in procs:
        if proc.exitcode is not None:
            proc.close()
