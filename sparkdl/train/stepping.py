"""[worker] One optimizer step's mechanics: precision, accumulation, clipping, LR schedule.

The training loop feeds batches; :class:`Stepper` decides what each batch's backward does and
when the optimizer steps:

- **precision**: ``"bf16"`` runs forward and loss under ``torch.autocast`` to bfloat16 (CPU
  and GPU); ``"fp16"`` autocasts to float16 and scales the loss with ``torch.amp.GradScaler``
  (GPU only: CPU autocast has no float16 kernels worth using, and the scaler needs CUDA).
  Parameters and optimizer state stay fp32, so the model of record is fp32.
- **accumulation**: ``accumulate_steps`` batches add their gradients before one optimizer step;
  each batch's loss is divided by the number of batches in its group, so 2 batches of b rows
  give the gradient of one batch of 2b rows (mean-reduced losses). The batches before the
  last of a group run under the strategy's ``no_sync`` (DDP skips its all-reduce then). The
  last group of an epoch may be shorter (it is divided by its own length).
- **clipping**: ``grad_clip_norm`` clips the L2 norm over every parameter's gradient after the
  strategy made the gradients final (DDP: the all-reduced ones; FSDP2: sharded DTensors, whose
  norm ``clip_grad_norm_`` reduces over ranks; local SGD and the parameter server: this rank's
  own gradient, the one it applies or pushes). The pre-clip norm is returned to be recorded.
- **LR schedule**: stepped once per optimizer step. The named ones are multiplicative factors
  of ``learning_rate`` after Hugging Face transformers' ``get_*_schedule_with_warmup``
  (linear warmup from 0 over ``warmup_steps``, then cosine or linear decay to
  ``min_lr_ratio × learning_rate`` at ``total_steps``), or torch's StepLR (``step``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from sparkdl.config import OptimConfig
from sparkdl.errors import ConfigError

__all__ = ["ScheduleFactor", "Stepper", "build_scheduler", "optimizer_steps"]


def optimizer_steps(batches: int, accumulate_steps: int) -> int:
    """Optimizer steps in an epoch of ``batches`` batches (the last group may be shorter)."""
    return -(-batches // max(accumulate_steps, 1))


class ScheduleFactor:
    """``factor(t)``: the multiple of the base learning rate for optimizer step ``t`` (0-based).

    A plain object (not a lambda), so ``LambdaLR.state_dict()`` saves its fields.
    """

    def __init__(self, name: str, warmup: int, total: int, options: dict[str, Any]) -> None:
        self.name, self.warmup, self.total = name, warmup, max(total, 1)
        self.min_ratio = float(options.get("min_lr_ratio", 0.0))
        self.gamma = float(options.get("gamma", 0.1))
        self.step_size = int(options.get("step_size", max(1, (self.total - warmup) // 3)))

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return t / max(1, self.warmup)
        after = t - self.warmup
        span = max(1, self.total - self.warmup)
        if self.name == "cosine":
            progress = min(after / span, 1.0)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "linear":
            return self.min_ratio + (1 - self.min_ratio) * max(0.0, (span - after) / span)
        if self.name == "step":
            return float(self.gamma ** (after // self.step_size))
        return 1.0


def build_scheduler(config: OptimConfig, optimizer: Any, total_steps: int) -> Any:
    """The LR scheduler over ``optimizer`` for a run of ``total_steps`` optimizer steps, or None
    (a constant rate without warmup). A callable ``lr_schedule`` gets ``(optimizer,
    total_steps)``."""
    schedule = config.lr_schedule
    if not isinstance(schedule, str):
        return schedule(optimizer, total_steps)
    if schedule == "constant" and not config.warmup_steps:
        return None
    factor = ScheduleFactor(
        schedule, config.warmup_steps, total_steps, dict(config.lr_schedule_options)
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Stepper:
    """The per-batch and per-step mechanics of the loop over a ``Prepared`` module/optimizer.

    ``scheduler`` and ``scaler`` (None when unused) are the objects whose states checkpoints
    keep.
    """

    def __init__(self, config: OptimConfig, prepared: Any, device: torch.device) -> None:
        self.config, self.prepared, self.device = config, prepared, device
        if config.precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f'precision="fp16" must run on a GPU (autocast to float16 with a gradient '
                f'scaler), got device {device}. Use precision="bf16" on CPU, or use_gpu=True'
            )
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.scheduler: Any = None

    def start(self, total_steps: int) -> None:
        """Build the LR scheduler for a run of ``total_steps`` optimizer steps."""
        self.scheduler = build_scheduler(self.config, self.prepared.optimizer, total_steps)

    @contextlib.contextmanager
    def micro_step(self, closes_step: bool) -> Iterator[None]:
        """Forward, loss and backward of one batch: autocast when asked, and no gradient sync
        unless this batch closes an optimizer step."""
        sync = contextlib.nullcontext() if closes_step else self.prepared.no_sync()
        cast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        with sync, cast:
            yield

    def backward(self, loss: torch.Tensor, group_size: int) -> None:
        """``loss / group_size`` backward (scaled under fp16)."""
        if group_size > 1:
            loss = loss / group_size
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self) -> tuple[float, torch.Tensor | None]:
        """(all ranks) The optimizer step through the strategy, then the schedule; returns the
        learning rate the step used and the pre-clip gradient norm (None without clipping)."""
        optimizer = self.prepared.optimizer
        lr = float(optimizer.param_groups[0].get("lr", self.config.learning_rate))
        norm = self.prepared.step(clip_norm=self.config.grad_clip_norm, scaler=self.scaler)
        if self.scheduler is not None:
            self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return lr, norm
