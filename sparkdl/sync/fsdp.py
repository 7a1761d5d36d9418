"""[worker] Sharded data parallelism: FSDP2 ``fully_shard`` over every rank.

Parameters, gradients and optimizer state are split across ranks; each submodule's
parameters are all-gathered for its forward (and again for backward when
``reshard_after_forward``) and gradients reduce-scattered. Works on CPU with gloo.
Checkpoints are sharded (``torch.distributed.checkpoint``: each rank writes its own piece);
on a remote run directory (s3://, hdfs://, ...) each rank stages its pieces in a local temporary
directory and uploads them through :mod:`sparkdl.storage`, and a resume downloads the
checkpoint's pieces first (DCP may reshard, so a rank can need every piece). The final model is gathered into a plain state dict that loads into the unwrapped module.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from sparkdl import storage
from sparkdl.config import FSDPOptions
from sparkdl.errors import ConfigError
from sparkdl.rundir.model_dir import cpu_state
from sparkdl.sync.base import SyncStrategy

__all__ = ["FSDPStrategy"]


def _counting_comms(strategy: SyncStrategy) -> tuple[Any, Any]:
    """FSDP2's default all-gather and reduce-scatter, counting the bytes they move."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        DefaultAllGather,
        DefaultReduceScatter,
    )

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):  # type: ignore[no-untyped-def]
            strategy.count("all_gather", output_tensor.numel() * output_tensor.element_size())
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # type: ignore[no-untyped-def]
            strategy.count("reduce_scatter", input_tensor.numel() * input_tensor.element_size())
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()


class FSDPStrategy(SyncStrategy):
    """``fully_shard`` on each large direct child (``min_unit_params``), then on the root."""

    name = "fsdp"
    sharded_checkpoint = True

    def __init__(self, env: Any, options: FSDPOptions | None = None) -> None:
        super().__init__(env, options or FSDPOptions())

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) Shard ``module`` in place over a 1-D device mesh of every rank."""
        import torch.distributed as dist

        if not (self.env.distributed and dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                'strategy="fsdp" must run inside a process group, got a world of '
                f"{self.env.world_size} without one. Use num_workers ≥ 2, or "
                'strategy="allreduce" for a single worker'
            )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        device_type = torch.device(self.env.device).type
        mesh = init_device_mesh(device_type, (self.env.world_size,))
        reshard = self.options.reshard_after_forward
        for child in module.children():
            size = sum(p.numel() for p in child.parameters())
            if size and size >= self.options.min_unit_params:
                fully_shard(child, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(module, mesh=mesh)  # the root keeps its parameters for backward
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                all_gather, reduce_scatter = _counting_comms(self)
                sub.set_custom_all_gather(all_gather)
                sub.set_custom_reduce_scatter(reduce_scatter)
        self._module = self._wrapped = module
        return module

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """(all ranks) Accumulate unsharded gradients locally: no reduce-scatter until the batch
        that closes the optimizer step (FSDP2's ``set_requires_gradient_sync``)."""
        module = self.module_to_save()
        module.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # type: ignore[operator]

    def final_state_dict(self) -> dict[str, Any] | None:
        """(all ranks) Gather the full parameters; the chief gets them as plain CPU tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.module_to_save(),
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if not self.env.is_chief:
            return None
        # get_model_state_dict leaves non-tensor entries (get_extra_state) out: add them back.
        extra = {
            k: v
            for k, v in self.module_to_save().state_dict().items()
            if not isinstance(v, torch.Tensor)
        }
        return cpu_state({**state, **extra}) if extra else state

    def save_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) A sharded checkpoint: each rank writes its own shards into ``path``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module_to_save(), optimizer)
        with _local_dir(path, upload=True) as local:
            dcp.save({"model": model, "optimizer": optim}, checkpoint_id=local)

    def load_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) Load a sharded checkpoint into the sharded module and optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        module = self.module_to_save()
        model, optim = get_state_dict(module, optimizer)
        state: dict[str, Any] = {"model": model, "optimizer": optim}
        with _local_dir(path, upload=False) as local:
            dcp.load(state, checkpoint_id=local)
        set_state_dict(
            module,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )


@contextlib.contextmanager
def _local_dir(uri: str, *, upload: bool) -> Iterator[str]:
    """A local directory standing for the checkpoint directory ``uri``.

    Local ``uri``: itself. Remote: a temporary directory, filled first with every file under
    ``uri`` (to load), or whose files this rank wrote are uploaded on exit (to save).
    """
    path = storage.local_path(uri)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sparkdl-dcp-") as tmp:
        if not upload:
            for name in storage.list_dir(uri):
                with open(os.path.join(tmp, name), "wb") as fh:
                    fh.write(storage.read_file(storage.join(uri, name)))
        yield tmp
        if upload:
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as fh:
                    storage.write_file(storage.join(uri, name), fh.read())
