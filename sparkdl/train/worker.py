"""[worker] run_worker(spec, env): the training loop, top to bottom.

Setup → resume (every rank loads the latest complete checkpoint, if any) → for each epoch: for
each step: batch, forward, backward, sync, step, maybe report, maybe checkpoint → epoch metrics
(and validation, the early-stopping vote), maybe checkpoint → teardown: the chief writes the
model (the best epoch's with early stopping). Pure torch: runs in
a Spark barrier task, a local process, or a unit test alike. How ranks synchronize is the
strategy's business (sparkdl.sync), reached through the same ``Prepared`` object that
``sparkdl.sync.prepare`` gives users of their own loop.

A resumed run continues at the checkpoint's step and data position with the same model,
optimizer and RNG states, so with the same world size its final parameters equal those of an
uninterrupted run. Running totals (the epoch's loss sum, samples) are summed over ranks when a
checkpoint is taken and handed back to the chief on resume, so epoch metrics and the result's
sample count cover the whole run, not just the last attempt. Early stopping's state (its best
epoch and weights) is not checkpointed: after a resume it starts over from the resumed epoch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sparkdl import storage
from sparkdl.channel.client import report_progress
from sparkdl.config import TrainSpec
from sparkdl.context import WorkerEnv, get_context
from sparkdl.data.inputs import (
    batch_rows,
    call_model,
    move_to,
    split_batch,
    zero_rows,
)
from sparkdl.data.loader import ShardedDataset
from sparkdl.errors import CheckpointError, ConfigError, DataError
from sparkdl.knobs import check_strategy_knobs, early_stopping_mode
from sparkdl.rundir.layout import RunLayout
from sparkdl.rundir.model_dir import save_state_dict
from sparkdl.sync import SyncStrategy
from sparkdl.sync.prepare import prepare_config
from sparkdl.train.checkpoint import SHARDED_DIR, Checkpointer, ResizeRequested
from sparkdl.train.collectives import all_reduce_sum
from sparkdl.train.components import (
    build_loss,
    build_optimizer,
    build_row_loss,
    metric_name,
    metric_sum,
)
from sparkdl.train.early_stopping import EarlyStopping
from sparkdl.train.evaluation import Evaluation
from sparkdl.train.failures import inject, translated
from sparkdl.train.metrics import MetricsLog
from sparkdl.train.scores import MetricSet
from sparkdl.train.stepping import Stepper, optimizer_steps
from sparkdl.train.tally import Tally

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
    resumed_from_step: int | None = None
    """Step of the checkpoint this attempt resumed from (None: it started from scratch)."""
    best_epoch: int | None = None
    """With early stopping: the epoch whose weights were saved (0-based)."""
    stopped_for_resize: bool = False
    """True when the group stopped at a checkpoint because the driver asked it to (elastic
    grow): no model was written; the driver relaunches from that checkpoint."""
    last_metrics: dict[str, float] = field(default_factory=dict)
    """The last epoch's metrics; ``metrics`` are the kept model's (they differ with early
    stopping, when the kept epoch is not the last)."""


def train(spec: TrainSpec) -> WorkerResult:
    """Entry point for a launched function: run_worker with the current worker's env."""
    return run_worker(spec, get_context().env)


class _Trainer(Evaluation):
    """The state of one worker's run; methods are the chapters of run_worker's story (the
    validation chapter and early stopping are in :class:`~sparkdl.train.evaluation.Evaluation`)."""

    def __init__(self, spec: TrainSpec, env: WorkerEnv) -> None:
        self.spec, self.env = spec, env
        self.device = torch.device(env.device)
        torch.manual_seed(spec.optim.seed)
        self.dataset = ShardedDataset.load(spec.dataset_path)
        self.batch_size = spec.optim.batch_size
        """Rows per step on this rank (elastic "global" batch: its share of the global batch)."""
        if spec.elastic is not None:
            self.batch_size = spec.elastic.per_worker_batch(spec.optim.batch_size, env.world_size)
        self.sync = prepare_config(
            spec.model.build(), spec.sync, env, lambda params: build_optimizer(spec.optim, params)
        )
        self.strategy: SyncStrategy = self.sync.strategy
        self.model, self.optimizer = self.sync.module, self.sync.optimizer
        self.loss_fn = build_loss(spec.optim)
        self.row_loss_fn = build_row_loss(spec.optim)
        self.metric = metric_name(spec.optim)
        extra = tuple(m for m in spec.optim.metrics if m != self.metric)
        self.train_scores = MetricSet(extra, spec.optim.loss, self.device)
        self.validation_scores = MetricSet(extra, spec.optim.loss, self.device)
        self.early_stopping = self._early_stopping()
        self.kept_metrics: dict[str, float] = {}
        if self.strategy.runs_schedule and self.dataset.manifest.weight_col:
            raise ConfigError(
                "sample_weight_col must be empty with strategy='pipeline' (its loss runs per "
                f"microbatch on the last stage), got {self.dataset.manifest.weight_col!r}. Drop "
                "the weights or use another strategy"
            )
        self.loader = self.dataset.loader(
            *self.strategy.data_shard,  # the pipeline's stages of one replica read the same rows
            batch_size=self.batch_size,
            shuffle=spec.optim.shuffle,
            seed=spec.optim.seed,
            epoch=0,
            reader=spec.optim.reader,
            transform=spec.transform_fn,
        )
        self._empty_batch: Any = None  # the inputs of a zero-row forward (see evaluate)
        self._empty_labels: Any = None
        self.batch: Any = None
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch = optimizer_steps(self.batches_per_epoch, spec.optim.accumulate_steps)
        """Optimizer steps per epoch (``step`` counts these; batches differ with accumulation)."""
        if self.batches_per_epoch == 0:
            raise DataError(
                f"batch_size must be at most the rows each worker holds, got {self.batch_size} "
                f"with {self.dataset.num_rows} rows over {env.world_size} workers. "
                "Lower batch_size or num_workers"
            )
        self.metrics = MetricsLog(spec.run_dir, enabled=env.is_chief, attempt=env.attempt)
        self.step = 0
        self.samples = 0
        self.train_seconds = 0.0
        check_strategy_knobs(spec.optim, spec.sync.strategy, use_gpu=None)
        self.stepper = Stepper(spec.optim, self.sync, self.device)
        self.stepper.start(spec.optim.epochs * self.steps_per_epoch)
        self.checkpointer = Checkpointer(spec.run_dir, spec.checkpoint, env)
        self.faults = [f for f in spec.faults if f.rank == env.rank and f.attempt == env.attempt]
        self.tally = Tally(self.device)
        self.start_epoch = 0
        self.resumed_from_step: int | None = None
        self._position: dict[str, Any] | None = None
        self.epoch = 0
        self.last_loss: float | None = None
        self._progress_at = 0.0
        self.epochs_done = 0
        log.info(
            "rank %d of %d on %s: %d steps per epoch of batch %d, %d epochs",
            env.rank,
            env.world_size,
            env.device,
            self.steps_per_epoch,
            self.batch_size,
            spec.optim.epochs,
        )

    def _early_stopping(self) -> EarlyStopping | None:
        patience = self.spec.optim.early_stopping_patience
        if not patience:
            return None
        if not self.dataset.manifest.splits.get("validation", 0):
            raise ConfigError(
                f"early_stopping_patience needs a validation split, got {patience} with a "
                "dataset that has none. Set validation_fraction or validation_col"
            )
        watched = self.spec.optim.early_stopping_metric
        return EarlyStopping(
            patience, early_stopping_mode(watched, self.spec.optim.early_stopping_mode)
        )

    def train_epoch(self, epoch: int) -> None:
        """(all ranks) One pass over this rank's rows; the same number of steps on every rank."""
        self.model.train()
        self.epoch = epoch
        if self._position is not None:  # the epoch a checkpoint interrupted: continue inside it
            self.loader.load_state_dict(self._position)
            self._position = None
        else:
            self.loader.set_epoch(epoch)
            self.tally.reset()
        every = self.spec.optim.log_every_steps
        tally, stepper, group = self.tally, self.stepper, self.spec.optim.accumulate_steps
        consumed = self.loader.state_dict()["batches_consumed"]
        epoch_samples = 0
        bytes_before = self.strategy.comm_bytes
        start = time.perf_counter()
        for batch in self.loader:
            features, labels, weights = move_to(split_batch(batch), self.device, True)
            if self._empty_batch is None:
                self._empty_batch, self._empty_labels = zero_rows(features), zero_rows(labels)
            self.batch = features  # what a failing step was fed (see failures.translated)
            consumed += 1
            # The batches of one optimizer step: all but the last skip gradient communication.
            closes = consumed % group == 0 or consumed == self.batches_per_epoch
            outputs = None
            with stepper.micro_step(closes):
                if self.strategy.runs_schedule:  # pipeline: forward and backward by microbatches
                    loss, step_score = self.strategy.train_step(
                        features, labels, self.loss_fn, self._score
                    )
                    self._maybe_fail()
                else:
                    outputs = call_model(self.model, features)
                    loss = self._loss(outputs, labels, weights)
                    self._maybe_fail()
                    first = (consumed - 1) // group * group
                    stepper.backward(loss, min(group, self.batches_per_epoch - first))
                    step_score = metric_sum(self.metric, outputs, labels)
            epoch_samples += batch_rows(labels) if self.strategy.counts_rows else 0
            tally.window += loss.detach().double()
            tally.score += step_score
            if outputs is not None:
                self.train_scores.update(outputs, labels)
            tally.window_steps += 1
            if not closes:
                continue
            tally.lr, norm = stepper.step()
            self.step += 1
            if norm is not None:
                tally.grad_norm += norm.detach().double()
                tally.norm_steps += 1
            if every and self.step % every == 0:
                window_loss = float(tally.window)
                tally.loss_sum += window_loss
                self._report_window(epoch, window_loss, tally.window_steps)
                tally.window.zero_()
                tally.window_steps = 0
            if self.checkpointer.due_in_epoch(self.step, consumed == self.batches_per_epoch):
                self.save_checkpoint(epoch, self.loader.state_dict(), samples=epoch_samples)
            self._report_progress(epoch, epoch_samples * self.strategy.data_shard[1], start)
        epoch_loss = tally.loss_sum + float(tally.window)
        # Replicas that drifted apart (local SGD) or lag the servers meet the model of record.
        self.strategy.synchronize()
        seconds = time.perf_counter() - start
        log.info(
            "epoch %d done: local loss %.5f, %.0f samples/s on this rank",
            epoch + 1,
            epoch_loss / max(self.batches_per_epoch, 1),
            epoch_samples / max(seconds, 1e-9),
        )
        self.train_seconds += seconds
        self.samples += epoch_samples
        epoch_bytes = float(self.strategy.comm_bytes - bytes_before)
        score = float(tally.score)
        self._record_epoch(epoch, seconds, [epoch_loss, epoch_samples, epoch_bytes, score])

    def _loss(self, outputs: Any, labels: Any, weights: Any, *, synced: bool = True) -> Any:
        """(all ranks, with weights under a synchronous strategy) The step's loss; weighted:
        the rows' weighted losses over the global batch's weight sum (× world size, which the
        gradient average divides out): N workers × b rows = 1 worker × N·b."""
        if weights is None:
            return self.loss_fn(outputs, labels)
        summed = self.row_loss_fn(outputs, labels, weights)
        if not isinstance(self.spec.optim.loss, str):
            return summed
        total = float(weights.sum())
        scale = 1.0
        if synced and self.strategy.synchronous and self.env.world_size > 1:
            (total,) = all_reduce_sum([total], self.env)
            scale = float(self.env.world_size)
        return summed * (scale / max(total, 1e-12))

    def _score(self, outputs: Any, labels: Any) -> Any:
        return metric_sum(self.metric, outputs, labels)

    def _record_epoch(self, epoch: int, seconds: float, sums: list[float]) -> None:
        """(all ranks) Cross-rank epoch metrics; the only collective of an asynchronous epoch."""
        t = self.tally
        norm = [t.epoch_grad_norm + float(t.grad_norm), t.epoch_norm_steps + t.norm_steps]
        sums += [float(self.batches_per_epoch), float(self.steps_per_epoch), *norm]
        reduced = all_reduce_sum(sums, self.env)
        total_loss, total_samples, total_bytes, total_score, batches, steps = reduced[:6]
        mean_loss = total_loss / max(batches, 1)
        self._check_finite(mean_loss, epoch)
        self.last_loss = mean_loss
        self.epochs_done = epoch + 1
        if self.metric:  # running over the epoch's batches, like the loss (full: drop_last)
            score = total_score / max(batches * self.batch_size, 1)
            self.metrics.record(epoch, self.step, "train", self.metric, score)
        if self.train_scores:
            was_training = self.model.training
            self._build_scores(self.train_scores)
            self.model.train(was_training)
            for name, value in self.train_scores.compute().items():
                self.metrics.record(epoch, self.step, "train", name, value)
        self._record_optimizer(epoch, reduced[7], reduced[6], epoch_end=True)
        self._report_progress(epoch, int(total_samples), 0.0, seconds=seconds, epoch_end=True)
        self.metrics.record(epoch, self.step, "train", "loss", mean_loss)
        self.metrics.record(
            epoch, self.step, "train", "samples_per_s", total_samples / max(seconds, 1e-9)
        )
        # Bytes sent per worker per optimizer step this epoch, averaged over the workers, and
        # per training row (accumulating k batches per step divides it by k).
        self.metrics.record(
            epoch, self.step, "train", "comm_bytes_per_step", total_bytes / max(steps, 1)
        )
        self.metrics.record(
            epoch, self.step, "train", "comm_bytes_per_sample", total_bytes / max(total_samples, 1)
        )
        for name, value in self.strategy.stats().items():
            self.metrics.record(epoch, self.step, "sync", name, value)

    def _record_optimizer(
        self, epoch: int, norm_steps: float, norm_sum: float, *, epoch_end: bool = False
    ) -> None:
        """(chief records) ``lr``, the learning rate the last step used, and ``world_size`` (once
        per step), and
        with clipping the mean pre-clip gradient norm over ``norm_steps`` steps and the ranks
        (identical under DDP and FSDP; local SGD and the parameter server clip their own):
        ``step_grad_norm`` per window of log_every_steps, ``grad_norm`` per epoch (as
        ``step_loss`` and ``loss``)."""
        every = self.spec.optim.log_every_steps
        if not (epoch_end and every and self.step % every == 0):  # else recorded at this step
            self.metrics.record(epoch, self.step, "train", "lr", self.tally.lr)
            size = float(self.env.world_size)  # changes only between attempts (elastic runs)
            self.metrics.record(epoch, self.step, "train", "world_size", size)
        if self.spec.optim.grad_clip_norm and norm_steps:
            name = "grad_norm" if epoch_end else "step_grad_norm"
            self.metrics.record(epoch, self.step, "train", name, norm_sum / norm_steps)

    def _maybe_fail(self) -> None:
        """Fire a configured FaultInjection inside the step in progress (tests only)."""
        for fault in self.faults:
            if fault.step == self.step + 1:
                inject(fault)

    def end_epoch(self, epoch: int) -> None:
        """(all ranks) Checkpoint when due (the chief flushes the epoch's metrics first)."""
        if self.checkpointer.due_at_epoch_end(epoch, self.step):
            position = self.loader.state_dict()
            position.update(epoch=epoch + 1, batches_consumed=0)
            self.tally.reset()
            self.save_checkpoint(epoch, position, samples=0)
        else:
            self.checkpointer.check_current()
            self.metrics.flush()

    def _stateful(self) -> dict[str, Any]:
        """What the chief's state.pt holds; a sharding strategy writes model and optimizer itself."""
        sharded = self.strategy.sharded_checkpoint
        return {
            "model": None if sharded else self.strategy.module_to_save(),
            "optimizer": None if sharded else self.optimizer,
            "scheduler": self.stepper.scheduler,
            "scaler": self.stepper.scaler,
        }

    def save_checkpoint(self, epoch: int, position: dict[str, Any], samples: int) -> None:
        """(all ranks) Sum the running totals over ranks; the chief flushes metrics and commits."""
        t = self.tally
        sums = all_reduce_sum(
            [
                t.loss_sum,
                float(t.window),
                float(t.window_steps),
                float(self.samples + samples),
                float(t.score),
            ],
            self.env,
        )
        totals = dict(zip(("loss_sum", "window", "window_steps", "samples", "score"), sums))
        totals["latest"] = dict(self.metrics.latest)  # type: ignore[assignment]
        self.checkpointer.save(
            step=self.step,
            epoch=epoch,
            position=position,
            totals=totals,
            modules=self._stateful(),
            before_commit=self.metrics.flush,
            sharded=self._save_sharded if self.strategy.sharded_checkpoint else None,
        )
        if self.spec.elastic is not None and self.checkpointer.resize_requested():
            raise ResizeRequested(f"stopped at step {self.step} for a resize")

    def _save_sharded(self, path: str) -> None:
        """(all ranks) The strategy's pieces of model and optimizer state into ``path``."""
        self.strategy.save_checkpoint(path, self.optimizer)

    def resume(self) -> None:
        """(all ranks) Continue from the latest complete checkpoint, when there is one.

        The chief first drops metric files a failed attempt wrote after that checkpoint.
        """
        loaded = self.checkpointer.restore()
        self.checkpointer.claim()  # fence off the failed attempt's stragglers first
        self.metrics.discard_after(loaded.info.step if loaded else 0)
        if loaded is None:
            return
        self.checkpointer.apply_states(loaded, self._stateful(), self.spec.optim.seed)
        if self.strategy.sharded_checkpoint:
            self.strategy.load_checkpoint(
                storage.join(loaded.info.path, SHARDED_DIR), self.optimizer
            )
        meta = loaded.info.meta
        self.step = self.resumed_from_step = loaded.info.step
        position = dict(meta["position"])
        self.start_epoch = self.epochs_done = int(position["epoch"])
        self._position = position if int(position["batches_consumed"]) > 0 else None
        totals = meta.get("totals", {})
        self.metrics.latest.update(totals.get("latest", {}))
        if self.env.is_chief:  # the group's totals so far; the other ranks add from zero
            self.tally.restore(totals)
            self.samples = int(totals.get("samples", 0))
        log.info(
            "[rank %d] resumed from the checkpoint at step %d (epoch %d, batch %d)",
            self.env.rank,
            self.step,
            self.start_epoch + 1,
            int(position["batches_consumed"]),
        )

    def _report_window(self, epoch: int, window_loss: float, window_steps: int) -> None:
        """(all ranks) Cross-rank mean loss of the last window of steps.

        Asynchronous strategies report each rank's own loss: a collective here would make the
        fast workers wait for the slow ones every window.
        """
        t = self.tally
        sums = [window_loss, float(window_steps), float(t.grad_norm), float(t.norm_steps)]
        t.epoch_grad_norm += sums[2]  # this rank's own; summed over ranks at the epoch's end
        t.epoch_norm_steps += sums[3]
        t.grad_norm.zero_()
        t.norm_steps = 0
        if self.strategy.synchronous:
            sums = all_reduce_sum(sums, self.env)
        total, count, norm_sum, norm_steps = sums
        mean = total / max(count, 1)
        self._check_finite(mean, epoch)
        self.last_loss = mean
        self.metrics.record(epoch, self.step, "train", "step_loss", mean)
        self._record_optimizer(epoch, norm_steps, norm_sum)
        if self.env.is_chief:
            log.info("epoch %d step %d loss %.5f (mean over ranks)", epoch + 1, self.step, mean)

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
                f"training loss must stay finite, got {value} at epoch {epoch + 1}, step {self.step}. "
                "Lower learning_rate, scale features, or check labels for out-of-range values"
            )

    def finish(self) -> WorkerResult:
        """(chief only for the writes) Save the model of record; every rank returns its record."""
        model_dir = None
        best = self.early_stopping
        kept = best is not None and best.best_epoch is not None and bool(self.kept_metrics)
        if best is not None and best.best_epoch is not None:
            state = best.best_state  # the same branch on every rank: no collective is skipped
        else:
            state = self.strategy.final_state_dict()
        self.checkpointer.check_current()
        if self.env.is_chief:
            assert state is not None
            model_dir = RunLayout(self.spec.run_dir).model_dir
            try:
                save_state_dict(state, model_dir)
            except CheckpointError:
                raise
            except Exception as exc:  # deterministic: a restart would fail the same way
                raise CheckpointError(
                    f"the final model must be saved to {model_dir}, got {type(exc).__name__}: "
                    f"{exc}. The training itself finished; fix the cause and resume=True"
                ) from exc
        self.sync.close()
        return WorkerResult(
            rank=self.env.rank,
            steps=self.step,
            samples=self.samples,
            epochs=self.epochs_done,
            metrics=dict(self.kept_metrics if kept else self.metrics.latest),
            last_metrics=dict(self.metrics.latest),
            timings={"train_seconds": self.train_seconds},
            model_dir=model_dir,
            comm_bytes=self.strategy.comm_bytes,
            resumed_from_step=self.resumed_from_step,
            best_epoch=best.best_epoch if best is not None else None,
        )


def run_worker(spec: TrainSpec, env: WorkerEnv) -> WorkerResult:
    """(all ranks) Train ``spec`` as rank ``env.rank`` of ``env.world_size``; returns a small record.

    Resumes from the latest complete checkpoint under ``spec.run_dir`` when there is one.
    """
    trainer = _Trainer(spec, env)
    try:
        trainer.resume()
        for epoch in range(trainer.start_epoch, spec.optim.epochs):
            trainer.train_epoch(epoch)
            stop = trainer.should_stop(epoch, trainer.evaluate(epoch))
            trainer.end_epoch(epoch)
            if stop:
                break
    except ResizeRequested:  # the driver relaunches at another size from this checkpoint
        trainer.sync.close()
        return WorkerResult(
            rank=env.rank,
            steps=trainer.step,
            samples=trainer.samples,
            epochs=trainer.epochs_done,
            comm_bytes=trainer.strategy.comm_bytes,
            resumed_from_step=trainer.resumed_from_step,
            stopped_for_resize=True,
        )
    except Exception as exc:
        mapped = translated(exc, trainer)
        if mapped is exc:
            raise
        raise mapped from exc
    return trainer.finish()
