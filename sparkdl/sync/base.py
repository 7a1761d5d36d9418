"""[worker] The small protocol every synchronization strategy implements.

A strategy owns how gradients or parameters travel between ranks. The training loop (and
:func:`sparkdl.sync.prepare` for your own loop) calls, in order: ``wrap`` once,
``build_optimizer`` once; per step ``forward``/``backward`` on the wrapped module (or, where
``runs_schedule`` — the pipeline, whose forward and backward interleave across ranks —
``train_step``), ``before_step`` (gradients are final after it), ``optimizer.step()``,
``after_step``; at epoch ends ``synchronize``; at the end ``final_state_dict`` then
``teardown``. ``data_shard`` says which slice of the data a rank reads.
Every hook that communicates is called by all ranks the same number of times.

``comm_bytes`` counts the bytes this rank puts on the wire, counted where the strategy hands a
payload to the transport (compressed sizes, PowerSGD's P and Q, FSDP's shards, the parameter
server's messages), converted with the bandwidth-optimal (ring) cost of each collective:
all-reduce ``2(W-1)/W × payload``, all-gather ``(W-1)/W × gathered``, reduce-scatter
``(W-1)/W × input``, point-to-point ``payload``. With two workers an all-reduce costs its
payload once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from sparkdl.context import WorkerEnv
from sparkdl.rundir.model_dir import cpu_state

__all__ = ["SyncStrategy", "OptimizerFactory", "wire_bytes", "CHECKPOINT_FILE"]

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
"""``build(params) -> Optimizer``: how a strategy makes the optimizer over what it trains."""

CHECKPOINT_FILE = "model_optimizer.pt"
"""The single file a replicated strategy writes into a checkpoint directory."""


def wire_bytes(collective: str, payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends for ``collective`` of ``payload_bytes`` (ring algorithms)."""
    w = max(world_size, 1)
    if collective == "all_reduce":
        return (2 * (w - 1) * payload_bytes) // w
    if collective in ("all_gather", "reduce_scatter"):
        return ((w - 1) * payload_bytes) // w
    if collective == "send":
        return payload_bytes
    raise ValueError(f"unknown collective {collective!r}")


def _score(score_fn: Any, outputs: Any, labels: Any) -> torch.Tensor:
    return torch.zeros(()) if score_fn is None else score_fn(outputs, labels)


class SyncStrategy:
    """Base strategy: a world of one, no communication. Subclasses override what they need."""

    name = "none"
    synchronous = True
    """False when ranks step independently: the loop then reduces metrics only at epoch ends."""
    sharded_checkpoint = False
    """True when model and optimizer state live in pieces across ranks: checkpoints then go
    through :meth:`save_checkpoint` / :meth:`load_checkpoint` on every rank, not through the
    chief's ``module_to_save()`` and optimizer ``state_dict()``."""

    runs_schedule = False
    """True when the strategy runs forward and backward itself (:meth:`train_step`,
    :meth:`eval_step`): calling the wrapped module is then not a step (the pipeline)."""

    counts_rows = True
    """False on ranks whose rows another rank of the same data slice counts already (the
    pipeline's later stages): samples are summed over ranks."""

    def __init__(self, env: WorkerEnv, options: Any = None) -> None:
        self.env = env
        self.options = options
        """The strategy's options dataclass (see sparkdl.config.STRATEGY_OPTIONS)."""
        self.comm_bytes = 0
        """Bytes this rank sent so far (see the module docstring for how they are counted)."""
        self._count_lock = threading.Lock()
        self._module: nn.Module | None = None
        self._wrapped: nn.Module | None = None

    @property
    def data_shard(self) -> tuple[int, int]:
        """(index, count) of the data slice this rank reads: one per rank by default."""
        return self.env.rank, self.env.world_size

    def count(self, collective: str, payload_bytes: int, world_size: int | None = None) -> None:
        """Add one transfer to ``comm_bytes`` (thread-safe: hooks and server threads call it);
        ``world_size``: the group's size, when the collective runs on a subgroup."""
        sent = wire_bytes(collective, int(payload_bytes), world_size or self.env.world_size)
        with self._count_lock:
            self.comm_bytes += sent

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) Prepare ``module`` (already on the device); returns the module to train."""
        self._module = self._wrapped = module
        return module

    def build_optimizer(self, build: OptimizerFactory) -> torch.optim.Optimizer:
        """(all ranks) The optimizer the loop steps; by default over the wrapped parameters."""
        assert self._wrapped is not None, "wrap() first"
        return build(self._wrapped.parameters())

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """(all ranks) Context for the forward and backward of a batch whose gradients are
        accumulated, not yet synchronized: DDP's ``no_sync`` where the wrapped module is DDP,
        else nothing (the gradients are exchanged at the step anyway)."""
        no_sync = getattr(self._wrapped, "no_sync", None)
        return no_sync() if callable(no_sync) else contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """(all ranks) Clip the final gradients' total L2 norm to ``max_norm``; returns the norm
        before clipping. Called after :meth:`before_step`, when gradients are final; for
        sharded (DTensor) gradients torch reduces the norm over the shards' ranks."""
        assert self._wrapped is not None, "wrap() first"
        params = [p for p in self._wrapped.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full_tensor = getattr(norm, "full_tensor", None)  # a DTensor (FSDP2): the global norm
        return full_tensor() if callable(full_tensor) else norm

    def train_step(
        self,
        inputs: Any,
        labels: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        score_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(all ranks) Forward and backward of one batch: ``loss_fn(module(inputs), labels)``;
        returns the loss (detached) and ``score_fn(outputs, labels)`` (0 without one)."""
        outputs, loss = self._forward(inputs, labels, loss_fn)
        loss.backward()
        return loss.detach(), _score(score_fn, outputs, labels)

    def _forward(self, inputs: Any, labels: Any, loss_fn: Callable[[Any, Any], Any]) -> Any:
        """The wrapped module's outputs on ``inputs`` and their loss."""
        from sparkdl.data.inputs import call_model

        assert self._wrapped is not None, "wrap() first"
        outputs = call_model(self._wrapped, inputs)
        return outputs, loss_fn(outputs, labels)

    def eval_step(
        self,
        inputs: Any,
        labels: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        score_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(all ranks) :meth:`train_step` without gradients (call it under ``torch.no_grad()``)."""
        outputs, loss = self._forward(inputs, labels, loss_fn)
        return loss.detach(), _score(score_fn, outputs, labels)

    def before_step(self, step: int) -> None:
        """(all ranks) Called after backward, before optimizer.step()."""

    def after_step(self, step: int) -> None:
        """(all ranks) Called after optimizer.step()."""

    def synchronize(self) -> None:
        """(all ranks) Bring this rank's module to the model of record (e.g. before evaluation)."""

    def module_to_save(self) -> nn.Module:
        """The unwrapped module; its ``state_dict`` is the model where ranks hold replicas."""
        assert self._module is not None, "wrap() first"
        return self._module

    def final_state_dict(self) -> dict[str, Any] | None:
        """(all ranks) The model of record as a plain CPU state dict on the chief, None elsewhere.

        It loads into the unwrapped module with ``load_state_dict``.
        """
        self.synchronize()
        if not self.env.is_chief:
            return None
        return cpu_state(self.module_to_save().state_dict())

    def save_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) Write model and optimizer state into the directory ``path``.

        Replicated strategies: the chief writes one file; sharded ones write one piece per rank.
        """
        from sparkdl import storage

        model = self.final_state_dict()
        if self.env.is_chief:
            import io

            buffer = io.BytesIO()
            torch.save({"model": model, "optimizer": optimizer.state_dict()}, buffer)
            storage.write_file(storage.join(path, CHECKPOINT_FILE), buffer.getvalue())
        self._barrier()

    def load_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) Restore what :meth:`save_checkpoint` wrote into the same strategy."""
        import io

        from sparkdl import storage

        data = storage.read_file(storage.join(path, CHECKPOINT_FILE))
        state = torch.load(io.BytesIO(data), map_location=self.env.device, weights_only=True)
        self.module_to_save().load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def stats(self) -> dict[str, float]:
        """Strategy-specific counters of this rank (recorded as ``sync/<name>`` metrics)."""
        return {}

    def teardown(self) -> None:
        """(all ranks) Release communication resources."""

    def _barrier(self) -> None:
        """(all ranks) Wait for every rank; nothing in a world of one."""
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()
