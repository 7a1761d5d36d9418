"""[worker] The small protocol every synchronization strategy implements.

A strategy owns how gradients or parameters travel between ranks. The training loop calls,
in order: ``wrap`` once, then per step ``forward``/``backward`` on the wrapped module,
``before_step`` (gradients are final after it), ``optimizer.step()``, ``after_step``;
``module_to_save`` gives the plain module whose ``state_dict`` is the model.
Every hook that communicates is called by all ranks the same number of times.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from sparkdl.launch.context import WorkerEnv

__all__ = ["SyncStrategy"]


class SyncStrategy:
    """Base strategy: a world of one, no communication. Subclasses override what they need."""

    name = "none"

    def __init__(self, env: WorkerEnv, options: dict[str, Any] | None = None) -> None:
        self.env = env
        self.options = dict(options or {})
        self.comm_bytes = 0
        """Bytes this rank sent so far, counted where the strategy hands data to the transport."""
        self._module: nn.Module | None = None

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) Prepare ``module`` (already on the device); returns the module to train."""
        self._module = module
        return module

    def before_step(self, step: int) -> None:
        """(all ranks) Called after backward, before optimizer.step()."""

    def after_step(self, step: int) -> None:
        """(all ranks) Called after optimizer.step()."""

    def module_to_save(self) -> nn.Module:
        """The unwrapped module whose state_dict is the model of record."""
        assert self._module is not None, "wrap() first"
        return self._module

    def teardown(self) -> None:
        """(all ranks) Release communication resources."""
