"""[worker] All-reduce data parallelism: DistributedDataParallel, the default strategy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sparkdl.sync.base import SyncStrategy

__all__ = ["AllReduceStrategy"]


class AllReduceStrategy(SyncStrategy):
    """DDP: gradients averaged across ranks during backward, in buckets."""

    name = "allreduce"

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) Wrap in DDP (which broadcasts rank 0's parameters) when distributed."""
        self._module = module
        if not self.env.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = (
            [torch.device(self.env.device).index] if self.env.device.startswith("cuda") else None
        )
        ddp = DDP(module, device_ids=device_ids)
        self._register_byte_counter(ddp)
        return ddp

    def _register_byte_counter(self, ddp: Any) -> None:
        """Count bytes at the communication hook: the same all-reduce DDP does, plus a tally."""
        import torch.distributed as dist

        strategy = self

        # No annotations: DDP inspects them, and postponed annotations are strings.
        def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
            tensor = bucket.buffer()
            strategy.comm_bytes += tensor.numel() * tensor.element_size()
            tensor.div_(dist.get_world_size())
            fut = dist.all_reduce(tensor, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
