"""[worker] Pipeline parallelism: the model cut by layers into stages (torch.distributed.pipelining).

The ranks form a 2-D mesh ``("dp", "pp")`` of replicas × stages, rank = replica × stages +
stage. Each rank keeps only its stage's layers (sparkdl.sync.pipeline_split decides the cut;
the other layers of the module it was given move to the meta device) and runs a schedule,
"gpipe" or "1f1b", over the batch's microbatches: activations go forward to the next stage's
rank and gradients back (point-to-point on the replica's "pp" group). With several replicas,
each stage's replicas then all-reduce its gradients (their "dp" group), as DDP would.

Data: every rank of a replica reads the same rows in the same order (the replica is the data
rank, :attr:`data_shard`); the first stage feeds the features in, the last takes the labels.
A step is :meth:`train_step` (forward and backward interleave across microbatches, so the
loop cannot call them itself): the last stage computes each microbatch's loss with the loss
function as given (it must average over its rows) and divides it by the number of
microbatches, so their sum is the whole batch's mean; gradients add up, so several
train_steps before one optimizer step accumulate as backward() does. The loss returned, and
the score, are the last stage's, broadcast to the replica's other stages, so every rank
reports the same. :meth:`eval_step` sends a batch of any size forward through the stages
whole (no microbatches), its tensors' shapes ahead of them.

Bytes: the activations and gradients a stage sends (point-to-point, counted at the send)
plus the gradient all-reduce over the replicas (ring cost over ``replicas`` ranks); the
16-byte loss broadcast is metrics, not counted. Checkpoints: the first replica of each stage
writes ``pipeline-stage-<k>.pt`` (its layers' state under the whole model's keys, and its
optimizer state), which every replica of the stage loads. The final model is gathered onto the
chief: the whole state dict, loadable into the unwrapped module.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from sparkdl import storage
from sparkdl.config import PipelineOptions
from sparkdl.errors import ConfigError
from sparkdl.rundir.model_dir import cpu_state
from sparkdl.sync.base import SyncStrategy
from sparkdl.sync.pipeline_split import StagePart, leftover_state, split_model

__all__ = ["PipelineStrategy"]


class _CountingStage(PipelineStage):
    """A PipelineStage that counts the bytes it sends and times its own compute."""

    strategy: PipelineStrategy

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_fwd_send_ops(fwd_chunk_id)
        self.strategy.count_sends(ops)
        return ops

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_send_ops(bwd_chunk_id)
        self.strategy.count_sends(ops)
        return ops

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.strategy.busy_s += time.perf_counter() - start

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.strategy.busy_s += time.perf_counter() - start


class PipelineStrategy(SyncStrategy):
    """Stages of the model on the ranks of each replica; microbatches through a schedule."""

    name = "pipeline"
    sharded_checkpoint = True
    runs_schedule = True

    def __init__(self, env: Any, options: PipelineOptions | None = None) -> None:
        super().__init__(env, options or PipelineOptions())
        self.stages, self.microbatches = self.options.resolved(env.world_size)
        self.replicas = env.world_size // self.stages
        self.stage, self.replica = env.rank % self.stages, env.rank // self.stages
        self.last = self.stage == self.stages - 1
        self.counts_rows = self.stage == 0  # the replica's rows, counted once
        self.steps = 0
        self.busy_s = 0.0
        """Seconds this stage computed (forward and backward chunks) in the current step."""
        self._timed = [0.0, 0.0]  # busy and schedule seconds of the steps after the first
        self._schedule: Any = None
        self._loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
        self._extra: dict[str, Any] = {}
        self._stage_params: list[int] = []

    @property
    def data_shard(self) -> tuple[int, int]:
        """The replica reads the data: its ranks see the same rows in the same order."""
        return self.replica, self.replicas

    # ---- setup -------------------------------------------------------------------------------

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) Start from rank 0's weights, keep this rank's stage, form the mesh."""
        if not (self.env.distributed and dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                'strategy="pipeline" must run inside a process group, got a world of '
                f"{self.env.world_size} without one. Use num_workers ≥ 2"
            )
        from torch.distributed.device_mesh import init_device_mesh

        for value in module.state_dict().values():  # every stage starts from rank 0's model
            if isinstance(value, torch.Tensor):
                dist.broadcast(value, src=0)
        parts = split_model(module, self.stages, self.options.split_points)
        self._extra = leftover_state(module, parts)
        self._stage_params = [
            sum(p.numel() for _, m in part for p in m.parameters()) for part in parts
        ]
        device = torch.device(self.env.device)
        mesh = init_device_mesh(
            device.type, (self.replicas, self.stages), mesh_dim_names=("dp", "pp")
        )
        self._pp, self._dp = mesh.get_group("pp"), mesh.get_group("dp")
        for k, part in enumerate(parts):
            if k != self.stage:  # free the other stages' layers (this rank never runs them)
                for _, layer in part:
                    layer.to_empty(device="meta")
        stage_module = StagePart(parts[self.stage])
        self._pipe = _CountingStage(stage_module, self.stage, self.stages, device, group=self._pp)
        self._pipe.strategy = self
        self._module = self._wrapped = stage_module
        return stage_module

    def _peer(self, stage: int) -> int:
        """The global rank of ``stage`` in this rank's replica."""
        return dist.get_global_rank(self._pp, stage)

    def _schedule_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._schedule is None:
            kind = ScheduleGPipe if self.options.schedule == "gpipe" else Schedule1F1B
            self._schedule = kind(
                self._pipe, self.microbatches, loss_fn=self._microbatch_loss, scale_grads=False
            )
        return self._schedule.step(*args, **kwargs)

    def _microbatch_loss(self, outputs: Any, labels: Any) -> torch.Tensor:
        """A microbatch's share of the batch's mean loss. Scaling the loss, not the gradients
        afterwards (the schedule's scale_grads), leaves gradients already accumulated alone."""
        assert self._loss_fn is not None
        return self._loss_fn(outputs, labels) / self.microbatches

    # ---- steps -------------------------------------------------------------------------------

    def train_step(
        self,
        inputs: Any,
        labels: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        score_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(all ranks) Forward and backward of one batch through the stages, by microbatches.

        Every rank of a replica passes the same batch (the first stage uses ``inputs``, the
        last ``labels``). Returns the batch's mean loss and ``score_fn(outputs, labels)`` (0
        without one), computed on the last stage and the same on every stage.
        """
        rows = _rows(labels)
        if rows % self.microbatches:
            raise ConfigError(
                f"microbatches must divide the rows of each batch, got microbatches="
                f"{self.microbatches} with a batch of {rows} rows. Use a batch size that is a "
                f"multiple of {self.microbatches}, or other microbatches"
            )
        self._loss_fn = loss_fn
        losses: list[torch.Tensor] = []
        outputs = None
        self.busy_s = 0.0
        start = time.perf_counter()
        if self.stage == 0:
            if isinstance(inputs, Mapping):
                self._schedule_step(**inputs)
            else:
                self._schedule_step(inputs)
        elif self.last:
            outputs = self._schedule_step(
                target=labels, losses=losses, return_outputs=score_fn is not None
            )
        else:
            self._schedule_step()
        if self.steps:  # the first step also exchanges shapes: not the schedule's own pace
            self._timed[0] += self.busy_s
            self._timed[1] += time.perf_counter() - start
        self.steps += 1
        loss = torch.stack([x.detach() for x in losses]).sum() if losses else None
        return self._from_last_stage(loss, outputs, labels, score_fn)

    def eval_step(
        self,
        inputs: Any,
        labels: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        score_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(all ranks) Forward only, the whole batch through the stages (any number of rows);
        returns the loss and score as :meth:`train_step` does."""
        with torch.no_grad():
            if self.stage == 0:
                module = self._module
                assert module is not None
                x = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
            else:
                x = self._module(*self._receive())  # type: ignore[misc]
            if not self.last:
                self._send(x)
                return self._from_last_stage(None, None, labels, score_fn)
            return self._from_last_stage(loss_fn(x, labels), x, labels, score_fn)

    def _from_last_stage(
        self, loss: Any, outputs: Any, labels: Any, score_fn: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(all ranks) The last stage's loss and score, broadcast over the replica's stages."""
        values = torch.zeros(2, dtype=torch.float64, device=torch.device(self.env.device))
        if self.last:
            values[0] = loss.detach().double()
            if score_fn is not None:
                values[1] = score_fn(outputs, labels).double()
        dist.broadcast(values, src=self._peer(self.stages - 1), group=self._pp)
        return values[0], values[1]

    def _send(self, x: Any) -> None:
        """(this stage and the next) An activation and, ahead of it, its shapes and dtypes."""
        tensors = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        meta = [(tuple(t.shape), t.dtype) for t in tensors]
        peer = self._peer(self.stage + 1)
        dist.send_object_list(
            [meta], dst=peer, group=self._pp, device=torch.device(self.env.device)
        )
        for t in tensors:
            dist.send(t.contiguous(), dst=peer, group=self._pp)
        self.count_sends(tensors)

    def _receive(self) -> list[torch.Tensor]:
        """(this stage and the one before) What :meth:`_send` sent."""
        peer = self._peer(self.stage - 1)
        meta: list[Any] = [None]
        dist.recv_object_list(meta, src=peer, group=self._pp, device=torch.device(self.env.device))
        tensors = [
            torch.empty(shape, dtype=dtype, device=torch.device(self.env.device))
            for shape, dtype in meta[0]
        ]
        for t in tensors:
            dist.recv(t, src=peer, group=self._pp)
        return tensors

    def count_sends(self, sent: Any) -> None:
        """Count point-to-point payloads: P2POps (the schedule's) or tensors (evaluation's)."""
        for item in sent:
            t = getattr(item, "tensor", item)
            self.count("send", t.numel() * t.element_size())

    def before_step(self, step: int) -> None:
        """(all ranks) Average this stage's gradients over its replicas (one bucket per dtype)."""
        if self.replicas == 1:
            return
        assert self._module is not None
        params = [p for p in self._module.parameters() if p.requires_grad]
        for dtype in dict.fromkeys(p.dtype for p in params):
            group = [p for p in params if p.dtype == dtype]
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
            )
            dist.all_reduce(flat, group=self._dp)
            flat /= self.replicas
            self.count("all_reduce", flat.numel() * flat.element_size(), world_size=self.replicas)
            offset = 0
            for p in group:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """(all ranks) Clip by the whole model's gradient norm: each stage's squared norm is
        summed over the replica's stages (its "pp" group), so every stage scales its gradients
        by the same factor, as one process clipping the whole model would."""
        assert self._module is not None
        grads = [p.grad for p in self._module.parameters() if p.grad is not None]
        squared = torch.zeros((), dtype=torch.float64, device=torch.device(self.env.device))
        for g in grads:
            squared += g.detach().double().pow(2).sum()
        dist.all_reduce(squared, group=self._pp)
        norm = squared.sqrt()
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coefficient.to(g.dtype))
        return norm.float()

    # ---- model of record, checkpoints, stats ---------------------------------------------------

    def _stage_module(self) -> StagePart:
        assert isinstance(self._module, StagePart), "wrap() first"
        return self._module

    def final_state_dict(self) -> dict[str, Any] | None:
        """(all ranks) The first replica's stages gathered on the chief: the whole model's state
        dict (plain CPU tensors, loadable into the unwrapped module); None elsewhere."""
        piece = cpu_state(self._stage_module().model_state_dict()) if self.replica == 0 else None
        pieces: list[Any] | None = [None] * self.env.world_size if self.env.is_chief else None
        dist.gather_object(piece, pieces, dst=0)
        if pieces is None:
            return None
        state = dict(self._extra)
        for stage_state in pieces[: self.stages]:  # ranks 0 … stages-1: the first replica
            state.update(stage_state)
        return state

    def _piece(self, path: str) -> str:
        return storage.join(path, f"pipeline-stage-{self.stage:04d}.pt")

    def save_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) The first replica of each stage writes that stage's piece."""
        if self.replica == 0:
            buffer = io.BytesIO()
            model = cpu_state(self._stage_module().model_state_dict())
            torch.save({"model": model, "optimizer": optimizer.state_dict()}, buffer)
            storage.write_file(self._piece(path), buffer.getvalue())
        self._barrier()

    def load_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) Every replica of a stage loads that stage's piece."""
        data = storage.read_file(self._piece(path))
        state = torch.load(io.BytesIO(data), map_location=self.env.device, weights_only=True)
        self._stage_module().load_model_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def stats(self) -> dict[str, float]:
        """This rank's stage, its share of the parameters (and the largest stage's), and the
        bubble: the fraction of its schedule time the stage did not compute (steps after the
        first)."""
        total = max(sum(self._stage_params), 1)
        out = {
            "stage": float(self.stage),
            "stage_params": float(self._stage_params[self.stage]),
            "stage_param_fraction": self._stage_params[self.stage] / total,
            "max_stage_param_fraction": max(self._stage_params) / total,
        }
        busy, elapsed = self._timed
        if elapsed > 0:
            out["bubble_fraction"] = max(0.0, 1.0 - busy / elapsed)
        return out


def _rows(labels: Any) -> int:
    if isinstance(labels, torch.Tensor):
        return int(labels.shape[0])
    raise ConfigError(
        f"labels must be one tensor for strategy='pipeline' (the last stage's loss takes them "
        f"by microbatch), got {type(labels).__name__}. Use a single label column"
    )
