"""[worker] Small collectives on plain values, shared by the worker loop and checkpoints.

Each one is an identity in a world of one (no process group needed) and moves tensors on the
CPU, or on the rank's GPU with nccl.
"""

from __future__ import annotations

import torch

from sparkdl.context import WorkerEnv

__all__ = ["all_reduce_sum", "all_reduce_max", "gather_bytes", "broadcast_int"]


def all_reduce_sum(values: list[float], env: WorkerEnv) -> list[float]:
    """(all ranks) Element-wise sum of ``values`` over ranks; identity in a world of one."""
    if not env.distributed:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(env))
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def all_reduce_max(value: int, env: WorkerEnv) -> int:
    """(all ranks) The largest ``value`` over ranks; identity in a world of one."""
    if not env.distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device(env))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _collective_device(env: WorkerEnv) -> torch.device:
    return torch.device(env.device) if env.backend == "nccl" else torch.device("cpu")


def gather_bytes(data: bytes, env: WorkerEnv) -> list[bytes]:
    """(all ranks) Every rank's ``data``, by rank; plain bytes over all_gather (no pickle)."""
    if not env.distributed:
        return [data]
    import torch.distributed as dist

    device = _collective_device(env)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(env.world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    padded = padded.to(device)
    out = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(out, padded)
    return [t.cpu().numpy()[: int(s.item())].tobytes() for t, s in zip(out, sizes)]


def broadcast_int(value: int, env: WorkerEnv) -> int:
    """(all ranks) The chief's ``value`` on every rank."""
    if not env.distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device(env))
    dist.broadcast(tensor, src=0)
    return int(tensor.item())
