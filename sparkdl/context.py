"""[worker] The worker's view of its group: WorkerEnv, the process group's life, and get_context().

Pure torch: runs in a Spark barrier task, in a local process, or in a unit test alike.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sparkdl.channel.client import forward_logs
from sparkdl.errors import PeerLostError, RendezvousError

__all__ = ["WorkerEnv", "WorkerContext", "get_context", "worker_group", "barrier"]

log = logging.getLogger("sparkdl")


@dataclass(frozen=True, kw_only=True)
class WorkerEnv:
    """Where this worker stands in its group; built by the rendezvous, read by everything else."""

    rank: int = 0
    """Global rank, 0 ≤ rank < world_size."""
    world_size: int = 1
    """Number of workers in the group."""
    local_rank: int = 0
    """Rank among the workers on the same host."""
    master_addr: str = "127.0.0.1"
    """Address of the chief's rendezvous store."""
    master_port: int = 0
    """Port of the chief's rendezvous store (0 only when world_size == 1)."""
    backend: str = "gloo"
    """torch.distributed backend: gloo (CPU) or nccl (GPU)."""
    device: str = "cpu"
    """torch device string for this worker, e.g. "cpu" or "cuda:1"."""
    timeout_s: float = 120.0
    """Timeout of every collective; a dead peer fails the group within it."""
    num_threads: int = 0
    """torch intra-op threads for this worker (0 leaves torch's default)."""
    attempt: int = 0
    """Launch attempt this group belongs to (0 first; restarts count up)."""
    run_token: str = ""
    """Per-run random token shared with the driver's channel (empty: no channel)."""
    channel_addr: str = ""
    """host:port of the driver's progress channel (empty: none)."""
    feed_dir: str = ""
    """Where this rank writes progress and log frames when the channel cannot be reached: the
    run directory's ``logs/feed/attempt-N`` (empty: none; see :mod:`sparkdl.channel.feed`)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chief(self) -> bool:
        """The one rank that performs side effects done once per group (writes, logs of record)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class WorkerContext:
    """What user code sees through :func:`sparkdl.get_context` inside a launched function."""

    env: WorkerEnv

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def device(self) -> torch.device:
        return torch.device(self.env.device)

    @property
    def is_chief(self) -> bool:
        return self.env.is_chief


_current: WorkerContext | None = None


def get_context() -> WorkerContext:
    """The running worker's context; outside a launched function, a world of one on CPU."""
    return _current if _current is not None else WorkerContext(WorkerEnv())


@contextmanager
def worker_group(env: WorkerEnv) -> Iterator[WorkerContext]:
    """(all ranks) Form the process group described by ``env``, expose it via get_context(), tear down.

    With world_size 1 no process group is formed, so every worker piece runs without one. With
    a driver channel (``env.channel_addr``) or a run-directory feed (``env.feed_dir``), log
    records and progress go to the driver meanwhile.
    """
    with forward_logs(env.channel_addr, env.run_token, env.rank, env.feed_dir):
        with _process_group(env) as context:
            yield context


@contextmanager
def _process_group(env: WorkerEnv) -> Iterator[WorkerContext]:
    global _current
    if env.num_threads > 0:
        torch.set_num_threads(env.num_threads)
    if env.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(env.device))
    formed = False
    if env.distributed:
        import torch.distributed as dist

        try:
            dist.init_process_group(
                backend=env.backend,
                store=_store(env),
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=env.timeout_s),
            )
        except Exception as exc:  # rewrap with where we tried to meet
            if _peer_left(exc):  # a peer joined, then failed and left: its error comes first
                raise PeerLostError(
                    f"rank {env.rank} lost a peer while joining the process group at "
                    f"{env.master_addr}:{env.master_port}: {exc}"
                ) from exc
            raise RendezvousError(
                f"rank {env.rank} could not join the process group at "
                f"{env.master_addr}:{env.master_port} within {env.timeout_s:.0f} s: {exc}"
            ) from exc
        formed = True
    previous, _current = _current, WorkerContext(env)
    try:
        yield _current
    finally:
        _current = previous
        if formed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _peer_left(exc: BaseException) -> bool:
    """Whether joining failed because a peer's connection closed (it joined, then left), not
    because a peer never came (a timeout: a rendezvous problem of its own)."""
    text = str(exc).lower()
    return any(
        hint in text
        for hint in ("connection closed by peer", "connection reset by peer", "broken pipe")
    )


def _store(env: WorkerEnv) -> Any:
    """(all ranks) The group's TCPStore; the chief's server listens on ``master_addr`` only.

    torch's own TCPStore server binds every interface; handing it a socket already bound to the
    chief's task address (the host's Spark address) keeps it off the others.
    """
    import socket

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=env.timeout_s)
    if not env.is_chief:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, False, timeout)
    family = socket.AF_INET6 if ":" in env.master_addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((env.master_addr, env.master_port))
        sock.listen(max(128, env.world_size))
    except OSError:
        sock.close()
        raise
    # detach: the store owns the descriptor from here on (Python must not close it under it)
    return dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        True,
        timeout,
        master_listen_fd=sock.detach(),
    )


def barrier() -> None:
    """(all ranks) Wait for every rank; a no-op in a world of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def call_in_group(env: WorkerEnv, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """(all ranks) Run ``fn(*args, **kwargs)`` inside the group described by ``env``."""
    with worker_group(env):
        return fn(*args, **kwargs)
