"""[worker] All-reduce data parallelism: DistributedDataParallel, the default strategy.

Gradients are averaged across ranks during backward, bucket by bucket, through a counting
communication hook: plain fp32, or compressed (``compression="fp16" | "bf16" | "powersgd"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sparkdl.config import AllReduceOptions
from sparkdl.sync.base import SyncStrategy
from sparkdl.sync.compression import counting_hook

__all__ = ["AllReduceStrategy", "ddp"]


def ddp(module: nn.Module, device: str, **kwargs: Any) -> Any:
    """(all ranks) ``module`` in DistributedDataParallel (which broadcasts rank 0's parameters)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=device_ids, **kwargs)


class AllReduceStrategy(SyncStrategy):
    """DDP: every rank holds a replica; gradients are all-reduced each step."""

    name = "allreduce"

    def __init__(self, env: Any, options: AllReduceOptions | None = None) -> None:
        super().__init__(env, options or AllReduceOptions())

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) Wrap in DDP with the counting hook when distributed."""
        self._module = self._wrapped = module
        if not self.env.distributed:
            return module
        options = self.options
        wrapped = ddp(
            module,
            self.env.device,
            find_unused_parameters=options.find_unused_parameters,
            static_graph=options.static_graph,
            gradient_as_bucket_view=options.gradient_as_bucket_view,
            **({} if options.bucket_cap_mb is None else {"bucket_cap_mb": options.bucket_cap_mb}),
        )
        state, hook = counting_hook(self, self.options.compression)
        wrapped.register_comm_hook(state, hook)
        self._wrapped = wrapped
        return wrapped
