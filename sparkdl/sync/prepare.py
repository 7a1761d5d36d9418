"""[worker] ``prepare``: apply a synchronization strategy inside your own training function.

For ``sparkdl.Distributor`` users who write their own loop; the estimator's loop goes through
the same object, so both behave alike::

    def train_fn():
        sync = sparkdl.sync.prepare(model, strategy="local_sgd", sync_every=8,
                                    optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
        for x, y in batches:
            loss = loss_fn(sync.module(x), y)
            sync.optimizer.zero_grad()
            loss.backward()
            sync.step()                    # before_step, optimizer.step(), after_step
        state = sync.state_dict()          # (all ranks) the full model on the chief, else None
        sync.close()
        return sync.comm_bytes

    sparkdl.Distributor(num_workers=2).run(train_fn)

With ``strategy="pipeline"`` each rank holds one stage of the model, so a step is not
``module(x)`` then ``loss.backward()`` (forward and backward interleave across the stages'
ranks, microbatch by microbatch): call ``sync.train_step(x, y, loss_fn)`` instead, on every rank
with the same batch — the rows of ``sync.data_shard`` (replica index, replicas: every stage of
a replica reads the same rows). It returns the batch's mean loss (the last stage's, the same on
every rank); ``loss_fn`` must average over rows::

        sync = sparkdl.sync.prepare(model, strategy="pipeline", stages=2, microbatches=4,
                                    optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
        replica, replicas = sync.data_shard
        for x, y in my_batches(replica, replicas):   # batch rows: a multiple of microbatches
            sync.optimizer.zero_grad()
            loss, _ = sync.train_step(x, y, torch.nn.functional.cross_entropy)
            sync.step()                    # averages each stage's gradients over replicas

``train_step`` works with every strategy (forward, loss, backward), and ``eval_step`` is its
forward-only twin (under ``torch.no_grad()``; for the pipeline, any number of rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from sparkdl.config import SyncConfig
from sparkdl.context import WorkerEnv, get_context
from sparkdl.sync.base import OptimizerFactory, SyncStrategy

__all__ = ["Prepared", "prepare", "prepare_config"]


class Prepared:
    """A module and optimizer under a strategy; ``step()`` replaces ``optimizer.step()``."""

    def __init__(self, strategy: SyncStrategy, module: nn.Module, optimizer: Any) -> None:
        self.strategy = strategy
        self.module = module
        """The module to train (wrapped by the strategy: DDP, FSDP, the module itself, or the
        pipeline's stage of it)."""
        self.optimizer: torch.optim.Optimizer = optimizer
        """Zero its gradients as usual; step through :meth:`step`."""
        self.steps = 0

    def step(self, *, clip_norm: float = 0.0, scaler: Any = None) -> torch.Tensor | None:
        """(all ranks) One synchronized optimizer step, after ``loss.backward()``.

        ``clip_norm`` > 0 clips the final gradients' total L2 norm (see
        ``SyncStrategy.clip_grad_norm``) and returns the norm before clipping (else None).
        ``scaler`` is a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` made the
        gradients: it unscales them before clipping and steps the optimizer (skipping steps
        with inf/NaN gradients).
        """
        self.strategy.before_step(self.steps)
        norm = None
        if clip_norm > 0:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            norm = self.strategy.clip_grad_norm(clip_norm)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.strategy.after_step(self.steps)
        self.steps += 1
        return norm

    def no_sync(self) -> Any:
        """(all ranks) ``with sync.no_sync():`` around the forward and backward of a batch whose
        gradients accumulate into the next one's (gradient accumulation): no communication."""
        return self.strategy.no_sync()

    def train_step(
        self,
        inputs: Any,
        labels: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        score_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(all ranks) Forward and backward of one batch; (loss, ``score_fn(outputs, labels)``
        or 0). Zero the gradients before and :meth:`step` after, as with ``backward()``."""
        return self.strategy.train_step(inputs, labels, loss_fn, score_fn)

    def eval_step(
        self,
        inputs: Any,
        labels: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        score_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(all ranks) Forward only (under ``torch.no_grad()``): (loss, score or 0)."""
        return self.strategy.eval_step(inputs, labels, loss_fn, score_fn)

    @property
    def data_shard(self) -> tuple[int, int]:
        """(index, count): the slice of the data this rank reads (the pipeline's ranks of one
        replica share one)."""
        return self.strategy.data_shard

    def synchronize(self) -> None:
        """(all ranks) Bring this rank's module to the model of record (e.g. to evaluate)."""
        self.strategy.synchronize()

    def state_dict(self) -> dict[str, Any] | None:
        """(all ranks) The trained model as a plain CPU state dict on the chief, None elsewhere;
        it loads into the unwrapped module."""
        return self.strategy.final_state_dict()

    def save_checkpoint(self, path: str) -> None:
        """(all ranks) Model and optimizer state into directory ``path`` (sharded for fsdp)."""
        self.strategy.save_checkpoint(path, self.optimizer)

    def load_checkpoint(self, path: str) -> None:
        """(all ranks) Restore a checkpoint written by the same strategy and world size."""
        self.strategy.load_checkpoint(path, self.optimizer)

    @property
    def comm_bytes(self) -> int:
        """Bytes this rank has sent (see sparkdl.sync.base for how they are counted)."""
        return self.strategy.comm_bytes

    def stats(self) -> dict[str, float]:
        """The strategy's counters for this rank (staleness, averages, …)."""
        return self.strategy.stats()

    def close(self) -> None:
        """(all ranks) Release the strategy's resources (parameter-server threads, …)."""
        self.strategy.teardown()

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()


def prepare_config(
    module: nn.Module, config: SyncConfig, env: WorkerEnv, optimizer: OptimizerFactory
) -> Prepared:
    """(all ranks) ``module`` (moved to ``env.device``) and its optimizer under ``config``."""
    from sparkdl.sync import make_strategy

    config.check_world_size(env.world_size)
    strategy = make_strategy(config, env)
    wrapped = strategy.wrap(module.to(torch.device(env.device)))
    return Prepared(strategy, wrapped, strategy.build_optimizer(optimizer))


def prepare(
    module: nn.Module,
    strategy: str = "allreduce",
    *,
    optimizer: OptimizerFactory,
    **options: Any,
) -> Prepared:
    """(all ranks) Apply ``strategy`` to ``module`` inside a function run by a Distributor.

    Args:
        module: the model (moved to this worker's device).
        strategy: "allreduce", "local_sgd", "parameter_server", "fsdp" or "pipeline" (then
            step with :meth:`Prepared.train_step`, see the module docstring).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, e.g.
            ``functools.partial(torch.optim.Adam, lr=1e-3)``; the strategy decides which
            parameters it gets (FSDP's shards, the servers' copies, …).
        **options: the strategy's options (sparkdl.config.STRATEGY_OPTIONS), e.g.
            ``compression="fp16"``, ``sync_every=8``, ``max_staleness=4``, ``stages=2``.

    Raises ConfigError for an unknown strategy or option, before anything communicates.
    """
    config = SyncConfig(strategy=strategy, options=options)
    return prepare_config(module, config, get_context().env, optimizer)
