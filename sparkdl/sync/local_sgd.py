"""[worker] Local SGD: ranks step on their own and average parameters every ``sync_every`` steps.

PyTorch's post-local SGD recipe: DDP whose communication hook all-reduces gradients for the
first ``warmup_steps`` steps and then skips communication, plus periodic model averaging
(``torch.distributed.algorithms.model_averaging``) after every ``sync_every``-th local step.
Each rank keeps its own optimizer state; buffers (e.g. batch-norm statistics) stay local.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from sparkdl.config import LocalSGDOptions
from sparkdl.sync.allreduce import ddp
from sparkdl.sync.base import SyncStrategy
from sparkdl.sync.compression import counting_hook, skip_allreduce

__all__ = ["LocalSGDStrategy"]


class LocalSGDStrategy(SyncStrategy):
    """Gradient all-reduce during warm-up, then parameter averaging every ``sync_every`` steps."""

    name = "local_sgd"

    def __init__(self, env: Any, options: LocalSGDOptions | None = None) -> None:
        super().__init__(env, options or LocalSGDOptions())
        self._steps_done = 0
        self._local_steps = 0
        """Local steps since parameters were last averaged."""
        self.averages = 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) DDP with a hook that stops all-reducing gradients after warm-up."""
        self._module = self._wrapped = module
        if not self.env.distributed:
            return module
        # No buffer broadcast each forward: that would be communication the recipe avoids.
        wrapped = ddp(module, self.env.device, forward_sync_buffers=False)
        _, allreduce = counting_hook(self, None)
        strategy = self

        def warmup_then_local(state, bucket):  # type: ignore[no-untyped-def]
            if strategy._steps_done < strategy.options.warmup_steps:
                return allreduce(state, bucket)
            return skip_allreduce(bucket)

        wrapped.register_comm_hook(None, warmup_then_local)
        self._wrapped = wrapped
        return wrapped

    def after_step(self, step: int) -> None:
        """(all ranks) Average parameters after every ``sync_every``-th local step."""
        warm = self._steps_done < self.options.warmup_steps
        self._steps_done += 1
        if warm:
            return
        self._local_steps += 1
        if self._local_steps >= self.options.sync_every:
            self._average()

    def synchronize(self) -> None:
        """(all ranks) Average now if any local step happened since the last average."""
        if self._local_steps:
            self._average()

    def _average(self) -> None:
        """(all ranks) All-reduce the flattened parameters and divide by the world size."""
        self._local_steps = 0
        if not self.env.distributed:
            return
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        params = [p for p in self.module_to_save().parameters()]
        self.count("all_reduce", sum(p.numel() * p.element_size() for p in params))
        average_parameters(iter(params), process_group=None)  # type: ignore[arg-type]
        self.averages += 1

    def stats(self) -> dict[str, float]:
        return {"averages": float(self.averages)}
