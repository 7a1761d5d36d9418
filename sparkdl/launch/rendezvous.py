"""[task] The thin adapter between a launcher and the worker: BarrierTaskContext → WorkerEnv → fn.

This is the only module that reads ``BarrierTaskContext`` and the only one that reads or writes
environment variables (the torch ``MASTER_ADDR``/``RANK``/... set around the user's function).
Both launchers use it: a Spark barrier task calls :func:`barrier_task`, a local process
:func:`local_process_main`. torch is imported only inside the functions that run on a worker,
so the driver can import this module without paying for torch.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sparkdl.channel.client import gather as channel_gather
from sparkdl.errors import ConfigError, RankFailure, RendezvousError, is_peer_loss

if TYPE_CHECKING:
    from sparkdl.context import WorkerEnv

__all__ = [
    "BARRIER_SCHEMA",
    "LaunchOptions",
    "RankOutcome",
    "arrow_barrier_task",
    "barrier_task",
    "build_worker_env",
    "build_local_env",
    "free_port",
    "local_process_main",
    "rendezvous",
    "run_rank",
    "torch_env_vars",
]

PEER_LOSS_GRACE_S = 1.5
"""How long a rank whose error only says "a peer went away" waits before reporting it, so the
peer's own (original) error reaches the driver first and names the rank that really failed."""


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """What every task of one launch needs besides the user's payload; small and picklable."""

    num_workers: int
    """World size."""
    use_gpu: bool = False
    """Pick the device from the task's Spark ``gpu`` resource (``cuda:<first address>``)."""
    backend: str = "gloo"
    """torch.distributed backend, already resolved (gloo or nccl)."""
    collective_timeout_s: float = 120.0
    """Process-group timeout (WorkerEnv.timeout_s)."""
    task_cpus: int = 1
    """spark.task.cpus as seen by the driver; the fallback for torch threads in a task."""
    attempt: int = 0
    """Launch attempt number (restarts count up)."""
    run_token: str = ""
    """Per-run token for the driver's channel (empty: none)."""
    channel_addr: str = ""
    """host:port of the driver's channel (empty: none)."""
    feed_dir: str = ""
    """The run-directory feed for workers that cannot reach the channel (empty: none)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values passed through to WorkerEnv.extra."""


@dataclass(frozen=True)
class RankOutcome:
    """What one rank hands back: its pickled return value, or its failure."""

    rank: int
    value: bytes | None = None
    failure: RankFailure | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _host_of(address: str) -> str:
    """Host part of a Spark task address ``host:port`` (IPv6 ``[::1]:port`` too)."""
    if address.startswith("["):
        return address[1 : address.index("]")]
    return address.rsplit(":", 1)[0] if ":" in address else address


def build_worker_env(
    *,
    rank: int,
    task_addresses: Sequence[str],
    chief_port: int,
    gpu_addresses: Sequence[str],
    cpus: int,
    options: LaunchOptions,
) -> WorkerEnv:
    """Pure mapping from what a barrier task sees to its WorkerEnv.

    ``task_addresses`` are the ``host:port`` of every task, by partition id (= rank); the chief
    (rank 0) hosts the store on ``chief_port``. local_rank is this task's index among the tasks
    on the same host. With ``use_gpu`` the first assigned GPU address names the CUDA device.
    """
    from sparkdl.context import WorkerEnv

    world = len(task_addresses)
    if world != options.num_workers or not 0 <= rank < world:
        raise RendezvousError(
            f"rank must be in [0, {options.num_workers}), got rank {rank} among {world} tasks. "
            "This is a bug in sparkdl's launcher; please report it."
        )
    hosts = [_host_of(a) for a in task_addresses]
    same_host = [r for r, h in enumerate(hosts) if h == hosts[rank]]
    if options.use_gpu:
        if not gpu_addresses:
            raise RendezvousError(
                f"use_gpu needs a Spark 'gpu' resource per task, got none on rank {rank}. "
                "Set spark.task.resource.gpu.amount and the executors' GPU discovery."
            )
        device = f"cuda:{gpu_addresses[0]}"
    else:
        device = "cpu"
    return WorkerEnv(
        rank=rank,
        world_size=world,
        local_rank=same_host.index(rank),
        master_addr=hosts[0],
        master_port=chief_port if world > 1 else 0,
        backend=options.backend,
        device=device,
        timeout_s=options.collective_timeout_s,
        num_threads=max(1, int(cpus)),
        attempt=options.attempt,
        run_token=options.run_token,
        channel_addr=options.channel_addr,
        feed_dir=options.feed_dir,
        extra={**options.extra, "local_world_size": len(same_host)},
    )


def build_local_env(rank: int, port: int, options: LaunchOptions, threads: int) -> WorkerEnv:
    """WorkerEnv of a local (no-Spark) process: every rank on 127.0.0.1, the parent's port."""
    addresses = ["127.0.0.1:0"] * options.num_workers
    return build_worker_env(
        rank=rank,
        task_addresses=addresses,
        chief_port=port,
        gpu_addresses=[str(rank)] if options.use_gpu else [],
        cpus=threads,
        options=options,
    )


def _task_cpus(ctx: Any, options: LaunchOptions) -> int:
    """CPUs Spark gave this task: ctx.cpus() (Spark ≥ 3.3), else the driver's spark.task.cpus."""
    try:
        return max(1, int(ctx.cpus()))
    except Exception:
        value = ctx.getLocalProperty("spark.task.cpus")
        return max(1, int(value)) if value else options.task_cpus


def rendezvous(ctx: Any, options: LaunchOptions) -> WorkerEnv:
    """(all ranks) Meet the other tasks of the barrier stage and describe this rank's place.

    The chief binds port 0 on its task address to pick a free port; one gather spreads it.
    Touches neither torch.distributed nor CUDA, so it is testable with fake GPUs on CPU.
    """
    rank = ctx.partitionId()
    addresses = [info.address for info in ctx.getTaskInfos()]
    resources = ctx.resources()
    gpus = list(resources["gpu"].addresses) if "gpu" in resources else []
    port = free_port(_host_of(addresses[0])) if rank == 0 and len(addresses) > 1 else 0
    message = {"rank": rank, "port": port, "gpus": gpus, "hostname": socket.gethostname()}
    gathered = _all_gather(ctx, options, rank, len(addresses), message)
    return build_worker_env(
        rank=rank,
        task_addresses=addresses,
        chief_port=int(gathered[0]["port"]),
        gpu_addresses=gpus,
        cpus=_task_cpus(ctx, options),
        options=options,
    )


def _all_gather(ctx: Any, options: LaunchOptions, rank: int, world: int, message: dict) -> list:
    """(all ranks) Every rank's message, in rank order.

    Through the driver channel when there is one: Spark's ``allGather`` polls its result once a
    second, so it costs ~1 s of every launch. The driver answers every rank of a stage attempt
    alike, the gathered messages or "fall back", so either all ranks use the channel or all call
    ``allGather`` (a channel that fails only for some ranks makes the driver say fall back).
    A retried stage attempt reuses the key; the driver forgets a completed gather, so it meets
    afresh.
    """
    if world > 1 and options.channel_addr:
        key = str(ctx.stageId())
        gathered = channel_gather(
            options.channel_addr,
            options.run_token,
            key=key,
            rank=rank,
            world=world,
            message=message,
        )
        if gathered is not None:
            return gathered
    return [json.loads(m) for m in ctx.allGather(json.dumps(message))]


@contextmanager
def torch_env_vars(env: WorkerEnv) -> Iterator[None]:
    """Set torch's conventional variables (RANK, MASTER_ADDR, ...) for user code; restore after."""
    values = {
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.extra.get("local_world_size", 1)),
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def unpickle_payload(cloudpickle: Any, payload: bytes) -> Any:
    """The launched function and its arguments; ConfigError when they cannot be unpickled here.

    That failure is deterministic (a module the executors cannot import, such as a helper file
    beside a notebook, or a package version that differs from the driver's), so it is a
    ConfigError, which the driver raises at once instead of restarting the group.
    """
    try:
        return cloudpickle.loads(payload)
    except Exception as exc:
        missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
        what = f"the module {missing!r}" if missing else "what the function needs"
        raise ConfigError(
            f"the launched function and its arguments must unpickle on the executors, got "
            f"{type(exc).__name__}: {exc}. The executors cannot load {what}: ship the module "
            "with spark.sparkContext.addPyFile(path) (or --py-files; on Spark Connect "
            "spark.addArtifacts(path, pyfile=True)), or pickle it by value "
            "with cloudpickle.register_pickle_by_value(module) before fit/run, or install it "
            "(at the driver's version) on the executors"
        ) from exc


def run_rank(
    rank: int,
    make_env: Callable[[], WorkerEnv],
    payload: bytes,
    on_joined: Callable[[], None] | None = None,
) -> RankOutcome:
    """(all ranks) Build the env, join the group, run the payload; never raises.

    A failure becomes a RankFailure with the original traceback. One that only says a peer went
    away is held back for PEER_LOSS_GRACE_S so the peer's original error is reported first.
    """
    try:
        from pyspark import cloudpickle

        from sparkdl.context import worker_group

        env = make_env()
        fn, args, kwargs = unpickle_payload(cloudpickle, payload)
        with torch_env_vars(env), worker_group(env):
            if on_joined is not None:
                on_joined()
            value = fn(*args, **kwargs)
        return RankOutcome(rank, value=cloudpickle.dumps(value))
    except (Exception, SystemExit) as exc:
        if is_peer_loss(exc):
            time.sleep(PEER_LOSS_GRACE_S)
        return RankOutcome(rank, failure=RankFailure.from_exception(rank, exc))


def barrier_task(options: LaunchOptions, payload: bytes, _rows: Iterator[Any]) -> Iterator[Any]:
    """Body of each barrier task (module-level, so Spark pickles it by reference).

    Yields one ``(rank, pickled value)``; a failure is raised as a RuntimeError whose message is
    the rank's encoded RankFailure, which survives Spark's wrapping up to the driver.
    """
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    rank = ctx.partitionId()
    outcome = run_rank(rank, lambda: rendezvous(ctx, options), payload)
    if outcome.failure is not None:
        raise RuntimeError(outcome.failure.encode())
    yield (rank, outcome.value)


BARRIER_SCHEMA = "rank int, value binary"
"""The rows of the barrier stage: one per rank, its pickled return value."""


def arrow_barrier_task(
    options: LaunchOptions, payload: bytes, batches: Iterator[Any]
) -> Iterator[Any]:
    """Body of each task of the ``mapInArrow(..., barrier=True)`` stage (classic and Spark
    Connect sessions alike): :func:`barrier_task` with its one row as an Arrow record batch of
    :data:`BARRIER_SCHEMA`."""
    import pyarrow as pa

    for _ in batches:  # the input is one row per task, read only to drain the stream
        pass
    for rank, value in barrier_task(options, payload, iter(())):
        yield pa.RecordBatch.from_arrays(
            [pa.array([rank], pa.int32()), pa.array([value], pa.binary())],
            names=["rank", "value"],
        )


def local_process_main(
    rank: int, port: int, threads: int, options: LaunchOptions, payload: bytes, conn: Any
) -> None:
    """Entry point of one local (spawned) process: report "joined", then the RankOutcome."""

    def joined() -> None:
        conn.send(("joined", rank))

    outcome = run_rank(
        rank, lambda: build_local_env(rank, port, options, threads), payload, on_joined=joined
    )
    try:
        conn.send(("done", outcome))
    finally:
        conn.close()
