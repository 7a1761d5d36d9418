"""[worker] run_worker(spec, env): the training loop, top to bottom.

Setup → for each epoch: for each step: batch, forward, backward, sync, step, maybe report →
epoch metrics (and validation) → teardown: the chief writes the model. Pure torch: runs in a
Spark barrier task, a local process, or a unit test alike.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from sparkdl.config import TrainSpec
from sparkdl.data.loader import ShardedDataset
from sparkdl.errors import DataError
from sparkdl.launch.channel import report_progress
from sparkdl.launch.context import WorkerEnv, get_context
from sparkdl.sync import SyncStrategy, make_strategy
from sparkdl.train.components import build_loss, build_optimizer, is_classification
from sparkdl.train.metrics import MetricsLog
from sparkdl.train.model_io import save_weights

__all__ = ["WorkerResult", "run_worker", "train"]

log = logging.getLogger("sparkdl")

PROGRESS_INTERVAL_S = 0.5
"""Least time between two progress reports the chief sends to the driver."""


@dataclass
class WorkerResult:
    """The small record a worker returns to the driver (no model bytes: those go to storage)."""

    rank: int
    steps: int
    samples: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None
    comm_bytes: int = 0


def train(spec: TrainSpec) -> WorkerResult:
    """Entry point for a launched function: run_worker with the current worker's env."""
    return run_worker(spec, get_context().env)


def _all_reduce_sum(values: list[float], env: WorkerEnv) -> list[float]:
    """(all ranks) Element-wise sum of ``values`` over ranks; identity in a world of one."""
    if not env.distributed:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if env.backend == "nccl":
        tensor = tensor.to(env.device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


class _Trainer:
    """The state of one worker's run; methods are the chapters of run_worker's story."""

    def __init__(self, spec: TrainSpec, env: WorkerEnv) -> None:
        self.spec, self.env = spec, env
        self.device = torch.device(env.device)
        torch.manual_seed(spec.optim.seed)
        self.dataset = ShardedDataset.load(spec.dataset_path)
        self.strategy: SyncStrategy = make_strategy(spec.sync, env)
        self.model = self.strategy.wrap(spec.model.build().to(self.device))
        self.optimizer = build_optimizer(spec.optim, self.model.parameters())
        self.loss_fn = build_loss(spec.optim)
        self.classify = is_classification(spec.optim)
        self.loader = self.dataset.loader(
            env.rank,
            env.world_size,
            batch_size=spec.optim.batch_size,
            shuffle=spec.optim.shuffle,
            seed=spec.optim.seed,
            epoch=0,
        )
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"batch_size must be at most the rows each worker holds, got {spec.optim.batch_size} "
                f"with {self.dataset.num_rows} rows over {env.world_size} workers. "
                "Lower batch_size or num_workers"
            )
        self.metrics = MetricsLog(spec.run_dir, enabled=env.is_chief, attempt=env.attempt)
        self.step = 0
        self.samples = 0
        self.train_seconds = 0.0
        self.last_loss: float | None = None
        self._progress_at = 0.0
        log.info(
            "rank %d of %d on %s: %d steps per epoch of batch %d, %d epochs",
            env.rank,
            env.world_size,
            env.device,
            self.steps_per_epoch,
            spec.optim.batch_size,
            spec.optim.epochs,
        )

    def train_epoch(self, epoch: int) -> None:
        """(all ranks) One pass over this rank's rows; the same number of steps on every rank."""
        self.model.train()
        self.loader.set_epoch(epoch)
        every = self.spec.optim.log_every_steps
        # Losses accumulate on the device; reading them back (a sync on GPU) happens per window.
        window = torch.zeros((), dtype=torch.float64, device=self.device)
        epoch_loss, window_steps, epoch_samples = 0.0, 0, 0
        start = time.perf_counter()
        for features, labels in self.loader:
            features = features.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss = self.loss_fn(self.model(features), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.strategy.before_step(self.step)
            self.optimizer.step()
            self.strategy.after_step(self.step)
            self.step += 1
            epoch_samples += labels.shape[0]
            window += loss.detach().double()
            window_steps += 1
            if every and self.step % every == 0:
                window_loss = float(window)
                epoch_loss += window_loss
                self._report_window(epoch, window_loss, window_steps)
                window.zero_()
                window_steps = 0
            self._report_progress(epoch, epoch_samples * self.env.world_size, start)
        epoch_loss += float(window)
        seconds = time.perf_counter() - start
        log.info(
            "epoch %d done: local loss %.5f, %.0f samples/s on this rank",
            epoch,
            epoch_loss / max(self.steps_per_epoch, 1),
            epoch_samples / max(seconds, 1e-9),
        )
        self.train_seconds += seconds
        self.samples += epoch_samples
        total_loss, total_steps, total_samples = _all_reduce_sum(
            [epoch_loss, float(self.steps_per_epoch), float(epoch_samples)], self.env
        )
        mean_loss = total_loss / max(total_steps, 1)
        self._check_finite(mean_loss, epoch)
        self.last_loss = mean_loss
        self._report_progress(epoch, int(total_samples), start, seconds=seconds, epoch_end=True)
        self.metrics.record(epoch, self.step, "train", "loss", mean_loss)
        self.metrics.record(
            epoch, self.step, "train", "samples_per_s", total_samples / max(seconds, 1e-9)
        )
        self.metrics.record(
            epoch,
            self.step,
            "train",
            "comm_bytes_per_step",
            self.strategy.comm_bytes / max(self.step, 1),
        )

    def _report_window(self, epoch: int, window_loss: float, window_steps: int) -> None:
        """(all ranks) Cross-rank mean loss of the last window of steps."""
        total, count = _all_reduce_sum([window_loss, float(window_steps)], self.env)
        mean = total / max(count, 1)
        self._check_finite(mean, epoch)
        self.last_loss = mean
        self.metrics.record(epoch, self.step, "train", "step_loss", mean)
        if self.env.is_chief:
            log.info("epoch %d step %d loss %.5f (mean over ranks)", epoch, self.step, mean)

    def _report_progress(
        self,
        epoch: int,
        samples: int,
        start: float,
        *,
        seconds: float | None = None,
        epoch_end: bool = False,
    ) -> None:
        """(chief only) Tell the driver where training stands, at most every PROGRESS_INTERVAL_S
        (and at every epoch's end); a no-op without a driver channel. Never syncs the device."""
        now = time.perf_counter()
        if not self.env.is_chief or (
            not epoch_end and now - self._progress_at < PROGRESS_INTERVAL_S
        ):
            return
        self._progress_at = now
        report_progress(
            epoch=epoch,
            epochs=self.spec.optim.epochs,
            step=self.step,
            total=self.spec.optim.epochs * self.steps_per_epoch,
            samples=samples,
            seconds=seconds if seconds is not None else now - start,
            loss=self.last_loss,
            epoch_end=epoch_end,
        )

    def _check_finite(self, value: float, epoch: int) -> None:
        """Every rank sees the same reduced value, so every rank stops at the same step."""
        if not math.isfinite(value):
            raise DataError(
                f"training loss must stay finite, got {value} at epoch {epoch}, step {self.step}. "
                "Lower learning_rate, scale features, or check labels for out-of-range values"
            )

    def evaluate(self, epoch: int) -> None:
        """(all ranks) Loss (and accuracy) on the validation split, when the dataset has one."""
        if self.dataset.manifest.splits.get("validation", 0) == 0:
            return
        self.model.eval()
        loader = self.dataset.loader(
            self.env.rank,
            self.env.world_size,
            batch_size=self.spec.optim.batch_size,
            shuffle=False,
            split="validation",
            drop_last=False,
        )
        loss_sum, count, correct = 0.0, 0.0, 0.0
        with torch.no_grad():
            for features, labels in loader:
                features, labels = features.to(self.device), labels.to(self.device)
                outputs = self.model(features)
                loss_sum += float(self.loss_fn(outputs, labels)) * labels.shape[0]
                count += labels.shape[0]
                if self.classify:
                    correct += float((outputs.argmax(dim=1) == labels).sum())
        loss_sum, count, correct = _all_reduce_sum([loss_sum, count, correct], self.env)
        if count:
            self.metrics.record(epoch, self.step, "validation", "loss", loss_sum / count)
            if self.classify:
                self.metrics.record(epoch, self.step, "validation", "accuracy", correct / count)

    def finish(self) -> WorkerResult:
        """(chief only for the writes) Save the model of record; every rank returns its record."""
        model_dir = None
        if self.env.is_chief:
            model_dir = os.path.join(self.spec.run_dir, "model")
            save_weights(self.strategy.module_to_save(), model_dir)
        self.strategy.teardown()
        return WorkerResult(
            rank=self.env.rank,
            steps=self.step,
            samples=self.samples,
            epochs=self.spec.optim.epochs,
            metrics=dict(self.metrics.latest),
            timings={"train_seconds": self.train_seconds},
            model_dir=model_dir,
            comm_bytes=self.strategy.comm_bytes,
        )


def run_worker(spec: TrainSpec, env: WorkerEnv) -> WorkerResult:
    """(all ranks) Train ``spec`` as rank ``env.rank`` of ``env.world_size``; returns a small record."""
    trainer = _Trainer(spec, env)
    for epoch in range(spec.optim.epochs):
        trainer.train_epoch(epoch)
        trainer.evaluate(epoch)
        trainer.metrics.flush(f"e{epoch:05d}")
    return trainer.finish()
