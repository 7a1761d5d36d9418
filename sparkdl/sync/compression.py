"""[worker] DDP communication hooks that count the bytes they hand to the all-reduce.

Each hook wraps PyTorch's own (``ddp_comm_hooks``): plain fp32, fp16/bf16 casts, PowerSGD.
Hook functions carry no annotations on purpose: DDP inspects them, and with postponed
annotations they are strings, which DDP rejects.
"""

from __future__ import annotations

from typing import Any

import torch

from sparkdl.sync.base import SyncStrategy

__all__ = ["counting_hook", "skip_allreduce"]


def counting_hook(strategy: SyncStrategy, compression: str | None, seed: int = 0) -> tuple:
    """``(state, hook)`` for ``DDP.register_comm_hook``: the all-reduce named by ``compression``
    (None, "fp16", "bf16", "powersgd"), with each payload counted on ``strategy``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if compression is None:
        return None, _plain(strategy)
    if compression in ("fp16", "bf16"):
        inner = (
            default_hooks.fp16_compress_hook
            if compression == "fp16"
            else default_hooks.bf16_compress_hook
        )

        def cast_hook(state, bucket):  # type: ignore[no-untyped-def]
            strategy.count("all_reduce", bucket.buffer().numel() * 2)
            return inner(state, bucket)

        return None, cast_hook
    if compression == "powersgd":
        return _powersgd(strategy, seed)
    raise ValueError(f"unknown compression {compression!r}")


def _plain(strategy: SyncStrategy) -> Any:
    import torch.distributed as dist

    def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        tensor = bucket.buffer()
        strategy.count("all_reduce", tensor.numel() * tensor.element_size())
        tensor.div_(dist.get_world_size())
        fut = dist.all_reduce(tensor, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    return counting_allreduce


def _powersgd(strategy: SyncStrategy, seed: int) -> tuple:
    """PyTorch's PowerSGD hook; bytes from its own accounting of what it all-reduces.

    Before ``start_powerSGD_iter`` the hook runs a plain all-reduce of the bucket. After it,
    PowerSGD adds, per bucket, the elements it all-reduces (the P and Q factors of compressed
    matrices plus the tensors it leaves uncompressed) to ``total_numel_after_compression``:
    the difference across one call is exactly that bucket's payload.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    opts = strategy.options
    state = powersgd.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=opts.powersgd_rank,
        start_powerSGD_iter=opts.powersgd_warmup_steps,
        use_error_feedback=True,
        warm_start=True,
        random_seed=seed,
    )

    # gloo completes collectives on its own threads, where PowerSGD chains a bucket's next
    # all-reduce (P, then Q): with several buckets in flight, ranks could issue them in
    # different orders (a collective mismatch that aborts the process). On gloo each bucket's
    # chain is therefore finished before the next bucket's starts; nccl orders them on its
    # stream already.
    serialize = torch.distributed.get_backend() == "gloo"

    def counting_powersgd(state, bucket):  # type: ignore[no-untyped-def]
        tensor = bucket.buffer()
        plain = state.iter < state.start_powerSGD_iter
        before = state.total_numel_after_compression
        fut = powersgd.powerSGD_hook(state, bucket)
        if serialize:
            fut.wait()
        numel = tensor.numel() if plain else state.total_numel_after_compression - before
        strategy.count("all_reduce", numel * tensor.element_size())
        return fut

    return state, counting_powersgd


def skip_allreduce(bucket: Any) -> torch.futures.Future:
    """A completed future holding the bucket's local gradients: no communication."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut
