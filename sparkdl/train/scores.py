"""[worker] Extra quality metrics by name, computed with torchmetrics across ranks.

``metrics=["auc", "f1"]`` (or torchmetrics.Metric instances) on the estimator: each is updated
with every batch's prediction (see ``components.prediction_of``) and labels, and computed at the
epoch's end. torchmetrics gathers each metric's state from every rank when a process group is
up, so the value covers every rank's rows exactly (an AUC over 2 ranks is the AUC of all their
predictions, not the mean of two AUCs).

How a name becomes a torchmetrics class depends on the task, read from the loss and the first
batch: ``cross_entropy``/``nll`` (or integer labels with [B, C] outputs under a callable loss)
→ multiclass over C classes: ``accuracy`` (micro), ``auc`` (one-vs-rest AUROC on the softmax,
macro: for C = 2 it equals the binary AUC of class 1), ``f1``/``precision``/``recall``
(macro); ``bce_with_logits`` (or float labels under a callable loss) → binary on the sigmoid
of a [B] or [B, 1] output, multilabel (macro) for [B, K]; regression losses → ``mse``,
``mae``, ``rmse``, ``r2`` on the output flattened to the labels' shape. A Metric instance gets
``update(prediction, labels)`` untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from sparkdl.errors import ConfigError
from sparkdl.knobs import CLASSIFICATION_METRICS, metric_label

__all__ = ["MetricSet"]


class MetricSet:
    """The run's extra metrics on one rank; ``compute`` is (all ranks) under a process group."""

    def __init__(self, metrics: tuple[Any, ...], loss: Any, device: torch.device) -> None:
        self.requested = metrics
        self.loss = loss
        self.device = device
        self.task: str | None = None
        self.metrics: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.requested)

    def update(self, outputs: Any, labels: Any) -> None:
        """Add a batch: ``outputs`` as the model returned them, ``labels`` as loaded."""
        if not self.requested or isinstance(labels, tuple):
            return
        from sparkdl.train.components import prediction_of

        prediction = prediction_of(outputs).detach()
        if not self.metrics:
            self._build(prediction, labels)
        for name, metric in self.metrics.items():
            preds, target = self._inputs(name, prediction, labels)
            metric.update(preds, target)

    def build(self, outputs: Any, labels: Any) -> None:
        """Create the metrics from a (possibly zero-row) batch, if no update did yet: every rank
        must hold them before :meth:`compute`, which gathers their states from all ranks."""
        if self.requested and not self.metrics and not isinstance(labels, tuple):
            from sparkdl.train.components import prediction_of

            self._build(prediction_of(outputs).detach(), labels)

    def compute(self) -> dict[str, float]:
        """(all ranks, with a process group) Each metric over every rank's rows, then reset."""
        import warnings

        values = {}
        for name, metric in self.metrics.items():
            with warnings.catch_warnings():  # a rank without rows of its own still takes part
                warnings.simplefilter("ignore")
                values[name] = float(metric.compute())
            metric.reset()
        return values

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def _build(self, prediction: torch.Tensor, labels: torch.Tensor) -> None:
        self.task = _task(self.loss, prediction, labels)
        for metric in self.requested:
            if isinstance(metric, str):
                built = _named(metric, self.task, prediction)
            else:
                built = metric
            self.metrics[metric_label(metric)] = built.to(self.device)

    def _inputs(
        self, name: str, prediction: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.requested_by_label(name), str):
            return prediction, labels
        task = self.task
        if task == "multiclass":
            target = labels.long()
            if name == "auc":
                return prediction.float().softmax(dim=1), target
            return prediction.argmax(dim=1), target
        if task in ("binary", "multilabel"):
            probs = prediction.float().sigmoid()
            if task == "binary":
                probs = probs.reshape(-1)
                target = labels.reshape(-1).long()
            else:
                target = labels.long()
            return probs, target
        return prediction.float().reshape(labels.shape), labels.float()

    def requested_by_label(self, label: str) -> Any:
        for metric in self.requested:
            if metric_label(metric) == label:
                return metric
        return None


def _task(loss: Any, prediction: torch.Tensor, labels: torch.Tensor) -> str:
    """multiclass, binary, multilabel or regression, from the loss and the first batch."""
    integer = not labels.is_floating_point()
    if loss in ("cross_entropy", "nll") or (
        not isinstance(loss, str) and integer and prediction.dim() == 2 and prediction.shape[1] > 1
    ):
        return "multiclass"
    if loss == "bce_with_logits" or not isinstance(loss, str):
        if loss == "bce_with_logits" or integer:
            wide = prediction.dim() == 2 and prediction.shape[1] > 1
            return "multilabel" if wide else "binary"
    return "regression"


def _named(name: str, task: str, prediction: torch.Tensor) -> Any:
    """The torchmetrics object for ``name`` under ``task``."""
    import torchmetrics.classification as tc
    import torchmetrics.regression as tr

    if name in CLASSIFICATION_METRICS:
        if task == "regression":
            raise ConfigError(
                f"metrics must fit the task, got {name!r} for a regression output (float "
                "labels). Use regression metrics (mse, mae, rmse, r2), or integer labels"
            )
        width = int(prediction.shape[1]) if prediction.dim() == 2 else 1
        if task == "multiclass":
            kwargs: dict[str, Any] = {"num_classes": width}
            classes = {
                "accuracy": (tc.MulticlassAccuracy, {"average": "micro"}),
                "auc": (tc.MulticlassAUROC, {"average": "macro"}),
                "f1": (tc.MulticlassF1Score, {"average": "macro"}),
                "precision": (tc.MulticlassPrecision, {"average": "macro"}),
                "recall": (tc.MulticlassRecall, {"average": "macro"}),
            }
        elif task == "multilabel":
            kwargs = {"num_labels": width}
            classes = {
                "accuracy": (tc.MultilabelAccuracy, {"average": "micro"}),
                "auc": (tc.MultilabelAUROC, {"average": "macro"}),
                "f1": (tc.MultilabelF1Score, {"average": "macro"}),
                "precision": (tc.MultilabelPrecision, {"average": "macro"}),
                "recall": (tc.MultilabelRecall, {"average": "macro"}),
            }
        else:
            kwargs = {}
            classes = {
                "accuracy": (tc.BinaryAccuracy, {}),
                "auc": (tc.BinaryAUROC, {}),
                "f1": (tc.BinaryF1Score, {}),
                "precision": (tc.BinaryPrecision, {}),
                "recall": (tc.BinaryRecall, {}),
            }
        cls, extra = classes[name]
        return cls(**kwargs, **extra)
    if task != "regression":
        raise ConfigError(
            f"metrics must fit the task, got {name!r} for a {task} output. Use classification "
            f"metrics {CLASSIFICATION_METRICS}"
        )
    regression = {
        "mse": lambda: tr.MeanSquaredError(),
        "rmse": lambda: tr.MeanSquaredError(squared=False),
        "mae": lambda: tr.MeanAbsoluteError(),
        "r2": lambda: tr.R2Score(),
    }
    return regression[name]()
