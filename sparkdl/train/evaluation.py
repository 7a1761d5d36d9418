"""[worker] The validation chapter of a worker's run: validation loss and metrics reduced over
ranks, and the early-stopping vote on them (a mixin of the trainer in sparkdl.train.worker).

Sharded strategies gather parameters inside forward (a collective), so every rank runs as many
forwards as the rank with the most validation batches, the extra ones on zero rows; extra
metrics are created on every rank before their cross-rank compute.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from sparkdl.data.inputs import batch_rows, call_model, move_to, split_batch, zero_rows
from sparkdl.train.collectives import all_reduce_max, all_reduce_sum
from sparkdl.train.components import metric_sum
from sparkdl.train.scores import MetricSet

__all__ = ["Evaluation"]

log = logging.getLogger("sparkdl")


class Evaluation:
    """evaluate / should_stop for the trainer, which holds the attributes they read."""

    # Set by the trainer.
    spec: Any
    env: Any
    model: Any
    strategy: Any
    dataset: Any
    device: Any
    metrics: Any
    metric: str | None
    batch_size: int
    step: int
    early_stopping: Any
    kept_metrics: dict[str, float]
    validation_scores: MetricSet
    _empty_batch: Any
    _empty_labels: Any

    loss_fn: Any
    _loss: Callable[..., Any]  # the trainer's methods
    _score: Callable[[Any, Any], Any]

    def evaluate(self, epoch: int) -> dict[str, float] | None:
        """(all ranks) Validation loss and metrics, reduced over ranks; None without a split."""
        if self.dataset.manifest.splits.get("validation", 0) == 0:
            return None
        self.model.eval()
        loader = self.dataset.loader(
            *self.strategy.data_shard,
            batch_size=self.batch_size,
            shuffle=False,
            split="validation",
            drop_last=False,
            reader=self.spec.optim.reader,
            transform=self.spec.inference_transform_fn or self.spec.transform_fn,
        )
        loss_sum, count, score = 0.0, 0.0, 0.0
        # Sharded modules gather parameters in forward (a collective): every rank runs as many
        # forwards as the rank with the most batches, the extra ones on zero rows. (A pipeline's
        # forward talks only within its replica, whose ranks read the same batches.)
        extra = all_reduce_max(len(loader), self.env) - len(loader)
        with torch.no_grad():
            for batch in loader:
                features, labels, weights = move_to(split_batch(batch), self.device)
                if self.strategy.runs_schedule:  # the batch flows through the stages
                    loss, batch_score = self.strategy.eval_step(
                        features, labels, self.loss_fn, self._score
                    )
                else:
                    outputs = call_model(self.model, features)
                    loss = self._loss(outputs, labels, weights, synced=False)
                    batch_score = metric_sum(self.metric, outputs, labels)
                loss_sum += float(loss) * batch_rows(labels)
                count += batch_rows(labels)
                score += float(batch_score)
                if not self.strategy.runs_schedule:
                    self.validation_scores.update(outputs, labels)
            for _ in range(0 if self.strategy.runs_schedule else extra):
                call_model(self.model, self._empty_inputs())
            self._build_scores(self.validation_scores)
        loss_sum, count, score = all_reduce_sum([loss_sum, count, score], self.env)
        extras = self.validation_scores.compute()
        if not count:
            return None
        values = {"loss": loss_sum / count}
        if self.metric:
            values[self.metric] = score / count
        values.update(extras)
        for name, value in values.items():
            self.metrics.record(epoch, self.step, "validation", name, value)
        return values

    def _build_scores(self, scores: MetricSet) -> None:
        """(all ranks, when extra metrics are asked for) Make sure every rank holds the metrics
        before their cross-rank compute: a rank that saw no rows builds them from a zero-row
        forward (which every rank runs then: a sharded forward is a collective)."""
        if not scores:
            return
        if not all_reduce_max(0 if scores.metrics else 1, self.env):
            return
        with torch.no_grad():
            outputs = call_model(self.model, self._empty_inputs())
        scores.build(outputs, self._empty_labels)

    def _empty_inputs(self) -> Any:
        """Zero-row inputs of the kind the model takes (from a training batch)."""
        if self._empty_batch is None:
            loader = self.dataset.loader(
                0,
                1,
                batch_size=1,
                shuffle=False,
                prefetch_batches=0,
                transform=self.spec.transform_fn,
            )
            features, labels, _ = split_batch(next(iter(loader)))
            self._empty_batch = zero_rows(move_to(features, self.device))
            self._empty_labels = zero_rows(move_to(labels, self.device))
        return self._empty_batch

    def should_stop(self, epoch: int, validation: dict[str, float] | None) -> bool:
        """(all ranks) Early stopping on the watched validation value (reduced over ranks).

        Every rank sees the same reduced value; the improvement vote is reduced too, so every
        rank snapshots the best weights (a collective for sharded strategies) and leaves the
        loop after the same epoch.
        """
        stopping = self.early_stopping
        if stopping is None or validation is None:
            return False
        watched = self.spec.optim.early_stopping_metric
        value = validation[watched]
        (votes,) = all_reduce_sum([1.0 if stopping.improves(value) else 0.0], self.env)
        state = None
        if votes:
            state = self.strategy.final_state_dict()  # the chief's copy; None on other ranks
            if state is not None:  # detach from the live parameters (CPU tensors alias them)
                state = copy.deepcopy(state)
        if votes:
            self.kept_metrics = dict(self.metrics.latest)  # what the kept weights scored
        stop = stopping.update(epoch, value, improved=votes > 0, state=state)
        if stop and self.env.is_chief:
            log.info(
                "early stopping after epoch %d; keeping epoch %d (validation %s %.5f)",
                epoch + 1,
                (stopping.best_epoch or 0) + 1,
                watched,
                stopping.best_value,
            )
        return stop
